"""Every notebook in examples/notebooks runs top to bottom on CPU (nbclient, a python3 kernel of this interpreter),
writes nothing into the repository, and shows what it claims: each ends with one JSON summary line checked here.
The GPU section of each is opt-in (RUN_ON_GPU=1); without it the first cell switches the Hugging Face Hub off."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "examples" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
WHICH_PYTHON = "import sys; print('KERNEL_PYTHON', sys.prefix)"
GPU_HEADING = "## On a GPU with a real model"
GPU_SKIPPED = "GPU section skipped (opt in: RUN_ON_GPU=1 on a machine with a GPU)."
OPT_IN = 'RUN_ON_GPU = os.environ.get("RUN_ON_GPU") == "1" and torch.cuda.is_available()'


def run_notebook(path: Path) -> tuple[nbformat.NotebookNode, list[str]]:
    """Execute a notebook with its folder as the working directory (as Jupyter would); return it and its stdout lines.

    A first cell, added in memory only, prints the kernel interpreter's ``sys.prefix`` (the virtualenv it runs in).
    """
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(WHICH_PYTHON))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    lines = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                lines.extend(output["text"].splitlines())
    return nb, lines


def summary_of(lines: list[str]) -> dict:
    """The JSON summary line a notebook prints last."""
    summaries = [json.loads(line) for line in lines if line.startswith('{"notebook"')]
    assert len(summaries) == 1, lines[-20:]
    return summaries[0]


def test_notebooks_are_stored_without_outputs_and_with_a_guarded_gpu_section():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_multi_turn_agent.ipynb",
                                           "03_lora_recipe_1p5b.ipynb", "04_custom_environment.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), path.name
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), path.name
        # opt-in GPU section; the Hub is switched off only when it does not run (it downloads a model)
        assert OPT_IN in code[0].source, path.name
        assert 'if not RUN_ON_GPU:\n    os.environ["HF_HUB_OFFLINE"] = "1"' in code[0].source, path.name
        headings = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown" and GPU_HEADING in cell.source]
        assert len(headings) == 1, path.name
        assert "RUN_ON_GPU=1" in nb.cells[headings[0]].source, path.name  # the heading says how to turn it on
        gpu_cell = nb.cells[headings[0] + 1]
        assert gpu_cell.cell_type == "code" and gpu_cell.source.startswith("if RUN_ON_GPU:"), path.name
        assert gpu_cell.source.endswith(f'print("{GPU_SKIPPED}")'), path.name
        for cell in code:
            if "GRPOConfig(" in cell.source and cell is not gpu_cell:  # every CPU config: the CPU settings
                assert all(s in cell.source for s in ('bf16=False', 'use_cpu=True', 'report_to="none"')), path.name


@pytest.mark.parametrize("requested", [None, "0", "1"], ids=["unset", "RUN_ON_GPU=0", "RUN_ON_GPU=1"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_gpu_section_is_opt_in_and_the_hub_is_off_without_it(path, requested, monkeypatch):
    """The first cell, run here: the GPU section runs only when asked for (RUN_ON_GPU=1) on a GPU; otherwise the
    Hub is switched off (and when it runs, HF_HUB_OFFLINE is left as the environment has it, so it can download)."""
    import torch

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # restored after the test
    if requested is None:
        monkeypatch.delenv("RUN_ON_GPU", raising=False)
    else:
        monkeypatch.setenv("RUN_ON_GPU", requested)
    first = next(cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")
    namespace = {}
    exec(compile(first.source, f"{path.name}:first cell", "exec"), namespace)
    shutil.rmtree(namespace["OUTPUT_DIR"])
    runs = requested == "1" and torch.cuda.is_available()
    assert namespace["RUN_ON_GPU"] is runs
    assert os.environ.get("HF_HUB_OFFLINE") == (None if runs else "1")


def check_quickstart(summary, nb):
    assert summary["grpo_trainer"] == "GRPOTrainer" and summary["aem_trainer"] == "AEMGRPOTrainer"
    assert summary["grpo_logged_aem"] is False
    assert summary["aem_steps"] == [1, 2, 3, 4]
    metrics = summary["aem_metrics"]
    assert abs(metrics["aem/alpha_mean"] - 1.0) < 1e-4  # alpha averages to 1 within each group
    assert metrics["aem/alpha_std"] >= 0 and 0 <= metrics["aem/gated_frac"] <= 1
    assert metrics["aem/alpha_min"] <= 1.0 <= metrics["aem/alpha_max"]
    assert metrics["aem/response_entropy_mean"] > 0
    if all(frac == 1.0 for frac in summary["gated_frac"]):  # fully gated AEM is GRPO, step for step
        assert summary["rewards_match_grpo"]
    assert summary["ungated"]["aem/alpha_std"] > 0.01 and summary["ungated"]["aem/gated_frac"] == 0.0
    per_step = summary["per_step"]
    assert [entry["step"] for entry in per_step["gated"]] == [entry["step"] for entry in per_step["ungated"]] == [
        1, 2, 3, 4]
    for entry in per_step["gated"] + per_step["ungated"]:
        assert abs(entry["aem/alpha_mean"] - 1.0) < 1e-5, entry  # alpha averages to 1 within each group
    for entry in per_step["gated"]:
        if entry["aem/gated_frac"] == 1.0:  # every group gated: alpha = 1 everywhere
            assert entry["aem/alpha_std"] < 1e-6, entry
    for entry in per_step["ungated"]:  # no gate: every step modulates
        assert entry["aem/alpha_std"] > 0 and entry["aem/gated_frac"] == 0.0, entry


def check_multi_turn(summary, nb):
    success = summary["success"]
    assert success["expert"] == 1.0 and success["untrained"] == 0.0
    assert set(success) == {"expert", "random", "untrained", "warm_start", "after_rl"}
    assert summary["logged_steps"] == [1, 2, 3, 4, 5, 6]
    assert summary["last_log"]["entropy"] > 0 and summary["last_log"]["aem/response_entropy_mean"] > 0
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the figure with the three panels


def check_lora(summary, nb):
    assert summary["model"] == "Qwen/Qwen2.5-1.5B-Instruct" and summary["recipe"] == "qwen2.5-1.5b-household-lora.yaml"
    assert summary["num_generations"] == 8 and summary["generation_batch_size"] == 128 and summary["lora_r"] == 64
    assert summary["lora_target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    assert summary["cpu_steps"] == [1, 2]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(summary["adapter_files"])
    assert "model.safetensors" not in summary["adapter_files"]
    assert summary["merged_class"] == "Qwen2ForCausalLM" and summary["merge_max_abs_error"] < 1e-4
    # the two steps had reward spread, so the adapter moved: lora_B starts at 0, and the merged model is not the base
    assert max(summary["cpu_reward_std"]) > 0 and summary["lora_b_norm"] > 0
    assert summary["adapter_max_abs_effect"] > 100 * summary["merge_max_abs_error"]


def check_custom_env(summary, nb):
    assert summary["registered"] and summary["env_id"] == "my_envs/Counter-v0"
    assert summary["expert_success"] == 1.0 and summary["protocol_error_caught"]
    assert summary["trained_steps"] == [1, 2, 3] and summary["aem_logged"]
    # the expert solves every task, also built from a factory instead of a registered id
    assert summary["baselines"]["expert"] == 1.0 and summary["baselines"]["factory"] == 1.0
    assert set(summary["evaluations"]) == set(summary["success"]) == {"untrained", "warm_start", "after_rl"}
    for name, evaluation in summary["evaluations"].items():
        assert evaluation["num_tasks"] == evaluation["episodes"] == 30, name
        assert evaluation["success_rate"] == summary["success"][name] == evaluation["episode_success_rate"], name
        assert 1.0 <= evaluation["mean_turns"] <= 4.0, name  # max_turns=4
    assert {"env/success_rate", "env/turns_mean", "env/invalid_action_rate", "aem/alpha_mean", "aem/alpha_std",
            "aem/gated_frac", "reward", "entropy"} <= set(summary["log_keys"])
    assert all(1.0 <= turns <= 4.0 for turns in summary["turns_per_step"])


CHECKS = {"01_quickstart": check_quickstart, "02_multi_turn_agent": check_multi_turn,
          "03_lora_recipe_1p5b": check_lora, "04_custom_environment": check_custom_env}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_cpu(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RUN_ON_GPU", "0")  # the GPU section downloads a real model: never in tests
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    before = {p.relative_to(ROOT) for p in NOTEBOOK_DIR.rglob("*")}
    nb, lines = run_notebook(path)
    kernel_prefix = [line.split(" ", 1)[1] for line in lines if line.startswith("KERNEL_PYTHON ")]
    assert kernel_prefix == [sys.prefix], (kernel_prefix, sys.prefix)  # the kernel runs this interpreter's environment
    assert any(line == GPU_SKIPPED for line in lines)
    assert {p.relative_to(ROOT) for p in NOTEBOOK_DIR.rglob("*")} == before, "the notebook wrote into the repository"
    summary = summary_of(lines)
    assert summary["notebook"] == path.stem
    CHECKS[path.stem](summary, nb)
