"""benchmarks/learning.py: its statistics against hand-computed values, its tables and plots, and a smoke run."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learning():
    return load_script("benchmarks/learning.py", "learning_benchmark")


def test_one_worker_runs_jobs_in_this_process(learning):
    """``--workers 1``: the jobs run in order in this process; a job's exception reaches the caller from its future,
    as from a process pool."""
    from concurrent.futures import as_completed

    import _common

    pool = _common.job_pool(1)
    assert isinstance(pool, _common.InlineExecutor)
    ran = []
    with pool:
        futures = [pool.submit(ran.append, k) for k in range(3)] + [pool.submit(int, "not a number")]
        assert ran == [0, 1, 2] and all(f.done() for f in futures)
        assert len(list(as_completed(futures))) == 4
    with pytest.raises(ValueError, match="not a number"):
        futures[-1].result()
    pool = _common.job_pool(2)
    assert not isinstance(pool, _common.InlineExecutor)
    pool.shutdown()


def test_permutation_p_value_by_hand(learning):
    # pooled (1, 2, 3, 4), 6 ways to pick 2: mean differences 2, 1, 0, 0, 1, 2 -> two reach |2|: p = 2/6.
    assert learning.permutation_p_value([1, 2], [3, 4]) == pytest.approx(1 / 3)
    # fully separated 5 vs 5: only the observed split and its mirror reach it: 2 / C(10, 5).
    assert learning.permutation_p_value([0.9] * 5, [0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 252)
    # identical samples: every split is at least as extreme.
    assert learning.permutation_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0
    # symmetric in its arguments
    a, b = [0.1, 0.4, 0.35], [0.2, 0.6, 0.7]
    assert learning.permutation_p_value(a, b) == learning.permutation_p_value(b, a)


def test_paired_sign_flip_p_value_by_hand(learning):
    # differences (1, 2): sign-flipped means 1.5, 0.5, -0.5, -1.5 -> two reach |1.5|: p = 2/4.
    assert learning.paired_sign_flip_p_value([2, 4], [1, 2]) == pytest.approx(0.5)
    # 5 seeds all in favour: only all-plus and all-minus reach it: 2/32, the smallest p 5 seeds allow.
    assert learning.paired_sign_flip_p_value([1.0] * 5, [0.0] * 5) == pytest.approx(2 / 32)
    # differences (1, -1, 0): mean 0, every flip is as extreme.
    assert learning.paired_sign_flip_p_value([1, 0, 0], [0, 1, 0]) == 1.0


def test_mean_std(learning):
    assert learning.mean_std([1.0]) == (1.0, 0.0)
    mean, std = learning.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)


def _fake_rows(learning, seeds=3, steps=6):
    step_rows, finals = [], []
    for arm in learning.ARMS:
        for seed in range(seeds):
            for step in range(1, steps + 1):
                row = {"arm": arm.name, "base": arm.base, "aem": int(not arm.is_base), "seed": seed, "step": step}
                row.update({column: 0.1 * step + 0.01 * seed for column in learning.STEP_COLUMNS})
                row["step_time_s"] = 1.0
                step_rows.append(row)
            finals.append({"arm": arm.name, "base": arm.base, "aem": int(not arm.is_base), "seed": seed,
                           "final_success": (0.6 if not arm.is_base else 0.3) + 0.01 * seed,
                           "final_greedy": 0.5, "train_time_s": 1.0})
    warm = [{"seed": s, "warm_start_success": 0.2, "warm_start_greedy": 0.6} for s in range(seeds)]
    return step_rows, finals, warm


def test_summary_table_compares_each_aem_arm_with_its_base(learning):
    _, finals, warm = _fake_rows(learning)
    table = learning.summary_table(finals, warm)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "20.0% ± 0.0%" in lines["warm start (before RL)"]
    assert "(base)" in lines["GRPO"] and "(base)" in lines["DAPO"] and "(base)" in lines["GSPO"]
    # AEM arms: 61% mean (0.60, 0.61, 0.62) vs base 31%: +30 points, wins 3/3, unpaired p = 2 / C(6, 3) = 0.1,
    # paired p = 2 / 2^3 = 0.25
    assert "61.0% ± 1.0%" in lines["AEM-DAPO"]
    cells = [cell.strip() for cell in lines["AEM-DAPO"].split("|")[1:-1]]
    assert cells[2:] == ["+30.0% vs DAPO", "3/3", "0.100", "0.250"]
    assert "vs GRPO" in lines["AEM-GRPO shuffle"]


def test_plots_and_entropy_reading(learning, tmp_path):
    step_rows, _, _ = _fake_rows(learning)
    paths = learning.write_plots(str(tmp_path), step_rows, smooth=3)
    assert [os.path.basename(p) for p in paths] == ["success.png", "entropy.png"]
    for path in paths:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reading = learning.entropy_reading(step_rows)
    grpo = next(line for line in reading.splitlines() if line.startswith("| GRPO |"))
    # seeds 0..2 -> mean offset 0.01; thirds of 6 steps: (1, 2), (3, 4), (5, 6) -> 0.16, 0.36, 0.56
    assert [float(x) for x in grpo.split("|")[2:5]] == pytest.approx([0.16, 0.36, 0.56])


def test_curves_smooth_with_a_trailing_window(learning):
    rows = [{"arm": "GRPO", "seed": 0, "step": s, "success_rate": v} for s, v in zip((1, 3, 5), (0.0, 0.3, 0.6))]
    steps, mean, std = learning._curves(rows, "success_rate", smooth=2)["GRPO"]
    assert steps == [1, 3, 5]
    assert list(mean) == pytest.approx([0.0, 0.15, 0.45]) and list(std) == pytest.approx([0, 0, 0])


@pytest.mark.slow
def test_quick_run_writes_every_output(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick", "--arms", "GRPO,AEM-GRPO",
         "--seeds", "2", "--steps", "2", "--eval-tasks", "4", "--workers", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("steps.csv", "final.csv", "summary.md", "rollout_speed.txt", "run.json", "success.png",
                 "entropy.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["arm"] for r in rows} == {"GRPO", "AEM-GRPO"} and {r["seed"] for r in rows} == {"0", "1"}
    for row in rows:
        assert 0.0 <= float(row["success_rate"]) <= 1.0 and float(row["step_time_s"]) > 0
        if row["arm"] == "GRPO":  # aem_lambda = 0: alpha exactly 1
            assert float(row["alpha_min"]) == float(row["alpha_max"]) == 1.0
        assert math.isfinite(float(row["span_entropy"]))
    with open(out / "final.csv") as handle:
        finals = list(csv.DictReader(handle))
    assert len(finals) == 4
    summary = (out / "summary.md").read_text()
    assert "| AEM-GRPO |" in summary and "vs GRPO" in summary and "turns/s" in summary


def test_report_only_rebuilds_the_summary_from_the_files(learning, tmp_path):
    step_rows, finals, warm = _fake_rows(learning)
    learning.write_csv(str(tmp_path / "steps.csv"), step_rows)
    learning.write_csv(str(tmp_path / "final.csv"), [{**f, "warm_start_success": 0.2, "warm_start_greedy": 0.6}
                                                    for f in finals])
    run = {"command": "python benchmarks/learning.py", "arms": [a.name for a in learning.ARMS], "workers": 2,
           "wall_time_s": 10.0, "cpu": "test cpu", "options": {"seeds": 3, "steps": 6, "tasks_per_step": 2,
           "num_generations": 4, "num_iterations": 2, "learning_rate": 1e-3, "sft_steps": 1, "eval_tasks": 8,
           "hidden_size": 32, "layers": 1}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    speed = {"episodes": 8, "threads": 1, "ratio": 2.0, "batched": {"seconds": 1.0, "turns": 20, "turns_per_s": 20.0},
             "one_at_a_time": {"seconds": 2.0, "turns": 20, "turns_per_s": 10.0}}
    (tmp_path / "rollout_speed.txt").write_text("speed\n" + json.dumps(speed))
    assert learning.main(["--report-only", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "+30.0% vs DAPO | 3/3 | 0.100 | 0.250 |" in summary and "ratio 2.0x" in summary
    assert (tmp_path / "success.png").exists() and (tmp_path / "entropy.png").exists()


def test_unknown_arm_is_rejected(learning):
    with pytest.raises(SystemExit, match="unknown"):
        learning.main(["--arms", "GRPO,PPO"])
