"""Imported first by every benchmark script, before transformers: nothing from the Hub, no wandb, quiet tokenizers.
Values already set in the environment win."""

import os

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                      ("WANDB_MODE", "disabled"), ("TOKENIZERS_PARALLELISM", "false"),
                      ("HF_HUB_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_name, _value)
