"""Train an agent with AEM on a gymnasium text environment, TRL-style: command-line flags or a YAML recipe.

    # a tiny model built in code, on CPU (about 1 minute)
    trl-aem train --config examples/recipes/tiny-codebreaker-cpu.yaml
    # Qwen2.5-1.5B-Instruct with LoRA on one GPU, the paper's settings
    trl-aem train --config examples/recipes/qwen2.5-1.5b-household-lora.yaml
    # any field can be overridden on the command line
    trl-aem train --config examples/recipes/qwen2.5-1.5b-household-lora.yaml --max_steps 10

Every field of AEMGRPOConfig (TRL's GRPOConfig + AEM + env_*), TRL's ModelConfig (model, dtype, LoRA) and
:class:`AgentArguments` can be set in the YAML file or as --flags; ``--help`` lists them all. A key or flag that is
none of these is an error, unless it is an option of ``accelerate launch`` (``num_processes: 4``): then
``trl-aem train`` (and ``python examples/train_agent.py`` / ``python -m trl_aem.scripts.train_agent``, which run
the same command) relaunch the script through ``accelerate launch`` with it. Under ``accelerate launch ... script``
the launcher's own command line applies, and such keys of the YAML file are accepted (with a note: they are not
applied there).

What ends up in ``output_dir``: the trained model (or, with ``use_peft``, the LoRA adapter) and its tokenizer,
``train_results.json`` (TRL's training metrics), ``eval_results.json`` (held-out success before and after RL, when
``eval_tasks > 0``), ``trainer_state.json`` (the whole log history, AEM and env metrics included), ``plots/``
(PNG training curves, with ``aem_plots``, the default) and, with ``warm_start_steps > 0``, ``warm_start/`` (the
output folder of the supervised warm start's ``SFTTrainer``). When LoRA sits on a model that was built in code
(``tiny_model``) or changed by the warm start, that base model is saved to ``output_dir/base_model`` and the adapter
points to it, so ``trl-aem eval --model_name_or_path <output_dir>`` works (also after moving ``output_dir``).

The held-out evaluation before and after RL runs on the main process only (the others wait). With sharded weights
(DeepSpeed ZeRO-3, FSDP) it is skipped, with a warning: evaluate the saved model with ``trl-aem eval`` afterwards.

``--resume_from_checkpoint PATH`` (or ``last``: the newest ``checkpoint-*`` in ``output_dir``) continues a run that
stopped (even one killed with SIGKILL) from that checkpoint, with the same command line: weights, optimizer and
scheduler, random states (TRL's and AEM's), data order and so the environments' task seeds are restored, and the
steps after it log what an uninterrupted run logs (tests/test_resume.py). The warm start and the evaluation before
RL are skipped then (the checkpoint holds the warm-started model; with LoRA its base is read from
``output_dir/base_model``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from accelerate import PartialState  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402
from trl import ModelConfig, TrlParser, get_peft_config  # noqa: E402

from ..agents import (  # noqa: E402
    DEFAULT_PROMPT,
    EvalResult,
    evaluate,
    expert_sft_dataset,
    make_env_dataset,
    warm_start,
)
from ..config import AEMGRPOConfig, parse_env_kwargs  # noqa: E402
from ..envs import resolve_env_id  # noqa: E402
from ..tiny import build_agent_tokenizer, build_tiny_qwen2  # noqa: E402
from ..context import context_policy_from_args  # noqa: E402
from . import quiet_known_noise, usage_error  # noqa: E402

#: First seed of the expert trajectories used for the warm start (apart from training and evaluation seeds).
WARM_START_SEED_OFFSET = 1_000_000


@dataclass
class AgentArguments:
    """What to train on, and how to evaluate."""

    # (not `env`: TRL's YAML configs reserve that key for environment variables)
    env_id: str = field(
        default="trl_aem/CodeBreaker-v0",
        metadata={"help": "gymnasium id of the environment; `module:id` imports `module` first (e.g. the module of "
                          "your own environments that calls gymnasium.register)"},
    )
    num_train_tasks: int = field(default=2400, metadata={"help": "training tasks (seeds 0 ... N-1)"})
    eval_tasks: int = field(default=100, metadata={"help": "held-out evaluation tasks before and after (0: skip)"})
    eval_env_kwargs: dict | str | None = field(
        default=None, metadata={"help": "env_kwargs of the held-out evaluation, over the training ones (a dict or JSON "
                                        "string), e.g. {\"split\": \"valid_unseen\"} for ALFWorld's unseen games"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "generic instruction before the first observation"})
    tiny_model: bool = field(default=False, metadata={"help": "build a tiny Qwen2 + word tokenizer in code (CPU)"})
    tiny_hidden_size: int = field(default=128, metadata={"help": "hidden size of the tiny model"})
    warm_start_steps: int = field(default=0, metadata={"help": "supervised steps on expert trajectories before RL"})
    warm_start_tasks: int = field(default=200, metadata={"help": "expert episodes (tasks) the warm start learns from"})

    def __post_init__(self):
        # Parsed before the training configuration, so a wrong id is the first error, before any model is loaded.
        resolve_env_id(self.env_id)  # imports `module` of `module:id`; ValueError naming env_id if unknown
        self.eval_env_kwargs = parse_env_kwargs(self.eval_env_kwargs, "eval_env_kwargs")
        if isinstance(self.warm_start_tasks, bool) or not isinstance(self.warm_start_tasks, int) \
                or self.warm_start_tasks < 1:
            raise ValueError(f"warm_start_tasks must be an integer >= 1, got {self.warm_start_tasks!r}")


def default_bf16() -> bool:
    """Whether training should use bf16 when the user did not say: only with a CUDA device that supports bf16 natively
    (TRL's ``GRPOConfig`` defaults to bf16, which fails on a machine without one)."""
    import torch

    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without `including_emulation`
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def make_parser(prog: str | None = None) -> TrlParser:
    """The argument parser of the training script: AgentArguments, AEMGRPOConfig and TRL's ModelConfig.

    ``bf16``, when neither the recipe nor a flag sets it, follows the hardware (:func:`default_bf16`): off without a
    CUDA device that supports bf16, else TRL's default (on, unless ``fp16``).
    """
    parser = TrlParser(
        (AgentArguments, AEMGRPOConfig, ModelConfig),
        prog=prog,
        description="Train an agent with AEM-GRPO on a gymnasium text environment. Every option below can also be "
                    "set in a YAML recipe passed with --config (flags override the recipe).",
    )
    if not default_bf16():
        parser.set_defaults(bf16=False)  # a recipe's `bf16:` and a --bf16 flag still override it
    return parser


def build_model_and_tokenizer(agent_args: AgentArguments, training_args: AEMGRPOConfig, model_args: ModelConfig):
    """Load ``model_name_or_path`` (or build the tiny model in code) and its tokenizer."""
    if agent_args.tiny_model:
        tokenizer = build_agent_tokenizer(agent_args.env_id, training_args.env_kwargs, agent_args.prompt,
                                          training_args.env_system_prompt)
        model = build_tiny_qwen2(tokenizer, hidden_size=agent_args.tiny_hidden_size, seed=training_args.seed)
        return model, tokenizer
    if model_args.model_name_or_path is None:
        raise ValueError("set --model_name_or_path (or --tiny_model true)")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=model_args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype or "auto",
        attn_implementation=model_args.attn_implementation, trust_remote_code=model_args.trust_remote_code,
    )
    return model, tokenizer


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def sharded_weights(training_args: AEMGRPOConfig, trainer=None) -> str | None:
    """``"DeepSpeed ZeRO-3"`` or ``"FSDP"`` when the model's weights are sharded across processes, else ``None``.

    Read from the trainer once it exists (``is_fsdp_enabled``, ``is_deepspeed_enabled`` and the accelerator's ZeRO
    stage), and before that from the training arguments (``fsdp``, ``deepspeed``) and from what ``accelerate launch``
    puts in the environment of the processes it starts (``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``,
    ``ACCELERATE_DEEPSPEED_ZERO_STAGE``).
    """
    if trainer is not None:
        if getattr(trainer, "is_fsdp_enabled", False):
            return "FSDP"
        if getattr(trainer, "is_deepspeed_enabled", False):
            plugin = trainer.accelerator.state.deepspeed_plugin
            if plugin is not None and plugin.zero_stage == 3:
                return "DeepSpeed ZeRO-3"
    from transformers.integrations import is_deepspeed_zero3_enabled

    plugin = getattr(training_args, "deepspeed_plugin", None)
    if (is_deepspeed_zero3_enabled() or (plugin is not None and getattr(plugin, "zero_stage", None) == 3)
            or (_env_true("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")):
        return "DeepSpeed ZeRO-3"
    if getattr(training_args, "fsdp", None) or _env_true("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def resume_checkpoint(training_args: AEMGRPOConfig) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names: a folder, or ``last``/``true`` for the newest
    ``checkpoint-*`` folder of ``output_dir``; None when not resuming. Raises ``ValueError`` when there is none."""
    value = training_args.resume_from_checkpoint
    word = str(value).strip().lower() if value is not None else ""
    if word in ("", "false", "no", "none"):
        return None
    if word in ("last", "true", "yes"):
        output_dir = training_args.output_dir
        found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            raise ValueError(f"resume_from_checkpoint={value!r}: there is no checkpoint-* folder in {output_dir!r}")
        return found
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint {value!r} is not a folder (a checkpoint-* folder, or 'last')")
    return value


def train(agent_args: AgentArguments, training_args: AEMGRPOConfig, model_args: ModelConfig):
    """Build the model, optionally warm-start it, train it with AEM in the environment, evaluate, save.

    Returns the :class:`~trl_aem.AEMGRPOTrainer` after training.
    """
    from ..trainer import AEMGRPOTrainer

    agent_args.env_id = resolve_env_id(agent_args.env_id)  # `module:id` -> id (imports module)
    env_kwargs = training_args.env_kwargs or {}
    eval_env_kwargs = {**env_kwargs, **(agent_args.eval_env_kwargs or {})}  # e.g. a held-out split
    model, tokenizer = build_model_and_tokenizer(agent_args, training_args, model_args)
    results: dict[str, EvalResult] = {}

    is_main_process = training_args.process_index == 0
    sharded = sharded_weights(training_args)
    skip_warned = False

    def skip_evaluation(backend: str) -> bool:
        """With sharded weights no single process holds the model: warn once (main process), and skip."""
        nonlocal skip_warned
        if is_main_process and not skip_warned:
            print(f"[eval] warning: the held-out evaluation before and after RL (eval_tasks={agent_args.eval_tasks}) "
                  f"is skipped: the weights are sharded across processes ({backend}), and it generates with the "
                  "whole model on one process. Evaluate the saved model afterwards: `trl-aem eval --config <recipe> "
                  f"--model_name_or_path {training_args.output_dir}`.", file=sys.stderr, flush=True)
        skip_warned = True
        return True

    def report(stage: str, key: str, backend: str | None):
        """Evaluate on held-out tasks: on the main process only (the others wait), or not at all when sharded."""
        if agent_args.eval_tasks <= 0 or (backend is not None and skip_evaluation(backend)):
            return
        if is_main_process:
            # Plain model.generate on the unwrapped model: no collective, so the other processes need not take part.
            device = training_args.device
            if device.type != "cpu" and next(model.parameters()).device.type == "cpu":
                model.to(device)  # evaluate a freshly loaded model on the accelerator, not on the CPU
            result = evaluate(agent_args.env_id, "model", model=model, tokenizer=tokenizer,
                              num_tasks=agent_args.eval_tasks, env_kwargs=eval_env_kwargs, greedy=False,
                              temperature=training_args.temperature, max_turns=training_args.env_max_turns,
                              max_new_tokens_per_turn=training_args.env_max_new_tokens_per_turn,
                              max_completion_length=training_args.max_completion_length,
                              prompt=agent_args.prompt, system_prompt=training_args.env_system_prompt,
                              context=context_policy_from_args(training_args),
                              history_turns=training_args.env_history_turns,
                              prompt_format=training_args.env_prompt_format,
                              invalid_action_penalty=training_args.env_invalid_action_penalty)
            results[key] = result
            print(f"[eval] {stage:<12} {result}", flush=True)
        if training_args.world_size > 1:
            PartialState().wait_for_everyone()  # every process calls it: the others wait for the evaluation

    resume = resume_checkpoint(training_args)
    peft_config = get_peft_config(model_args)
    base_dir = os.path.abspath(os.path.join(training_args.output_dir, "base_model"))
    if resume is not None:
        if agent_args.warm_start_steps > 0 and peft_config is not None:
            if not os.path.isdir(base_dir):
                raise ValueError(f"resuming a LoRA run with a warm start needs its base model in {base_dir}")
            model = AutoModelForCausalLM.from_pretrained(base_dir)  # the warm-started base the adapter was made on
        if is_main_process:
            print(f"[train] resuming from {resume}: the warm start and the evaluation before RL are skipped",
                  flush=True)
    elif agent_args.warm_start_steps > 0:
        sft_data = expert_sft_dataset(agent_args.env_id, range(WARM_START_SEED_OFFSET, WARM_START_SEED_OFFSET + agent_args.warm_start_tasks),
                                      env_kwargs=env_kwargs, prompt=agent_args.prompt,
                                      system_prompt=training_args.env_system_prompt,
                                      max_turns=training_args.env_max_turns)
        model = warm_start(model, tokenizer, sft_data, max_steps=agent_args.warm_start_steps,
                           output_dir=os.path.join(training_args.output_dir, "warm_start"), seed=training_args.seed,
                           log_level=training_args.log_level)
        report("warm start", "before", sharded)
    else:
        report("start", "before", sharded)

    if peft_config is not None and (agent_args.tiny_model or agent_args.warm_start_steps > 0):
        # The adapter alone cannot rebuild this base model (built in code, or changed by the warm start): save it
        # and let the adapter point to it (PEFT records the base model's `name_or_path` in adapter_config.json).
        if training_args.should_save and (resume is None or not os.path.isdir(base_dir)):
            model.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
        model.name_or_path = base_dir

    trainer = AEMGRPOTrainer(
        model=model,
        args=training_args,
        train_dataset=make_env_dataset(agent_args.num_train_tasks, prompt=agent_args.prompt),
        processing_class=tokenizer,
        env=agent_args.env_id,
        peft_config=peft_config,
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    report("after RL", "after", sharded_weights(training_args, trainer))
    trainer.save_model(training_args.output_dir)
    trainer.save_metrics("train", train_result.metrics)
    if results:
        eval_metrics = {f"{key}_{name}": value for key, result in results.items()
                        for name, value in result.as_dict().items()}
        trainer.save_metrics("eval", eval_metrics | {"eval_tasks": agent_args.eval_tasks})
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        saved = "LoRA adapter" if peft_config is not None else "model"
        print(f"[train] saved the {saved}, tokenizer, train_results.json"
              f"{', eval_results.json' if results else ''} and trainer_state.json to {training_args.output_dir}",
              flush=True)
    return trainer


def check_args(agent_args: AgentArguments, training_args: AEMGRPOConfig, model_args: ModelConfig) -> None:
    """Usage checks beyond the dataclasses' own validation; raises ``ValueError``."""
    if model_args.model_name_or_path is None and not agent_args.tiny_model:
        raise ValueError("set --model_name_or_path (or --tiny_model true)")
    resolve_env_id(agent_args.env_id)  # imports `module` of `module:id`; ValueError if unknown
    resume_checkpoint(training_args)  # ValueError when --resume_from_checkpoint names no checkpoint


def launched_by_accelerate() -> bool:
    """Whether this process was started by ``accelerate launch`` (or ``torchrun``), which set these variables."""
    from ..cli import LAUNCHED_BY_TRL_AEM

    return any(name in os.environ for name in (LAUNCHED_BY_TRL_AEM, "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK"))


def _check_leftovers(parser: TrlParser, config_remaining: list[str], cli_remaining: list[str]) -> None:
    """Arguments the dataclasses do not know: typos are errors; ``accelerate launch`` options are accepted only in a
    process that ``accelerate launch`` started (elsewhere nobody would apply them)."""
    if not config_remaining and not cli_remaining:
        return
    from ..cli import LAUNCHED_BY_TRL_AEM, CommandError, check_launch_options

    try:
        check_launch_options(config_remaining)
        check_launch_options(cli_remaining)
    except (CommandError, ValueError) as exc:
        usage_error(parser.prog, exc)
    keys = ", ".join(arg.lstrip("-").split("=", 1)[0] for arg in config_remaining + cli_remaining
                     if arg.startswith("-"))
    if not launched_by_accelerate():
        usage_error(parser.prog, f"{keys}: `accelerate launch` option(s), which nothing applies in this process (it "
                                 "was not started by `accelerate launch`). Run `trl-aem train` with the same "
                                 "arguments (it relaunches through `accelerate launch`), or `accelerate launch <its "
                                 "options> examples/train_agent.py <training options>`.")
    if cli_remaining:
        usage_error(parser.prog, f"{' '.join(cli_remaining)}: `accelerate launch` option(s) after the script name "
                                 "reach the script, not the launcher: put them before the script name, or use "
                                 "`trl-aem train`.")
    if os.environ.get(LAUNCHED_BY_TRL_AEM) is None and os.environ.get("RANK", "0") == "0":
        print(f"[train] note: config key(s) {keys} are `accelerate launch` options; this process was started by "
              "`accelerate launch` itself, which reads only its own command line and config file, so they are not "
              "applied (`trl-aem train --config ...` applies them).", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, *, prog: str | None = None):
    """Parse the recipe/flags (``argv``, default ``sys.argv[1:]``) and :func:`train`; returns the trainer.

    Usage errors (unknown options or YAML keys, bad values) print ``<prog>: error: <message>`` and exit with code 2.
    Options of ``accelerate launch`` are accepted only in a process started by ``accelerate launch``; elsewhere
    they are an error pointing to ``trl-aem train``, which relaunches (:func:`run_script` does the same).
    """
    parser = make_parser(prog)
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
        check_args(*parsed)
    except ValueError as exc:  # validation of the configuration: a usage error
        usage_error(parser.prog, exc)
    _check_leftovers(parser, config_remaining, cli_remaining)
    return train(*parsed)


def run_script(argv: list[str] | None = None) -> int:
    """``python -m trl_aem.scripts.train_agent`` / ``python examples/train_agent.py``: returns the exit code.

    In a process started by ``accelerate launch``, :func:`main`. Otherwise the same as ``trl-aem train``: in this
    process, or relaunched through ``accelerate launch`` when the arguments or the YAML file hold its options.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_known_noise()
    if launched_by_accelerate():
        main(argv)
        return 0
    from ..cli import run_train

    return run_train(argv, prog=os.path.basename(sys.argv[0]) or "train_agent.py")


if __name__ == "__main__":
    raise SystemExit(run_script())
