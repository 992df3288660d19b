"""AEM's and the environment's metrics, and a table of sample trajectories, reach wandb (offline run, nothing leaves
the machine)."""

import json
import time

from conftest import base_args
from test_env_trainer import env_dataset
from test_rollout import WORDS, SayEnv

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer


def read_when_written(path, needles, timeout=60.0):
    """The run file's bytes once it holds every needle (or after ``timeout`` s): wandb 0.31's ``finish()`` can
    return before its core process has flushed the run file (seen as a bare 7-byte header right after it)."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        if all(needle in data for needle in needles) or time.monotonic() > deadline:
            return data
        time.sleep(0.25)


def test_metrics_are_in_the_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "trl-aem-test")
    tokenizer = build_word_tokenizer(WORDS + ["say", "wrong", "done"])
    args = AEMGRPOConfig(**base_args(tmp_path / "out", report_to="wandb", max_completion_length=64, env_max_turns=2,
                                     env_max_new_tokens_per_turn=4, aem_min_entropy_range=0.0, run_name="aem-test",
                                     env_log_trajectories=3))
    trainer = AEMGRPOTrainer(model=build_tiny_qwen2(tokenizer, hidden_size=32), args=args, train_dataset=env_dataset(),
                             processing_class=tokenizer, env=SayEnv)
    trainer.train()
    import wandb

    wandb.finish()
    runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "no offline wandb run was written"
    # wandb >= 0.2x writes the run as a protobuf record log (read back by its Go core); history keys are stored as
    # plain strings in it, so look for every metric's key in the run file itself.
    keys = ("train/aem/alpha_mean", "train/aem/alpha_std", "train/aem/alpha_min", "train/aem/alpha_max",
            "train/aem/alpha_p10", "train/aem/alpha_p50", "train/aem/alpha_p90", "train/aem/gated_frac",
            "train/aem/neg_adv_frac", "train/aem/response_entropy_mean", "train/aem/nonfinite_entropy_spans",
            "train/aem/turn0/alpha_mean", "train/aem/turn0/response_entropy_mean", "train/env/success_rate",
            "train/env/return_mean", "train/env/turns_mean", "train/env/invalid_action_rate",
            "train/env/truncated_frac", "train/env/episode_errors", "train/entropy", "train/reward",
            "train/env/trajectories")
    data = read_when_written(runs[0], [key.encode() for key in keys])
    for key in keys:
        assert key.encode() in data, key

    # The trajectory table of each logging step is written as media/table/train/env/trajectories_*.table.json.
    tables = sorted(runs[0].parent.glob("files/media/table/train/env/trajectories_*.table.json"))
    assert len(tables) == 2, "one trajectory table per logging step"
    steps = []
    for path in tables:
        table = json.loads(path.read_text())
        assert table["columns"] == ["step", "seed", "turns", "success", "return", "truncated", "invalid_actions",
                                    "transcript", "error"]
        assert len(table["data"]) == 3
        for step, seed, turns, success, episode_return, truncated, invalid, transcript, error in table["data"]:
            steps.append(step)
            assert seed in range(16) and 1 <= turns <= 2 and isinstance(success, bool) and error == ""
            assert transcript.startswith("obs: say ") and transcript.count("act: ") == turns
        assert table["data"][0][0] == table["data"][-1][0]
    assert sorted(set(steps)) == [1, 2]
