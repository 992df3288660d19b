"""A training run killed with SIGKILL in the middle of a step resumes from its last checkpoint
(`trl-aem train ... --resume_from_checkpoint last`, i.e. `trainer.train(resume_from_checkpoint=...)`): on CPU with a
fixed seed, every metric it logs after the checkpoint (loss, rewards, env and AEM metrics, gradient norm, entropy,
learning rate) equals, exactly, what an uninterrupted run logs, and so do the final weights.

Exact equality is expected, not a tolerance: both runs do the same floating-point operations in the same order on
the same CPU kernels (same seed, one thread each, same data order from the sampler's seed, the same task seeds from
the dataset's `seed` column, the random states, optimizer and scheduler restored from the checkpoint). The
environment (tests/scripts/killable_env.py) blocks in the first reset of step 3, after checkpoint-2 was written,
so the kill lands in the middle of step 3's rollout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script
from safetensors.torch import load_file

from trl_aem.scripts.train_agent import resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "killable_env:trl_aem_test/KillableCodeBreaker-v0"
TRAIN = [
    sys.executable, "-m", "trl_aem", "train", "--env_id", ENV_ID, "--tiny_model", "true", "--tiny_hidden_size", "32",
    "--num_train_tasks", "16", "--eval_tasks", "0",
    "--env_kwargs", json.dumps({"code_length": 1, "num_symbols": 3, "max_guesses": 3}),
    "--env_max_turns", "3", "--env_max_new_tokens_per_turn", "4", "--max_completion_length", "64",
    "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_steps", "4",
    "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2",
    "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
]
#: Resets per step: 2 tasks x 4 episodes; the first reset of step 3 is number 17.
BLOCK_AT_RESET = 2 * 8 + 1
#: Logged values that measure time, not training.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _start(output_dir: Path, *extra: str, block_at: int | None = None, marker: Path | None = None):
    path = os.pathsep.join([str(ROOT / "tests" / "scripts"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # One thread each: with several, MKL may use fewer than asked when the machine is busy (MKL_DYNAMIC), which
    # changes the order of floating-point sums and, in the last bit, the metrics (seen under load in the full suite).
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_DYNAMIC="FALSE")
    if block_at is not None:
        env.update(KILLABLE_ENV_BLOCK_AT=str(block_at), KILLABLE_ENV_MARKER=str(marker))
    with open(output_dir.parent / f"{output_dir.name}.log", "a") as log:  # the child keeps its own copy
        return subprocess.Popen([*TRAIN, "--output_dir", str(output_dir), *extra], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def _logs(output_dir: Path) -> dict[int, dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: {k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history
            if "loss" in entry}


def _tail(output_dir: Path) -> str:
    return (output_dir.parent / f"{output_dir.name}.log").read_text()[-3000:]


@pytest.mark.slow
def test_a_run_killed_mid_step_resumes_to_the_uninterrupted_runs_metrics(tmp_path):
    reference_dir, run_dir, marker = tmp_path / "reference", tmp_path / "run", tmp_path / "blocked"
    reference = _start(reference_dir)
    victim = _start(run_dir, block_at=BLOCK_AT_RESET, marker=marker)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert victim.poll() is None, f"the run ended before it was killed:\n{_tail(run_dir)}"
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.2)
        # in the middle of step 3's rollout: checkpoint-2 is complete, nothing of step 3 is saved
        assert (run_dir / "checkpoint-2" / "optimizer.pt").exists() and not (run_dir / "checkpoint-4").exists()
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    resumed = _start(run_dir, "--resume_from_checkpoint", "last")
    assert resumed.wait(timeout=900) == 0, _tail(run_dir)
    assert reference.wait(timeout=900) == 0, _tail(reference_dir)

    expected, got = _logs(reference_dir), _logs(run_dir)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # after the checkpoint: computed again by the resumed process
        assert got[step] == expected[step], f"step {step} differs after the resume"
        assert got[step]["grad_norm"] > 0 and got[step]["reward_std"] > 0  # the step changed the weights
        for prefix in ("env/", "aem/", "rewards/"):
            assert any(key.startswith(prefix) for key in got[step])
    assert got[1] == expected[1] and got[2] == expected[2]  # before it: restored from the checkpoint's state
    final, reference_final = load_file(run_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert final.keys() == reference_final.keys()
    assert all((final[name] == reference_final[name]).all() for name in final)


def test_resume_from_checkpoint_names_a_checkpoint_or_last(tmp_path, capsys):
    """`--resume_from_checkpoint last` with no checkpoint, or a path that is no folder: a usage error (exit 2) before
    any model is built; `last` picks the newest checkpoint-* folder."""
    script = load_script("examples/train_agent.py", "train_agent")
    for value in ("last", str(tmp_path / "nowhere")):
        with pytest.raises(SystemExit) as stop:
            script.main(["--tiny_model", "true", "--output_dir", str(tmp_path), "--use_cpu", "true",
                         "--resume_from_checkpoint", value])
        assert stop.value.code == 2 and "resume_from_checkpoint" in capsys.readouterr().err
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    _, config, _ = script.make_parser().parse_args_and_config(["--output_dir", str(tmp_path), "--use_cpu", "true",
                                                               "--resume_from_checkpoint", "last"])
    assert resume_checkpoint(config) == str(tmp_path / "checkpoint-10")
    config.resume_from_checkpoint = None
    assert resume_checkpoint(config) is None
