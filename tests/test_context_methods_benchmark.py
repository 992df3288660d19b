"""benchmarks/context_methods.py: the expert transcripts the warm start learns from succeed in every context (so the
formats it teaches are right), and a quick run writes its CSVs, summary and plot for every arm and seed."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_expert_transcripts_in_every_context():
    bench = load_script("benchmarks/context_methods.py", "context_methods")
    opts = dict(bench.QUICK, sft_episodes=6)
    tokenizer = bench._tokenizer()
    rows = bench.sft_rows(tokenizer, opts)  # asserts every expert episode succeeds
    labelled = [tokenizer.decode([t for t in labels if t != -100]) for _, labels, _ in rows]
    assert any("< finding >" in text for text in labelled)  # echo answers carry findings
    assert any("turn" in text and ":" in text for text in labelled)  # selections were trained
    assert all("-100" not in text for text in labelled)
    assert sum(final for _, _, final in rows) == 4 * opts["sft_episodes"]  # one final segment per episode


@pytest.mark.slow
def test_quick_context_methods_benchmark(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "context_methods.py"), "--quick", "--out",
                             str(out), "--workers", "1", "--arms", "full,echo +AEM,window gigpo"],
                            capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = list(csv.DictReader((out / "final.csv").open()))
    assert sorted({(r["arm"], r["seed"]) for r in finals}) == sorted(
        (arm, str(seed)) for arm in ("full", "echo +AEM", "window gigpo") for seed in (0, 1))
    assert all(float(r["final_tokens_per_rollout"]) > 0 for r in finals)
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert {r["arm"] for r in steps} == {"full", "echo +AEM", "window gigpo"}
    assert (out / "success.png").stat().st_size > 0 and "| echo +AEM |" in (out / "summary.md").read_text()
    assert json.loads((out / "run.json").read_text())["options"]["seeds"] == 2
