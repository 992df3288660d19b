"""benchmarks/kv_reuse.py: a quick run writes its JSON; reuse encodes fewer tokens and greedy trajectories match."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_kv_reuse_benchmark(tmp_path):
    out = tmp_path / "kv.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kv_reuse.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["greedy_same_tokens"] is True
    off, on = data["modes"]["re-encode"], data["modes"]["reuse"]
    assert on["tokens_encoded"] < off["tokens_encoded"] and data["encoded_ratio"] > 1.5
    assert on["mean_trajectory_tokens"] == off["mean_trajectory_tokens"]  # fixed-length episodes either way
    assert all(s > 0 for s in off["seconds"] + on["seconds"]) and on["peak_tensor_bytes"] > 0
    assert "speed-up" in result.stdout
