"""The ``trl-aem`` command line.

Quick, in this process (``trl_aem.cli.main``): help of every command, usage errors, ``env list``, ``eval`` of the
expert; and the installed script's top-level help. Slow (each starts a Python process, 10-30 s on 2 cores): the
installed console script (next to the
interpreter, from ``pip install -e .``) run as a user would, for the same commands and for ``train`` on the tiny CPU
recipe followed by ``eval`` of what it saved, for a full model and for a LoRA adapter launched through accelerate."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_aem.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "tiny-codebreaker-cpu.yaml"
SCRIPT = Path(sys.executable).parent / ("trl-aem.exe" if os.name == "nt" else "trl-aem")
# Overrides that make the tiny recipe a smoke run: 2 RL steps, 2 warm-start steps, 4 held-out tasks.
TINY = ["--max_steps", "2", "--warm_start_steps", "2", "--num_train_tasks", "16", "--eval_tasks", "4",
        "--logging_steps", "1"]
CODEBREAKER = ["--env_kwargs", '{"code_length": 1, "num_symbols": 3, "max_guesses": 3}', "--env_max_turns", "3",
               "--env_max_new_tokens_per_turn", "4", "--env_system_prompt", "you are a helpful agent ."]


def trl_aem(*args, cwd, expect=0) -> subprocess.CompletedProcess:
    """Run the installed ``trl-aem`` script; check its exit code."""
    assert SCRIPT.exists(), f"{SCRIPT} is missing: install the package with `pip install -e .`"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == expect, (result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result


def eval_json_line(stdout: str) -> dict:
    """The ``[eval] json {...}`` line ``trl-aem eval`` prints."""
    lines = [line for line in stdout.splitlines() if line.startswith("[eval] json ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len("[eval] json "):])


HELP_CASES = [
    ([], ["train", "eval", "env", "--version"]),
    (["train"], ["--env_id", "--num_train_tasks", "--eval_tasks", "--prompt", "--tiny_model", "--tiny_hidden_size",
                 "--warm_start_steps", "--model_name_or_path", "--use_peft", "--lora_r", "--lora_target_modules",
                 "--aem_lambda", "--aem_min_entropy_range", "--aem_scope", "--use_aem", "--env_max_turns",
                 "--env_max_new_tokens_per_turn", "--env_kwargs", "--num_generations", "--max_steps", "--output_dir",
                 "--config"]),
    (["eval"], ["--model_name_or_path", "--base_model_name_or_path", "--tiny_model", "--policy", "--env_id",
                "--env_kwargs", "--num_tasks", "--k", "--greedy", "--temperature", "--env_max_turns",
                "--env_max_new_tokens_per_turn", "--max_completion_length", "--prompt", "--env_system_prompt",
                "--output_json", "--config", "{model,expert,random}"]),
    (["env", "list"], ["--json"]),
]


@pytest.mark.parametrize("command, options", HELP_CASES, ids=["top", "train", "eval", "env-list"])
def test_help_lists_every_option_in_process(command, options, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: trl-aem" + "".join(f" {c}" for c in command[:1])), out[:200]
    missing = [option for option in options if option not in out]
    assert not missing, f"{missing} not in the help of {command}:\n{out[:2000]}"


@pytest.mark.parametrize("command, options", [  # the top-level help stays in the quick subset: is the script installed?
    pytest.param(*case, id=name, marks=() if name == "top" else pytest.mark.slow)
    for name, case in zip(["top", "train", "eval", "env-list"], HELP_CASES)])
def test_help_of_the_installed_script(command, options, tmp_path):
    out = trl_aem(*command, "--help", cwd=tmp_path).stdout
    assert out.startswith("usage: trl-aem" + "".join(f" {c}" for c in command[:1])), out[:200]
    missing = [option for option in options if option not in out]
    assert not missing, f"{missing} not in the help of {command}:\n{out[:2000]}"


def test_every_cli_field_has_a_help_string():
    from trl_aem.scripts.eval_agent import EvalArguments
    from trl_aem.scripts.train_agent import AgentArguments

    for cls in (AgentArguments, EvalArguments):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help string"


def test_usage_errors_exit_with_2_in_process(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["trian", "--config", str(RECIPE)]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main(["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["train", "--config", str(RECIPE), "--max_stpes", "3"]) == 2
    err = capsys.readouterr().err
    assert "--max_stpes" in err and "neither a training option" in err
    assert main(["eval", "--policy", "oracle"]) == 2
    assert "invalid choice: 'oracle'" in capsys.readouterr().err
    assert main(["eval"]) == 2  # policy "model" without a model
    assert "--model_name_or_path" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_launch_options_are_split_from_training_options():
    from trl_aem.cli import split_launch_args

    argv = ["--config", str(RECIPE), "--max_steps", "3", "--num_processes", "2", "--accelerate_config", "zero2"]
    launch, script = split_launch_args(argv)
    assert script == ["--config", str(RECIPE), "--max_steps", "3"]
    assert launch[0] == "--config_file" and launch[1].endswith("zero2.yaml") and launch[2:] == ["--num_processes", "2"]
    assert split_launch_args(["--config", str(RECIPE)]) == ([], ["--config", str(RECIPE)])


def test_env_list_in_process(capsys):
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    assert "trl_aem/CodeBreaker-v0" in out and "trl_aem/Household-v0" in out and "trl_aem/Shop-v0" in out
    assert "num_locations=8" in out and "easiest:" in out


def test_eval_of_the_expert_in_process(capsys, tmp_path):
    report = tmp_path / "expert.json"
    assert main(["eval", "--env_id", "trl_aem/CodeBreaker-v0", "--policy", "expert", "--num_tasks", "5",
                 "--output_json", str(report)]) == 0
    assert eval_json_line(capsys.readouterr().out)["success_rate"] == 1.0
    assert json.loads(report.read_text())["result"]["success_rate"] == 1.0


@pytest.mark.slow
def test_unknown_command_exits_with_2(tmp_path):
    result = trl_aem("trian", "--config", RECIPE, cwd=tmp_path, expect=2)
    assert "unknown command 'trian'" in result.stderr and "train, eval, env" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.slow
def test_python_m_trl_aem_is_the_same_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trl_aem", "env", "list", "--json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    envs = json.loads(result.stdout)
    assert set(envs) == {"trl_aem/CodeBreaker-v0", "trl_aem/Household-v0", "trl_aem/Shop-v0"}
    assert envs["trl_aem/CodeBreaker-v0"]["easiest"] == {"code_length": 1, "num_symbols": 3, "max_guesses": 3}
    knobs = envs["trl_aem/CodeBreaker-v0"]["env_kwargs"]
    assert {"code_length", "num_symbols", "max_guesses", "feedback"} <= set(knobs)


@pytest.mark.slow
def test_eval_of_the_scripted_expert(tmp_path):
    out = trl_aem("eval", "--env_id", "trl_aem/Household-v0", "--policy", "expert", "--num_tasks", "5",
                  "--env_max_turns", "30", "--output_json", tmp_path / "expert.json", cwd=tmp_path).stdout
    assert "[eval] success 100.0%" in out
    assert eval_json_line(out)["success_rate"] == 1.0
    saved = json.loads((tmp_path / "expert.json").read_text())
    assert saved["result"]["success_rate"] == 1.0 and len(saved["episodes"]) == 5
    assert saved["settings"]["policy"] == "expert" and saved["settings"]["env_id"] == "trl_aem/Household-v0"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trl-aem train`` on the tiny CPU recipe with smoke-run overrides: (output dir, completed process)."""
    work = tmp_path_factory.mktemp("cli_train")
    out = work / "out"
    return out, trl_aem("train", "--config", RECIPE, *TINY, "--output_dir", out, cwd=work)


@pytest.mark.slow
def test_train_saves_the_model_and_its_results(trained):
    out, result = trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "train_results.json",
                 "eval_results.json", "trainer_state.json"):
        assert (out / name).exists(), name
    assert "[eval] warm start" in result.stdout and "[eval] after RL" in result.stdout
    assert json.loads((out / "train_results.json").read_text())["train_runtime"] > 0
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_tasks"] == 4
    assert 0.0 <= evaluation["before_success_rate"] <= 1.0 and 0.0 <= evaluation["after_success_rate"] <= 1.0
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in logs if "env/success_rate" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all("aem/alpha_std" in entry and "aem/response_entropy_mean" in entry for entry in steps)


@pytest.mark.slow
def test_eval_of_the_saved_model(trained, tmp_path):
    out, _ = trained
    report = tmp_path / "eval.json"
    # The training recipe doubles as the eval config (environment, limits, prompts); its training keys are ignored.
    result = trl_aem("eval", "--config", RECIPE, "--model_name_or_path", out, "--num_tasks", "6", "--greedy", "true",
                     "--output_json", report, cwd=tmp_path)
    assert "ignored" in result.stderr and "max_steps" in result.stderr
    printed = eval_json_line(result.stdout)
    assert f"| model {out} | greedy" in result.stdout
    saved = json.loads(report.read_text())
    assert saved["result"] == printed and printed["num_tasks"] == 6 and printed["policy"] == "model"
    assert saved["settings"]["env_kwargs"] == {"code_length": 1, "num_symbols": 3, "max_guesses": 3}
    assert len(saved["episodes"]) == 6
    for episode in saved["episodes"]:
        assert 1 <= episode["turns"] <= 3 and len(episode["actions"]) == episode["turns"] and episode["error"] is None
    assert 0.0 <= printed["success_rate"] <= 1.0 and 1.0 <= printed["mean_turns"] <= 3.0


@pytest.mark.slow
def test_lora_through_accelerate_launch_then_eval_of_the_adapter(tmp_path):
    out = tmp_path / "lora"
    # --num_processes is an `accelerate launch` option: the CLI relaunches the training script through accelerate.
    trl_aem("train", "--config", RECIPE, "--max_steps", "1", "--warm_start_steps", "1", "--num_train_tasks", "8",
            "--eval_tasks", "0", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules",
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "--num_processes", "1",
            "--output_dir", out, cwd=tmp_path)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    # The base model was built in code and warm-started: it is saved next to the adapter, which points to it.
    assert Path(adapter["base_model_name_or_path"]) == (out / "base_model").resolve()
    assert (out / "base_model" / "model.safetensors").exists()
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    result = trl_aem("eval", "--model_name_or_path", out, *CODEBREAKER, "--num_tasks", "4", cwd=tmp_path)
    printed = eval_json_line(result.stdout)
    assert printed["num_tasks"] == 4 and 1.0 <= printed["mean_turns"] <= 3.0


def test_env_id_with_a_module_imports_it_first(capsys, tmp_path, monkeypatch):
    # gymnasium's "module:EnvId" form: the module registers the environment (as your own package would).
    (tmp_path / "my_cli_test_envs.py").write_text(
        "import gymnasium\nfrom trl_aem.envs import CodeBreaker\n"
        "gymnasium.register(id='my_cli_test_envs/Code-v0', entry_point=CodeBreaker, kwargs={'code_length': 1})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["eval", "--env_id", "my_cli_test_envs:my_cli_test_envs/Code-v0", "--policy", "expert",
                 "--num_tasks", "3"]) == 0
    printed = eval_json_line(capsys.readouterr().out)
    assert printed["env_id"] == "my_cli_test_envs/Code-v0" and printed["success_rate"] == 1.0
