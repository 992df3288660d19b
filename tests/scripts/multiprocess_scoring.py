"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): score one generation batch with AEM and dump, per process,
what AEM saw and produced (tests/test_multiprocess.py compares it with a single-process computation)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: E402
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer  # noqa: E402


def reward_red(completions, **kwargs):
    return [float(c[0]["content"].split().count("red")) for c in completions]


class Recording(AEMGRPOTrainer):
    def _aem_collect_token_entropy(self, output):
        self.used_entropy = super()._aem_collect_token_entropy(output)
        return self.used_entropy


out_dir = sys.argv[1]
tokenizer = build_word_tokenizer(["red", "blue", "green", "say", "color"])
model = build_tiny_qwen2(tokenizer, hidden_size=32)
prompts = [f"say a color {i} ." for i in range(4)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
args = AEMGRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=4, max_completion_length=6,
                     max_steps=2, logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True, aem_min_entropy_range=0.0, seed=0)
trainer = Recording(model=model, reward_funcs=reward_red, args=args, train_dataset=dataset,
                    processing_class=tokenizer)
trainer.model.train()
rank = trainer.accelerator.process_index
# Rows of this process: the global batch is one prompt's 4 generations, 2 on each process (a group split in two).
rows = [{"prompt": [{"role": "user", "content": prompts[0]}]} for _ in range(2)]
output = trainer._generate_and_score_completions(rows)
torch.save(
    {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "entropy": trainer.used_entropy.cpu(),
        "loss_mask": output["completion_mask"].cpu(),
        "base_advantages": trainer.aem_base_advantages.cpu(),
        "advantages": output["advantages"].cpu(),
        "token_alpha": trainer.aem_last_token_alpha.cpu(),
        "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("aem/")},
    },
    os.path.join(out_dir, f"rank{rank}.pt"),
)

# The same batch with rank 1's whole shard masked out of the loss (e.g. all its completions truncated): rank 1 has no
# span, rank 0 has two; the gathered statistics must still agree across processes, and nothing may fail.
masked = dict(output, advantages=trainer.aem_base_advantages.clone())
if rank == 1:
    masked["completion_mask"] = torch.zeros_like(output["completion_mask"])
trainer._metrics["train"].clear()
trainer._aem_modulate(masked, trainer.used_entropy)
torch.save(
    {
        "token_alpha": trainer.aem_last_token_alpha.cpu(),
        "loss_mask": masked["completion_mask"].cpu(),
        "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("aem/")},
    },
    os.path.join(out_dir, f"masked_rank{rank}.pt"),
)

# Then train for real on both processes (DDP over gloo): the loss and AEM's metrics must come out finite.
trainer.train()
if trainer.accelerator.is_main_process:
    torch.save([entry for entry in trainer.state.log_history if "loss" in entry], os.path.join(out_dir, "train_logs.pt"))
