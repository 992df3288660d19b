"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): one generation batch with GiGPO's step
credit (env_context="window", env_credit="gigpo") whose group of 4 episodes is split over the 2 processes; dump, per
process, every row's episode, turn, reward and observation, the episode-level advantages and the combined advantages
(tests/test_multiprocess.py recomputes the step groups over all 4 episodes, as one process would)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: E402
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer  # noqa: E402

OBSERVATIONS = ("say red", "say color", "say blue", "say green")


class CountEnv(gymnasium.Env):
    """Say words; the episode ends after 1 + (number of words in the first answer) % 3 turns. Observation k is
    OBSERVATIONS[k] in every episode (so turn k of every episode is one anchor state); the reward of a turn is the
    number of words of its answer (sampled answers differ in length, so step returns differ)."""

    def reset(self, seed=None, options=None):
        self.turns, self.left = 0, None
        return OBSERVATIONS[0], {}

    def step(self, action):
        if self.left is None:
            self.left = 1 + len(action.split()) % 3
        self.left -= 1
        self.turns += 1
        return OBSERVATIONS[self.turns], float(len(action.split())), self.left == 0, False, {}


class Recording(AEMGRPOTrainer):
    def _gigpo_row_advantages(self, inputs, advantages, span_ids, row_episode, mode):
        combined = super()._gigpo_row_advantages(inputs, advantages, span_ids, row_episode, mode)
        episodes = [row["env_episode"] for row in inputs]
        self.record = {
            "row_episode": row_episode.cpu(), "row_turn": span_ids.max(dim=1).values.cpu(),
            "episode_advantages": advantages.detach().cpu(), "combined": combined.detach().cpu(),
            "rewards": [list(e.rewards) for e in episodes], "observations": [list(e.observations) for e in episodes],
        }
        return combined


out_dir = sys.argv[1]
tokenizer = build_word_tokenizer(["red", "blue", "green", "say", "color"])
model = build_tiny_qwen2(tokenizer, hidden_size=32)
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "play ."}], "seed": i} for i in range(8)])
args = AEMGRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=4, max_completion_length=16,
                     max_steps=1, logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                     use_aem=False, seed=0, env_context="window", env_history_turns=1, env_max_turns=3,
                     env_max_new_tokens_per_turn=4, env_credit="gigpo", env_gigpo_gamma=0.5, env_gigpo_omega=0.7,
                     env_gigpo_step_scale="none", disable_tqdm=True)
trainer = Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, env=CountEnv)
trainer.model.train()
rank = trainer.accelerator.process_index
torch.manual_seed(rank)  # different answers on the two processes
rows = [{"prompt": [{"role": "user", "content": "play ."}], "seed": 0} for _ in range(2)]
trainer._generate_and_score_completions(rows)
trainer.record["metrics"] = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("credit/")}
torch.save(trainer.record, os.path.join(out_dir, f"gigpo_rank{rank}.pt"))
