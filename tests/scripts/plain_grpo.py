"""An ordinary TRL GRPO training script (tiny offline model). tests/test_drop_in.py runs it unchanged, and again with
only the two class names swapped for trl-aem's."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer


def reward_red(completions, **kwargs):
    return [float(c[0]["content"].split().count("red")) for c in completions]


tokenizer = build_word_tokenizer(["red", "blue", "green", "say", "color"])
model = build_tiny_qwen2(tokenizer, hidden_size=32)
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "say a color ."}]}] * 16)

args = GRPOConfig(
    output_dir=sys.argv[1],
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    max_steps=2,
    logging_steps=1,
    report_to="none",
    bf16=False,
    use_cpu=True,
    save_strategy="no",
)
trainer = GRPOTrainer(model=model, reward_funcs=reward_red, args=args, train_dataset=dataset,
                      processing_class=tokenizer)
trainer.train()
print("TRAINER", type(trainer).__name__)
print("LOGGED", sorted(trainer.state.log_history[0]))
