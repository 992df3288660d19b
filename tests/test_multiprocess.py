"""Several processes (accelerate + torchrun, gloo on CPU): AEM's groups and statistics span processes.

`accelerate launch --multi_gpu --num_processes 2` on a machine without a GPU starts 2 CPU processes with the gloo
backend (accelerate's `--cpu` flag would need MPI for several processes).

A group of 4 generations is split over 2 processes; each process's alphas and advantages must equal a single-process
computation on the concatenated batch.
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_aem import aem_coefficients, span_mean_entropy
from trl_aem.credit import anchor_state_ids, discounted_returns, gigpo_step_advantages

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "multiprocess_scoring.py"


def launch_two_processes(script: Path, out_dir: Path) -> None:
    """Run ``script out_dir`` under ``accelerate launch`` with 2 CPU processes (gloo); fail with its stderr."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert launcher, "accelerate's launcher is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script), str(out_dir)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    launch_two_processes(SCRIPT, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)

    # Single-process computation on the concatenated batch (pad completions to one width).
    width = max(r["entropy"].size(1) for r in ranks)

    def pad(t, value=0):
        return torch.nn.functional.pad(t, (0, width - t.size(1)), value=value)

    entropy = torch.cat([pad(r["entropy"]) for r in ranks])
    loss_mask = torch.cat([pad(r["loss_mask"]) for r in ranks])
    base = torch.cat([r["base_advantages"] for r in ranks])
    table = span_mean_entropy(entropy, loss_mask)
    alpha = aem_coefficients(table.response_entropy, table.row // 4, min_range=0.0)
    assert alpha.std() > 0  # the group is modulated, so the comparison is not vacuous
    for r, data in enumerate(ranks):
        mask = data["loss_mask"].bool()
        for local_row in range(2):
            row = 2 * r + local_row
            expected_alpha = alpha[row].expand(int(mask[local_row].sum()))
            torch.testing.assert_close(data["token_alpha"][local_row][mask[local_row]], expected_alpha)
            torch.testing.assert_close(data["advantages"][local_row][mask[local_row]], base[row] * expected_alpha)
    # Both processes log the same (global) statistics.
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["aem/alpha_mean"] == pytest.approx(1.0, abs=1e-6)
    # Rank 1's shard masked out: its alphas are 1, rank 0's are AEM over rank 0's two spans alone, and both
    # processes log the same statistics.
    masked = [torch.load(tmp_path / f"masked_rank{r}.pt") for r in range(2)]
    assert masked[0]["metrics"] == masked[1]["metrics"] and masked[0]["metrics"]["aem/spans"] == 2.0
    assert torch.equal(masked[1]["token_alpha"], torch.ones_like(masked[1]["token_alpha"]))
    rank0 = ranks[0]
    table0 = span_mean_entropy(rank0["entropy"], rank0["loss_mask"])
    alpha0 = aem_coefficients(table0.response_entropy, torch.zeros(2, dtype=torch.long), min_range=0.0)
    for local_row in range(2):
        mask = masked[0]["loss_mask"][local_row].bool()
        torch.testing.assert_close(masked[0]["token_alpha"][local_row][mask], alpha0[local_row].expand(int(mask.sum())))
    # Training steps under DDP (gloo) ran and logged AEM's metrics.
    logs = torch.load(tmp_path / "train_logs.pt")
    assert len(logs) == 2
    assert all(math.isfinite(entry["loss"]) and "aem/alpha_std" in entry for entry in logs)


@pytest.mark.slow
def test_window_mode_groups_all_turns_of_a_task_across_two_processes(tmp_path):
    """env_context="window": a group of 4 episodes (2 per process, different numbers of turns, so the processes hold
    different numbers of rows); AEM's statistics run over every turn of the 4 episodes, as one process would compute
    them; then 2 DDP steps with the loss in parts of one row."""
    launch_two_processes(SCRIPTS / "multiprocess_window.py", tmp_path)
    ranks = [torch.load(tmp_path / f"window_rank{r}.pt") for r in range(2)]
    spans_entropy, spans_rank, spans_row = [], [], []
    for r, data in enumerate(ranks):
        assert data["loss_mask"].size(0) == sum(data["turns"])  # one row per turn
        table = span_mean_entropy(data["entropy"], data["loss_mask"])
        spans_entropy.append(table.response_entropy)
        spans_rank += [r] * table.row.numel()
        spans_row.append(table.row)
    entropy = torch.cat(spans_entropy)
    alpha = aem_coefficients(entropy, torch.zeros(entropy.numel(), dtype=torch.long), min_range=0.0)
    assert entropy.numel() == sum(sum(d["turns"]) for d in ranks) > 4  # every turn of the 4 episodes is a span
    assert alpha.std() > 0
    offset = 0
    for r, data in enumerate(ranks):
        mask = data["loss_mask"].bool()
        for k, row in enumerate(spans_row[r].tolist()):
            got = data["token_alpha"][row][mask[row]]
            torch.testing.assert_close(got, alpha[offset + k].expand(got.numel()))
        offset += spans_row[r].numel()
        # every row carries its episode's advantage
        for episode in range(2):
            assert data["base_advantages"][data["row_episode"] == episode].unique().numel() == 1
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    logs = torch.load(tmp_path / "window_train_logs.pt")
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)


@pytest.mark.slow
def test_gigpo_step_groups_span_two_processes(tmp_path):
    """env_credit="gigpo": a group of 4 episodes, 2 per process. Turn k of every episode sees the same observation,
    so each step group holds steps of both processes; every row's advantage must be its episode's plus omega times the
    step advantage computed over all 4 episodes (as one process would), not over the process's own 2."""
    launch_two_processes(SCRIPTS / "multiprocess_gigpo.py", tmp_path)
    ranks = [torch.load(tmp_path / f"gigpo_rank{r}.pt") for r in range(2)]
    rewards, episode, turn, states = [], [], [], []
    for r, data in enumerate(ranks):
        for e, t in zip(data["row_episode"].tolist(), data["row_turn"].tolist()):
            rewards.append(data["rewards"][e][t])
            episode.append(2 * r + e)
            turn.append(t)
            states.append(data["observations"][e][t])
    episode, turn = torch.tensor(episode), torch.tensor(turn)
    returns = discounted_returns(torch.tensor(rewards, dtype=torch.float64), episode, turn, gamma=0.5)
    step, size = gigpo_step_advantages(returns, torch.zeros_like(episode), anchor_state_ids(states), scale="none")
    assert size[turn == 0].tolist() == [4] * 4  # every episode's first step: one step group over both processes
    assert step.abs().sum() > 0, "the tiny policy's answers gave every step the same return; change the seeds"
    offset = 0
    for data in ranks:
        rows = data["row_episode"].numel()
        expected = data["episode_advantages"].double() + 0.7 * step[offset:offset + rows]
        torch.testing.assert_close(data["combined"].double(), expected, rtol=1e-5, atol=1e-6)
        offset += rows
    # computed over one process's episodes only, the step advantages would differ
    local = episode < 2
    alone, _ = gigpo_step_advantages(returns[local], torch.zeros_like(episode[local]),
                                     anchor_state_ids([s for s, keep in zip(states, local.tolist()) if keep]),
                                     scale="none")
    assert not torch.allclose(alone, step[local])
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["metrics"]["credit/step_group_size_max"] == 4.0
