"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): one generation batch in window mode (one row
per turn) whose group of 4 episodes is split over the 2 processes; dump what AEM saw and produced per process
(tests/test_multiprocess.py checks it against a single-process computation), then train 2 steps under DDP with the
loss in parts of one row."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: E402
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer  # noqa: E402


class CountEnv(gymnasium.Env):
    """Say words; the episode ends after 1 + (number of words in the first answer) % 3 turns (so the processes'
    episodes play different numbers of turns). Reward 1 per answer containing 'red'."""

    def reset(self, seed=None, options=None):
        self.turns, self.left = 0, None
        return "say red", {}

    def step(self, action):
        if self.left is None:
            self.left = 1 + len(action.split()) % 3
        self.left -= 1
        return "say red", float("red" in action.split()), self.left == 0, False, {}


class Recording(AEMGRPOTrainer):
    def _aem_collect_token_entropy(self, output):
        self.used_entropy = super()._aem_collect_token_entropy(output)
        return self.used_entropy

    def _env_segment_batch(self, inputs, output):
        batch, span_ids, row_episode = super()._env_segment_batch(inputs, output)
        self.row_episode = row_episode
        return batch, span_ids, row_episode


out_dir = sys.argv[1]
tokenizer = build_word_tokenizer(["red", "blue", "green", "say", "color"])
model = build_tiny_qwen2(tokenizer, hidden_size=32)
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "play ."}], "seed": i} for i in range(8)])
args = AEMGRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=4, max_completion_length=16,
                     max_steps=2, logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                     aem_min_entropy_range=0.0, seed=0, env_context="window", env_history_turns=1, env_max_turns=3,
                     env_max_new_tokens_per_turn=4, env_rows_per_forward=1, disable_tqdm=True)
trainer = Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, env=CountEnv)
trainer.model.train()
rank = trainer.accelerator.process_index
torch.manual_seed(rank)  # different answers on the two processes
rows = [{"prompt": [{"role": "user", "content": "play ."}], "seed": 0} for _ in range(2)]
output = trainer._generate_and_score_completions(rows)
torch.save(
    {
        "entropy": trainer.used_entropy.cpu(),
        "loss_mask": (output["completion_mask"] * output["tool_mask"]).cpu(),
        "row_episode": trainer.row_episode.cpu(),
        "base_advantages": trainer.aem_base_advantages.cpu(),
        "token_alpha": trainer.aem_last_token_alpha.cpu(),
        "turns": [row["env_turns"] for row in rows],
        "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("aem/")},
    },
    os.path.join(out_dir, f"window_rank{rank}.pt"),
)
trainer.train()
if trainer.accelerator.is_main_process:
    torch.save([e for e in trainer.state.log_history if "loss" in e], os.path.join(out_dir, "window_train_logs.pt"))
