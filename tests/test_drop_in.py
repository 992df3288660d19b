"""Drop-in: an ordinary GRPO script in which only the two class names change runs unmodified, with AEM on."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "plain_grpo.py"


def run(source: str, tmp_path: Path) -> str:
    path = tmp_path / "script.py"
    path.write_text(source)
    result = subprocess.run([sys.executable, str(path), str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_swapping_the_two_class_names_gives_aem(tmp_path):
    source = SCRIPT.read_text()
    plain = run(source, tmp_path)
    assert "TRAINER GRPOTrainer" in plain and "aem/alpha_mean" not in plain
    swapped = (source.replace("from trl import GRPOConfig, GRPOTrainer",
                              "from trl_aem import AEMGRPOConfig, AEMGRPOTrainer")
               .replace("GRPOConfig(", "AEMGRPOConfig(").replace("GRPOTrainer(", "AEMGRPOTrainer("))
    assert swapped.count("AEM") == 4  # the import line and the two constructor calls: nothing else changed
    aem = run(swapped, tmp_path)
    assert "TRAINER AEMGRPOTrainer" in aem
    assert "'aem/alpha_mean'" in aem and "'aem/gated_frac'" in aem
