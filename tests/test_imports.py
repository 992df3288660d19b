"""``import trl_aem`` is light (torch, transformers and TRL load on first use of a name that needs them), so
``trl-aem --help``, ``trl-aem env list`` and usage errors start quickly; every public name still imports."""

import json
import os
import subprocess
import sys

import gymnasium
import pytest

import trl_aem

HEAVY = ("trl", "transformers", "torch")


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return the JSON object it prints last."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


CLI_CODE = f"""
import contextlib, io, json, sys
from trl_aem.cli import main

codes = {{}}
for argv in (["--help"], ["--version"], ["env", "list"], ["env", "list", "--json"], ["env"], ["bogus"],
             ["--bogus"]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            codes[" ".join(argv)] = main(argv)
        except SystemExit as exc:
            codes[" ".join(argv)] = exc.code
    if argv == ["--help"]:
        assert "trl-aem train" in out.getvalue(), out.getvalue()
    if argv == ["env", "list"]:
        assert "trl_aem/Household-v0" in out.getvalue(), out.getvalue()
print(json.dumps({{"codes": codes, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_help_env_list_and_usage_errors_do_not_import_trl_or_transformers():
    printed = run_python(CLI_CODE)
    assert printed["loaded"] == [], f"{printed['loaded']} imported by trl-aem --help / env list / a usage error"
    assert printed["codes"] == {"--help": 0, "--version": 0, "env list": 0, "env list --json": 0, "env": 0,
                                "bogus": 2, "--bogus": 2}


def test_import_registers_the_builtin_envs_without_torch():
    printed = run_python(
        "import json, sys, gymnasium\n"
        "import trl_aem\n"
        "registered = 'trl_aem/Household-v0' in gymnasium.registry\n"
        "observation, _ = gymnasium.make('trl_aem/CodeBreaker-v0').reset(seed=0)\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "from trl_aem import AEMGRPOTrainer\n"  # the first use of a heavy name imports TRL
        "print(json.dumps({'registered': registered, 'loaded': loaded, 'version': trl_aem.__version__,\n"
        "                  'after': [m for m in ('trl', 'transformers') if m in sys.modules],\n"
        "                  'trainer': AEMGRPOTrainer.__module__}))\n")
    assert printed["registered"] and printed["loaded"] == []
    assert printed["version"] == trl_aem.__version__
    assert printed["after"] == ["trl", "transformers"] and printed["trainer"] == "trl_aem.trainer"


def test_every_public_name_resolves():
    from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: F401  (the drop-in import keeps working)
    from trl_aem.config import AEMGRPOConfig as config_class
    from trl_aem.trainer import AEMGRPOTrainer as trainer_class

    assert AEMGRPOTrainer is trainer_class and AEMGRPOConfig is config_class
    assert isinstance(trl_aem.__version__, str) and trl_aem.__version__
    assert len(set(trl_aem.__all__)) == len(trl_aem.__all__)
    for name in trl_aem.__all__:
        assert getattr(trl_aem, name) is not None, name
        assert name in dir(trl_aem), name
    namespace = {}
    exec("from trl_aem import *", namespace)
    assert set(trl_aem.__all__) <= set(namespace)
    # submodules are attributes too, as when the package imported them all
    assert trl_aem.trainer.AEMGRPOTrainer is AEMGRPOTrainer and trl_aem.tiny.build_tiny_qwen2
    assert "trl_aem/Shop-v0" in gymnasium.registry
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        trl_aem.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from trl_aem import no_such_name  # noqa: F401
