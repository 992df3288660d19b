"""Train an agent with AEM on a gymnasium text environment, TRL-style: command-line flags or a YAML recipe.

    # a tiny model built in code, on CPU (about 1 minute)
    trl-aem train --config examples/recipes/tiny-codebreaker-cpu.yaml
    # Qwen2.5-1.5B-Instruct with LoRA on one GPU, the paper's settings
    trl-aem train --config examples/recipes/qwen2.5-1.5b-household-lora.yaml
    # any field can be overridden on the command line
    trl-aem train --config examples/recipes/qwen2.5-1.5b-household-lora.yaml --max_steps 10

Every field of AEMGRPOConfig (TRL's GRPOConfig + AEM + env_*), TRL's ModelConfig (model, dtype, LoRA) and
:class:`AgentArguments` can be set in the YAML file or as --flags; ``--help`` lists them all. The same script runs
as ``python -m trl_aem.scripts.train_agent`` and as ``python examples/train_agent.py``.

What ends up in ``output_dir``: the trained model (or, with ``use_peft``, the LoRA adapter) and its tokenizer,
``train_results.json`` (TRL's training metrics), ``eval_results.json`` (held-out success before and after RL, when
``eval_tasks > 0``) and ``trainer_state.json`` (the whole log history, AEM and env metrics included). When LoRA sits
on a model that was built in code (``tiny_model``) or changed by the warm start, that base model is saved to
``output_dir/base_model`` and the adapter points to it, so ``trl-aem eval --model_name_or_path <output_dir>`` works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import ModelConfig, TrlParser, get_peft_config  # noqa: E402

from ..agents import (  # noqa: E402
    DEFAULT_PROMPT,
    EvalResult,
    evaluate,
    expert_sft_dataset,
    make_env_dataset,
    warm_start,
)
from ..config import AEMGRPOConfig  # noqa: E402
from ..envs import env_vocabulary  # noqa: E402
from ..tiny import build_tiny_qwen2, build_word_tokenizer  # noqa: E402
from . import resolve_env_id  # noqa: E402

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
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "generic instruction before the first observation"})
    tiny_model: bool = field(default=False, metadata={"help": "build a tiny Qwen2 + word tokenizer in code (CPU)"})
    tiny_hidden_size: int = field(default=128, metadata={"help": "hidden size of the tiny model"})
    warm_start_steps: int = field(default=0, metadata={"help": "supervised steps on expert trajectories before RL"})


def make_parser(prog: str | None = None) -> TrlParser:
    """The argument parser of the training script: AgentArguments, AEMGRPOConfig and TRL's ModelConfig."""
    return TrlParser(
        (AgentArguments, AEMGRPOConfig, ModelConfig),
        prog=prog,
        description="Train an agent with AEM-GRPO on a gymnasium text environment. Every option below can also be "
                    "set in a YAML recipe passed with --config (flags override the recipe).",
    )


def build_model_and_tokenizer(agent_args: AgentArguments, training_args: AEMGRPOConfig, model_args: ModelConfig):
    """Load ``model_name_or_path`` (or build the tiny model in code) and its tokenizer."""
    if agent_args.tiny_model:
        env_kwargs = training_args.env_kwargs or {}
        tokenizer = build_word_tokenizer(env_vocabulary(agent_args.env_id, **env_kwargs) + agent_args.prompt.split()
                                         + (training_args.env_system_prompt or "").split())
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


def train(agent_args: AgentArguments, training_args: AEMGRPOConfig, model_args: ModelConfig):
    """Build the model, optionally warm-start it, train it with AEM in the environment, evaluate, save.

    Returns the :class:`~trl_aem.AEMGRPOTrainer` after training.
    """
    from ..trainer import AEMGRPOTrainer

    agent_args.env_id = resolve_env_id(agent_args.env_id)
    env_kwargs = training_args.env_kwargs or {}
    model, tokenizer = build_model_and_tokenizer(agent_args, training_args, model_args)
    results: dict[str, EvalResult] = {}

    def report(stage: str, key: str):
        if agent_args.eval_tasks <= 0:
            return
        device = training_args.device
        if device.type != "cpu" and next(model.parameters()).device.type == "cpu":
            model.to(device)  # evaluate a freshly loaded model on the accelerator, not on the CPU
        result = evaluate(agent_args.env_id, "model", model=model, tokenizer=tokenizer, num_tasks=agent_args.eval_tasks,
                          env_kwargs=env_kwargs, greedy=False, temperature=training_args.temperature,
                          max_turns=training_args.env_max_turns,
                          max_new_tokens_per_turn=training_args.env_max_new_tokens_per_turn,
                          max_completion_length=training_args.max_completion_length,
                          prompt=agent_args.prompt, system_prompt=training_args.env_system_prompt)
        results[key] = result
        print(f"[eval] {stage:<12} {result}", flush=True)

    if agent_args.warm_start_steps > 0:
        sft_data = expert_sft_dataset(agent_args.env_id, range(WARM_START_SEED_OFFSET, WARM_START_SEED_OFFSET + 200),
                                      env_kwargs=env_kwargs, prompt=agent_args.prompt,
                                      system_prompt=training_args.env_system_prompt,
                                      max_turns=training_args.env_max_turns)
        model = warm_start(model, tokenizer, sft_data, max_steps=agent_args.warm_start_steps,
                           output_dir=os.path.join(training_args.output_dir, "warm_start"), seed=training_args.seed)
        report("warm start", "before")
    else:
        report("start", "before")

    peft_config = get_peft_config(model_args)
    if peft_config is not None and (agent_args.tiny_model or agent_args.warm_start_steps > 0):
        # The adapter alone cannot rebuild this base model (built in code, or changed by the warm start): save it
        # and let the adapter point to it (PEFT records the base model's `name_or_path` in adapter_config.json).
        base_dir = os.path.abspath(os.path.join(training_args.output_dir, "base_model"))
        if training_args.should_save:
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
    train_result = trainer.train()
    model = trainer.model
    report("after RL", "after")
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


def main(argv: list[str] | None = None, *, fail_with_unknown_args: bool = True, prog: str | None = None):
    """Parse the recipe/flags (``argv``, default ``sys.argv[1:]``) and :func:`train`; returns the trainer."""
    parser = make_parser(prog)
    agent_args, training_args, model_args = parser.parse_args_and_config(argv,
                                                                         fail_with_unknown_args=fail_with_unknown_args)
    if model_args.model_name_or_path is None and not agent_args.tiny_model:
        parser.error("set --model_name_or_path (or --tiny_model true)")
    return train(agent_args, training_args, model_args)


if __name__ == "__main__":
    # As TRL's scripts: keys of the YAML recipe meant for `accelerate launch` (e.g. num_processes) are tolerated.
    main(fail_with_unknown_args=False)
