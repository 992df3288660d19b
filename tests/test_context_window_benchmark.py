"""benchmarks/context_window.py: a quick run writes its JSON and plot; window rows are one per turn, and the
window's rollout encodes fewer tokens than the full context once episodes are long."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_context_window_benchmark(tmp_path):
    out, png = tmp_path / "cw.json", tmp_path / "cw.png"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "context_window.py"), "--quick", "--json",
                             str(out), "--plot", str(png)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert png.stat().st_size > 0
    episodes = data["settings"]["episodes"]
    for turns, modes in data["runs"].items():
        assert modes["full"]["rows"] == episodes and modes["window"]["rows"] == episodes * int(turns)
        for run in modes.values():
            assert run["peak_tensor_bytes"] > 0 and run["loss_tokens"] > 0 and run["median_seconds"] > 0
    longest = data["runs"][str(max(int(t) for t in data["runs"]))]
    assert longest["window"]["rollout_tokens"] < longest["full"]["rollout_tokens"]
