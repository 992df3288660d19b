"""The ``trl-aem`` command line.

Quick, in this process (``trl_aem.cli.main``): help of every command, usage errors (exit code 2: unknown options and
YAML keys, bad values, options before the command), the split of ``accelerate launch`` options (also YAML keys and
``--accelerate_config=NAME``), ``env list``, ``eval`` of the expert and of a LoRA adapter whose folder was moved;
and the installed script's top-level help. Slow (each starts Python processes, 10-60 s on 2 cores): the installed
console script run as a user would, for the same commands and for ``train`` on the tiny CPU recipe followed by
``eval`` of what it saved, for a full model and for a LoRA adapter launched through accelerate (then moved); and
two CPU processes (gloo): DDP through ``python examples/train_agent.py`` with ``num_processes: 2`` in the YAML
file (evaluation printed once), and FSDP2 (in-training evaluation skipped with one warning)."""

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import load_script

from trl_aem.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "tiny-codebreaker-cpu.yaml"
SCRIPT = Path(sys.executable).parent / ("trl-aem.exe" if os.name == "nt" else "trl-aem")
# Overrides that make the tiny recipe a smoke run: 2 RL steps, 2 warm-start steps, 4 held-out tasks.
TINY = ["--max_steps", "2", "--warm_start_steps", "2", "--num_train_tasks", "16", "--eval_tasks", "4",
        "--logging_steps", "1"]
CODEBREAKER = ["--env_kwargs", '{"code_length": 1, "num_symbols": 3, "max_guesses": 3}', "--env_max_turns", "3",
               "--env_max_new_tokens_per_turn", "4", "--env_system_prompt", "you are a helpful agent ."]


# Two CPU processes: accelerate's multi-GPU launcher starts torchrun with gloo when no GPU is visible.
CPU_PROCESSES = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def run_command(command, *args, cwd, expect=0, env=None) -> subprocess.CompletedProcess:
    """Run ``command`` (a list) with ``args``; check its exit code."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", **(env or {}))
    result = subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == expect, (result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result


def trl_aem(*args, cwd, expect=0, env=None) -> subprocess.CompletedProcess:
    """Run the installed ``trl-aem`` script; check its exit code."""
    assert SCRIPT.exists(), f"{SCRIPT} is missing: install the package with `pip install -e .`"
    return run_command([str(SCRIPT)], *args, cwd=cwd, expect=expect, env=env)


def write_recipe(path: Path, **changes) -> Path:
    """The tiny CPU recipe with ``changes`` (a value of None removes the key), written to ``path``."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.update(changes)
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}, sort_keys=False))
    return path


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
    # an option before the command is not dropped
    assert main(["--bogus", "train", "--config", str(RECIPE)]) == 2
    assert "trl-aem: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["train", "--config", str(RECIPE), "--max_stpes", "3"]) == 2
    err = capsys.readouterr().err
    assert "'max_stpes'" in err and "neither a training option" in err
    assert main(["eval", "--policy", "oracle"]) == 2
    assert "invalid choice: 'oracle'" in capsys.readouterr().err
    assert main(["eval"]) == 2  # policy "model" without a model
    assert "--model_name_or_path" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_a_typo_in_a_yaml_recipe_or_a_flag_is_an_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    typo = write_recipe(tmp_path / "typo.yaml", aem_lamda=2.0)
    assert main(["train", "--config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-aem train: error: unknown option(s) or config key(s) 'aem_lamda'"), err
    assert main(["train", "--config", str(RECIPE), "--aem_lamda", "2"]) == 2
    assert "'aem_lamda'" in capsys.readouterr().err
    # a typo next to a real `accelerate launch` key is still caught
    both = write_recipe(tmp_path / "both.yaml", num_processes=2, aem_lamda=2.0)
    assert main(["train", "--config", str(both)]) == 2
    err = capsys.readouterr().err
    assert "'aem_lamda'" in err and "num_processes" not in err
    # the training script run as `python examples/train_agent.py` (no `accelerate launch`): the same errors
    script = load_example_script()
    with pytest.raises(SystemExit) as exit_info:
        script.run_script(["--config", str(typo)])
    assert exit_info.value.code == 2 and "'aem_lamda'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.yaml", "typo.yaml"]  # nothing ran


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "{aem_scope}"], "aem_scope must be one of ['group', 'trajectory', 'batch'], got 'foo'"),
    (["train", "--config", "{recipe}", "--env_max_turns", "0"], "env_max_turns must be an integer >= 1, got 0"),
    (["train", "--config", "{recipe}", "--env_id", "trl_aem/Bogus-v0"], "env_id 'trl_aem/Bogus-v0' is not a"),
    (["train", "--config", "{recipe}", "--num_processes", "2", "--accelerate_config", "bogus"],
     "Accelerate config bogus is neither a file nor a valid config"),
    (["train", "--config", "{recipe}", "--accelerate_config=bogus"], "Accelerate config bogus is neither a file"),
    (["train", "--config", "{recipe}", "--accelerate_config"], "--accelerate_config takes one value"),
    (["train", "--config", "{recipe}", "--multi_gpu", "maybe"], "--multi_gpu of `accelerate launch` is a flag"),
    (["train", "--config", "{recipe}", "--tiny_model", "false"], "set --model_name_or_path (or --tiny_model true)"),
    (["eval", "--policy", "expert", "--num_tasks", "0"], "num_tasks must be >= 1, got 0"),
    (["eval", "--policy", "expert", "--env_kwargs", "not-json"], "env_kwargs must be a JSON object string"),
    (["eval", "--policy", "expert", "--env_id", "no_such_module:x/Y-v0"], "cannot import the module"),
], ids=["yaml-choice", "range", "env-id", "accelerate-config", "accelerate-config=", "accelerate-config-no-value",
        "flag-value", "no-model", "eval-num-tasks", "eval-env-kwargs", "eval-env-module"])
def test_bad_values_are_usage_errors(args, message, capsys, tmp_path, monkeypatch):
    """Values the configuration rejects (its ValueError) print `trl-aem <cmd>: error: <message>`, exit code 2."""
    monkeypatch.chdir(tmp_path)
    bad_choice = write_recipe(tmp_path / "scope.yaml", aem_scope="foo")  # argparse checks no choice of a YAML value
    args = [arg.format(recipe=RECIPE, aem_scope=bad_choice) for arg in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"trl-aem {args[0]}: error: " in err and message in err, err
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["scope.yaml"]  # nothing ran


def test_bf16_follows_the_hardware_when_not_set(tmp_path, monkeypatch):
    """Flags alone (no recipe) on a machine without a bf16 CUDA device: bf16 off instead of TRL's default (on), which
    failed with "Your setup doesn't support bf16/gpu"; a recipe's or a flag's bf16 still wins."""
    import trl_aem.scripts.train_agent as train_agent
    from trl_aem.cli import split_launch_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_agent, "default_bf16", lambda: False)
    argv = ["--env_id", "trl_aem/CodeBreaker-v0", "--model_name_or_path", "X"]
    assert split_launch_args(argv) == ([], argv)  # what `trl-aem train` parses and checks first
    _, training_args, _ = train_agent.make_parser().parse_args_and_config(argv)
    assert training_args.bf16 is False
    flags = ["--bf16", "true", "--use_cpu", "true"]
    _, training_args, _ = train_agent.make_parser().parse_args_and_config(argv + flags)
    assert training_args.bf16 is True
    with_bf16 = write_recipe(tmp_path / "bf16.yaml", bf16=True)
    _, training_args, _ = train_agent.make_parser().parse_args_and_config(["--config", str(with_bf16)])
    assert training_args.bf16 is True
    # with a bf16 CUDA device the default stays TRL's (None: bf16 unless fp16)
    monkeypatch.setattr(train_agent, "default_bf16", lambda: True)
    assert train_agent.make_parser().get_default("bf16") is None


def test_default_bf16_needs_a_cuda_device_with_bf16(monkeypatch):
    import torch

    from trl_aem.scripts.train_agent import default_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_bf16() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert default_bf16() is True  # natively
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert default_bf16() is False  # only emulated (pre-Ampere): float32


def test_the_env_id_is_checked_first(capsys, tmp_path, monkeypatch):
    """A wrong --env_id is the first error, naming the field and pointing to `trl-aem env list`: before the model
    and the training configuration are checked, and before any model is loaded."""
    import trl_aem.scripts.train_agent as train_agent

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_agent, "build_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    bad_scope = write_recipe(tmp_path / "scope.yaml", aem_scope="foo", env_id="trl_aem/CodeBreakr-v0")
    for args in (["--env_id", "trl_aem/CodeBreakr-v0"],  # and no --model_name_or_path
                 ["--env_id", "trl_aem/CodeBreakr-v0", "--model_name_or_path", "X", "--env_max_turns", "0"],
                 ["--config", str(bad_scope)]):
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("trl-aem train: error: env_id 'trl_aem/CodeBreakr-v0' is not a registered gymnasium "
                              "id"), err
        assert "`trl-aem env list`" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["scope.yaml"]  # nothing ran


def test_entry_points_hide_only_known_harmless_noise(tmp_path):
    """transformers' FutureWarnings about the gradient-checkpointing names TRL uses and datasets' progress bars are
    hidden by quiet_known_noise (which the entry points call); other warnings still show."""
    import warnings

    import datasets
    from conftest import base_args

    from trl_aem import AEMGRPOConfig
    from trl_aem.scripts import quiet_known_noise

    def future_warnings(quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                quiet_known_noise()
            AEMGRPOConfig(**base_args(tmp_path))  # TRL's default gradient_checkpointing=True
            warnings.warn("a warning of its own", FutureWarning)
        return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

    assert any("gradient_checkpointing" in message for message in future_warnings(quiet=False))  # the noise exists
    enabled = datasets.is_progress_bar_enabled()
    try:
        assert future_warnings(quiet=True) == ["a warning of its own"]
        assert not datasets.is_progress_bar_enabled()
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_example_script():
    """``examples/train_agent.py`` as a module."""
    return load_script("examples/train_agent.py", "example_train_agent")


def test_launch_options_are_split_from_training_options(tmp_path):
    from trl_aem.cli import split_launch_args

    argv = ["--config", str(RECIPE), "--max_steps", "3", "--num_processes", "2", "--accelerate_config", "zero2"]
    launch, script = split_launch_args(argv)
    assert script == ["--config", str(RECIPE), "--max_steps", "3"]
    assert launch[0] == "--config_file" and launch[1].endswith("zero2.yaml") and launch[2:] == ["--num_processes", "2"]
    assert split_launch_args(["--config", str(RECIPE)]) == ([], ["--config", str(RECIPE)])
    # the `=` form of --accelerate_config and of accelerate's own options
    launch, script = split_launch_args(["--config", str(RECIPE), "--accelerate_config=zero3", "--num_processes=2"])
    assert script == ["--config", str(RECIPE)]
    assert launch[0] == "--config_file" and launch[1].endswith("zero3.yaml") and launch[2:] == ["--num_processes=2"]
    # `accelerate launch` keys in the YAML recipe: passed to the launcher; a YAML boolean of a flag becomes the flag
    recipe = write_recipe(tmp_path / "launch.yaml", num_processes=2, multi_gpu=True, cpu=False,
                          main_process_port=29555, accelerate_config="zero2")
    launch, script = split_launch_args(["--config", str(recipe), "--max_steps", "3"])
    assert script == ["--config", str(recipe), "--max_steps", "3"]
    assert launch[0] == "--config_file" and launch[1].endswith("zero2.yaml")
    assert launch[2:] == ["--num_processes", "2", "--multi_gpu", "--main_process_port", "29555"]
    # flags override the file, --accelerate_config too
    launch, _ = split_launch_args(["--config", str(recipe), "--accelerate_config", "zero3", "--num_processes", "4"])
    assert launch[0] == "--config_file" and launch[1].endswith("zero3.yaml") and "zero2" not in " ".join(launch)
    assert launch[2:] == ["--num_processes", "2", "--multi_gpu", "--main_process_port", "29555", "--num_processes", "4"]


def test_accelerate_keys_are_not_dropped_outside_accelerate_launch(capsys, tmp_path, monkeypatch):
    """The training function in a process that `accelerate launch` did not start cannot apply `num_processes: 2`:
    an error that points to `trl-aem train` (which relaunches), not a silent single-process run."""
    from trl_aem.scripts.train_agent import main as train_main

    monkeypatch.chdir(tmp_path)
    for name in ("TRL_AEM_LAUNCHED", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    recipe = write_recipe(tmp_path / "launch.yaml", num_processes=2)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(recipe)], prog="train")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("train: error: num_processes: `accelerate launch` option")
    assert "trl-aem train" in err
    # in a process started by `accelerate launch` (here: its variables), the key is accepted with a note, and a
    # typo still is an error
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(write_recipe(tmp_path / "typo.yaml", num_processes=2, aem_lamda=2.0))])
    assert exit_info.value.code == 2 and "'aem_lamda'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launch.yaml", "typo.yaml"]  # nothing ran


def test_sharded_weights_are_detected_from_the_arguments_and_accelerate(tmp_path, monkeypatch):
    from trl_aem import AEMGRPOConfig
    from trl_aem.scripts.train_agent import sharded_weights

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    args = AEMGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert sharded_weights(args) is None
    # what `accelerate launch` puts in the environment of the processes it starts
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert sharded_weights(args) is None  # ZeRO-2 shards optimizer states and gradients, not the weights
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert sharded_weights(args) == "DeepSpeed ZeRO-3"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded_weights(args) == "FSDP"


def test_eval_of_a_lora_adapter_whose_output_dir_was_moved(capsys, tmp_path, monkeypatch):
    """`trl-aem train` saves a base model built in code to <output_dir>/base_model, and PEFT records its absolute
    path: after moving the output directory, eval loads the adapter's own base_model folder."""
    from peft import LoraConfig, get_peft_model

    from trl_aem import DEFAULT_PROMPT
    from trl_aem.envs import env_vocabulary
    from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer

    monkeypatch.chdir(tmp_path)
    kwargs = {"code_length": 1, "num_symbols": 3, "max_guesses": 3}
    tokenizer = build_word_tokenizer(env_vocabulary("trl_aem/CodeBreaker-v0", **kwargs) + DEFAULT_PROMPT.split()
                                     + "you are a helpful agent .".split())
    model = build_tiny_qwen2(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, seed=0)
    out = tmp_path / "out"
    base = (out / "base_model").resolve()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model.name_or_path = str(base)  # as scripts/train_agent.py does
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                     task_type="CAUSAL_LM")).save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(out), str(moved))
    assert not base.exists()
    assert main(["eval", "--model_name_or_path", str(moved), *CODEBREAKER, "--num_tasks", "2"]) == 0
    out_text = capsys.readouterr().out
    assert f"on the base model {moved / 'base_model'}" in out_text
    assert eval_json_line(out_text)["num_tasks"] == 2


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
    from trl_aem.envs import _ENTRY_POINTS

    assert set(envs) == set(_ENTRY_POINTS) and {"trl_aem/CodeBreaker-v0", "trl_aem/TextWorld-v0"} <= set(envs)
    assert envs["trl_aem/TextWorld-v0"]["extra"]["name"] == "textworld" and envs["trl_aem/Shop-v0"]["extra"] is None
    assert envs["trl_aem/MiniSWE-v0"]["extra"]["name"] == "miniswe"
    for row in envs.values():  # every optional family says whether its extra is installed, truthfully
        if row["extra"] is not None:
            modules = {"miniswe": ("pytest", "pyseccomp")}.get(row["extra"]["name"], (row["extra"]["name"],))
            assert row["extra"]["installed"] == all(importlib.util.find_spec(m) is not None for m in modules)
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


def printed_evaluations(stdout: str) -> dict[str, dict]:
    """The ``[eval] <stage> success X%  return R  turns T  pass@1 P%  (N tasks x 1)`` lines of ``trl-aem train``."""
    pattern = re.compile(r"^\[eval\] (start|warm start|after RL)\s+success ([\d.]+)%  return (-?[\d.]+)  "
                         r"turns ([\d.]+)  pass@1 ([\d.]+)%  \((\d+) tasks x 1\)$")
    found = {}
    for line in stdout.splitlines():
        match = pattern.match(line)
        if match:
            assert match[1] not in found, f"{match[1]!r} printed twice:\n{stdout}"
            found[match[1]] = {"success_rate": float(match[2]) / 100, "mean_return": float(match[3]),
                               "mean_turns": float(match[4]), "num_tasks": int(match[6])}
    return found


@pytest.mark.slow
def test_train_saves_the_model_and_its_results(trained):
    out, result = trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "train_results.json",
                 "eval_results.json", "trainer_state.json"):
        assert (out / name).exists(), name
    # the folders docs/cli.md lists: the training plots and the warm start's working folder
    assert {"alpha.png", "entropy.png", "reward.png", "success.png"} <= {p.name for p in (out / "plots").iterdir()}
    assert (out / "warm_start").is_dir()
    assert json.loads((out / "train_results.json").read_text())["train_runtime"] > 0
    # the evaluations before and after RL, as printed and as saved
    printed = printed_evaluations(result.stdout)
    assert set(printed) == {"warm start", "after RL"}, result.stdout
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert set(evaluation) == {f"{stage}_{name}" for stage in ("before", "after")
                               for name in ("success_rate", "mean_return", "mean_turns", "pass@1")} | {"eval_tasks"}
    assert evaluation["eval_tasks"] == 4
    for stage, key in (("warm start", "before"), ("after RL", "after")):
        assert printed[stage]["num_tasks"] == 4
        assert evaluation[f"{key}_success_rate"] == pytest.approx(printed[stage]["success_rate"], abs=1e-3)
        assert evaluation[f"{key}_mean_turns"] == pytest.approx(printed[stage]["mean_turns"], abs=5e-3)
        assert evaluation[f"{key}_success_rate"] * 4 == pytest.approx(round(evaluation[f"{key}_success_rate"] * 4))
        assert 1.0 <= evaluation[f"{key}_mean_turns"] <= 3.0  # env_max_turns 3
        # CodeBreaker pays 10 for a solved code and at most 0 otherwise
        assert evaluation[f"{key}_mean_return"] <= 10 * evaluation[f"{key}_success_rate"] + 1e-6
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in logs if "env/success_rate" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all("aem/alpha_std" in entry and "aem/response_entropy_mean" in entry for entry in steps)
    # the console: a progress bar and one summary line, no raw metric dictionary, no known-harmless warning
    assert [line for line in result.stdout.splitlines() if line.startswith("[train] 2 steps")], result.stdout
    for text in (result.stdout, result.stderr):
        assert "{'loss'" not in text and "{'train_runtime'" not in text and "FutureWarning" not in text, text
    assert "success=" in result.stderr and "Tokenizing train dataset" not in result.stderr


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
    assert saved["settings"]["env_max_new_tokens_per_turn"] == 4  # the recipe's, not the default 64
    assert saved["settings"]["env_system_prompt"] == "you are a helpful agent ."
    episodes = saved["episodes"]
    assert len(episodes) == 6 and [e["seed"] for e in episodes] == list(range(100_000, 100_006))
    for episode in episodes:
        assert 1 <= episode["turns"] <= 3 and len(episode["actions"]) == episode["turns"] and episode["error"] is None
    assert printed["success_rate"] == pytest.approx(sum(e["success"] for e in episodes) / 6)
    assert printed["mean_turns"] == pytest.approx(sum(e["turns"] for e in episodes) / 6)
    assert printed["mean_return"] == pytest.approx(sum(e["return"] for e in episodes) / 6)
    # k attempts per task: num_tasks * k episodes, pass@k from them
    report_k = tmp_path / "eval_k.json"
    trl_aem("eval", "--config", RECIPE, "--model_name_or_path", out, "--num_tasks", "3", "--k", "2",
            "--output_json", report_k, cwd=tmp_path)
    saved = json.loads(report_k.read_text())
    assert saved["result"]["num_tasks"] == 3 and saved["result"]["k"] == 2 and len(saved["episodes"]) == 3 * 2
    assert sorted(e["seed"] for e in saved["episodes"]) == [100_000, 100_000, 100_001, 100_001, 100_002, 100_002]
    solved = {e["seed"] for e in saved["episodes"] if e["success"]}
    assert saved["result"]["pass@2"] == pytest.approx(len(solved) / 3)  # n = k = 2: a task counts if either succeeds
    # the same settings with the scripted expert: every task solved
    expert = eval_json_line(trl_aem("eval", "--config", RECIPE, "--policy", "expert", "--num_tasks", "6",
                                    cwd=tmp_path).stdout)
    assert expert["success_rate"] == 1.0 and expert["num_tasks"] == 6 and 1.0 <= expert["mean_turns"] <= 3.0


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
    # Move the output directory: the recorded absolute path is gone, eval uses the adapter's own base_model folder.
    moved = tmp_path / "moved" / "lora"
    shutil.move(str(out), str(moved))
    result = trl_aem("eval", "--model_name_or_path", moved, *CODEBREAKER, "--num_tasks", "4", "--greedy", "true",
                     cwd=tmp_path)
    assert f"on the base model {moved / 'base_model'}" in result.stdout
    assert eval_json_line(result.stdout)["num_tasks"] == 4


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_from_the_yaml_evaluates_once(tmp_path):
    """`python examples/train_agent.py` with `num_processes: 2` (and `multi_gpu: true`) in the YAML recipe:
    relaunched through `accelerate launch` (torchrun + gloo on CPU), not silently run as one process; the held-out
    evaluation runs on the main process only, so each result is printed once."""
    recipe = write_recipe(tmp_path / "ddp.yaml", num_processes=2, multi_gpu=True, num_machines=1,
                          mixed_precision="no", dynamo_backend="no", main_process_port=29517)
    out = tmp_path / "out"
    result = run_command([sys.executable, str(ROOT / "examples" / "train_agent.py")], "--config", recipe, *TINY,
                         "--per_device_train_batch_size", "16", "--output_dir", out, cwd=tmp_path, env=CPU_PROCESSES)
    printed = printed_evaluations(result.stdout)  # asserts each stage was printed once
    assert set(printed) == {"warm start", "after RL"} and printed["after RL"]["num_tasks"] == 4, result.stdout
    assert result.stdout.count("[train] saved the model") == 1
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["after_success_rate"] == pytest.approx(printed["after RL"]["success_rate"], abs=1e-3)
    # two processes: each step takes 2 x 16 episodes = 4 tasks of 16, a quarter epoch (one process: an eighth)
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in logs if "env/success_rate" in entry]
    assert [entry["step"] for entry in steps] == [1, 2] and [entry["epoch"] for entry in steps] == [0.25, 0.5]


@pytest.mark.slow
def test_fsdp_skips_the_in_training_evaluation_with_one_warning(tmp_path):
    """FSDP2 on two CPU processes: no process holds the whole model, so the evaluation before and after RL is
    skipped with one warning naming `trl-aem eval`, and that command evaluates the saved model afterwards.
    Generation runs in chunks of 5 episodes (env_generation_chunk_size): FSDP synchronises every generate call
    across processes, so a process with fewer unfinished episodes in a turn makes dummy calls (no deadlock)."""
    out = tmp_path / "out"
    result = trl_aem("train", "--config", RECIPE, "--max_steps", "1", "--warm_start_steps", "0", "--num_train_tasks",
                     "16", "--eval_tasks", "4", "--per_device_train_batch_size", "16", "--output_dir", out,
                     "--env_generation_chunk_size", "5",
                     "--accelerate_config", "fsdp2", "--num_processes", "2", "--mixed_precision", "no",
                     "--main_process_port", "29518", cwd=tmp_path, env=CPU_PROCESSES)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("[eval] warning:")]
    assert len(warnings) == 1 and "(FSDP)" in warnings[0] and "trl-aem eval" in warnings[0], result.stderr[-3000:]
    assert not printed_evaluations(result.stdout) and not (out / "eval_results.json").exists()
    assert (out / "model.safetensors").exists() and (out / "trainer_state.json").exists()
    printed = eval_json_line(trl_aem("eval", "--config", RECIPE, "--model_name_or_path", out, "--num_tasks", "2",
                                     cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}).stdout)
    assert printed["num_tasks"] == 2 and 1.0 <= printed["mean_turns"] <= 3.0


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
