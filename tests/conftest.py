"""Shared fixtures: a tiny Qwen2 model and word-level tokenizer built in code (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def textworld_cache(tmp_path_factory):
    """One TextWorld game cache for the whole run: generating a game takes seconds, and the TextWorld tests and the
    benchmark's TextWorld smoke run play many of the same games (the 16 vocabulary probe games above all)."""
    return tmp_path_factory.mktemp("textworld-cache")


def load_script(relative_path: str, name: str):
    """Import a script of the repository (``"benchmarks/learning.py"``) as module ``name``: registered in
    ``sys.modules`` (dataclasses look their module up there), its folder on ``sys.path`` (for sibling imports)."""
    path = ROOT / relative_path
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ALFWORLD_FIXTURES = ROOT / "tests" / "fixtures" / "alfworld"


def packed_alfworld_data(root: Path) -> Path:
    """ALFWorld data for tests: a copy of the hand-written fixture trials (``initial_state.pddl`` + ``traj_data.json``
    in ALFWorld's layout) in ``root``, each packed into the ``game.tw-pddl`` ALFWorld plays, with the PDDL domain and
    grammar of the installed alfworld package (so alfworld's own files are not copied into this repository)."""
    import shutil

    from trl_aem.envs.alfworld_env import write_game_file

    shutil.copytree(ALFWORLD_FIXTURES, root)
    for traj in sorted(root.rglob("traj_data.json")):
        write_game_file(traj.parent)
    return root


COLORS = ["red", "blue", "green", "yellow", "black", "white"]


@pytest.fixture(scope="session")
def tokenizer():
    """Word-level tokenizer with Qwen2.5's chat template."""
    return build_word_tokenizer(COLORS + ["say", "color", "name"])


@pytest.fixture
def make_model(tokenizer):
    """Factory for a fresh tiny Qwen2 model (same weights for the same seed)."""

    def factory(seed: int = 0):
        return build_tiny_qwen2(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, seed=seed)

    return factory


@pytest.fixture(scope="session")
def color_dataset():
    """A single-turn conversational prompt dataset."""
    return Dataset.from_list([{"prompt": [{"role": "user", "content": "say a color ."}]} for _ in range(32)])


def red_reward(completions, **kwargs):
    """1 for each 'red' in the completion (a reward with spread, so advantages are non-zero)."""
    return [float(c[0]["content"].split().count("red")) for c in completions]


def short_reward(completions, **kwargs):
    """A second reward: shorter completions score higher."""
    return [-0.1 * len(c[0]["content"].split()) for c in completions]


def base_args(tmp_path, **overrides):
    """Config kwargs for a couple of fast CPU steps."""
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=5e-2,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs


def train_one_env_step(env_id: str, words: list[str], tmp_path, num_tasks: int = 4, **overrides):
    """One AEM-GRPO step of a tiny model (word tokenizer over ``words``) on ``env_id`` in the step-wise window
    context; ``overrides`` go to :func:`base_args`. Returns the trainer and its first log with env metrics, after
    checking that no episode failed and that AEM's per-span metrics were logged."""
    from trl_aem import AEMGRPOConfig, AEMGRPOTrainer

    tokenizer = build_word_tokenizer(words)
    model = build_tiny_qwen2(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "play ."}], "seed": i}
                                 for i in range(num_tasks)])
    settings = dict(max_completion_length=32, env_max_turns=2, env_max_new_tokens_per_turn=3, max_steps=1,
                    env_context="window")
    args = AEMGRPOConfig(**base_args(tmp_path, **{**settings, **overrides}))
    trainer = AEMGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, env=env_id)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "env/success_rate" in e)
    assert log["env/episode_errors"] == 0 and log["env/turns_mean"] >= 1 and "aem/spans" in log
    return trainer, log


@pytest.fixture(scope="session")
def say_tokenizer():
    """Word-level tokenizer for the multi-turn test environment of tests/test_rollout.py (``SayEnv``)."""
    return build_word_tokenizer(["red", "blue", "green", "say", "wrong", "done"])
