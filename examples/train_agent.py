"""Train an agent with AEM on a gymnasium text environment, TRL-style: command-line flags or a YAML recipe.

    # a tiny model built in code, on CPU (about 1 minute)
    python examples/train_agent.py --config examples/recipes/tiny-codebreaker-cpu.yaml
    # Qwen2.5-1.5B-Instruct with LoRA on one GPU, the paper's settings
    python examples/train_agent.py --config examples/recipes/qwen2.5-1.5b-household-lora.yaml
    # any field can be overridden on the command line
    python examples/train_agent.py --config examples/recipes/qwen2.5-1.5b-household-lora.yaml --max_steps 10

Every field of AEMGRPOConfig (TRL's GRPOConfig + AEM + env_*), TRL's ModelConfig (model, dtype, LoRA) and the
AgentArguments below can be set in the YAML file or as --flags; `--help` lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import ModelConfig, TrlParser, get_peft_config  # noqa: E402

from trl_aem import (  # noqa: E402
    DEFAULT_PROMPT,
    AEMGRPOConfig,
    AEMGRPOTrainer,
    evaluate,
    expert_sft_dataset,
    make_env_dataset,
    warm_start,
)
from trl_aem.envs import env_vocabulary  # noqa: E402
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer  # noqa: E402


@dataclass
class AgentArguments:
    """What to train on, and how to evaluate."""

    # (not `env`: TRL's YAML configs reserve that key for environment variables)
    env_id: str = field(default="trl_aem/CodeBreaker-v0", metadata={"help": "gymnasium id of the environment"})
    num_train_tasks: int = field(default=2400, metadata={"help": "training tasks (seeds 0 ... N-1)"})
    eval_tasks: int = field(default=100, metadata={"help": "held-out evaluation tasks before and after (0: skip)"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "generic instruction before the first observation"})
    tiny_model: bool = field(default=False, metadata={"help": "build a tiny Qwen2 + word tokenizer in code (CPU)"})
    tiny_hidden_size: int = field(default=128, metadata={"help": "hidden size of the tiny model"})
    warm_start_steps: int = field(default=0, metadata={"help": "supervised steps on expert trajectories before RL"})


def main(argv: list[str] | None = None):
    """Parse the recipe/flags, build the model, optionally warm-start, train with AEM, evaluate."""
    parser = TrlParser((AgentArguments, AEMGRPOConfig, ModelConfig))
    agent_args, training_args, model_args = parser.parse_args_and_config(argv)
    env_kwargs = training_args.env_kwargs or {}

    if agent_args.tiny_model:
        tokenizer = build_word_tokenizer(env_vocabulary(agent_args.env_id, **env_kwargs) + agent_args.prompt.split()
                                         + (training_args.env_system_prompt or "").split())
        model = build_tiny_qwen2(tokenizer, hidden_size=agent_args.tiny_hidden_size, seed=training_args.seed)
    else:
        if model_args.model_name_or_path is None:
            parser.error("set --model_name_or_path (or --tiny_model true)")
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype or "auto",
            attn_implementation=model_args.attn_implementation,
        )

    def report(stage: str):
        if agent_args.eval_tasks <= 0:
            return
        result = evaluate(agent_args.env_id, "model", model=model, tokenizer=tokenizer, num_tasks=agent_args.eval_tasks,
                          env_kwargs=env_kwargs, greedy=False, temperature=training_args.temperature,
                          max_turns=training_args.env_max_turns,
                          max_new_tokens_per_turn=training_args.env_max_new_tokens_per_turn,
                          max_completion_length=training_args.max_completion_length,
                          prompt=agent_args.prompt, system_prompt=training_args.env_system_prompt)
        print(f"[eval] {stage:<12} {result}", flush=True)

    if agent_args.warm_start_steps > 0:
        sft_data = expert_sft_dataset(agent_args.env_id, range(1_000_000, 1_000_000 + 200), env_kwargs=env_kwargs,
                                      prompt=agent_args.prompt, system_prompt=training_args.env_system_prompt,
                                      max_turns=training_args.env_max_turns)
        model = warm_start(model, tokenizer, sft_data, max_steps=agent_args.warm_start_steps,
                           output_dir=os.path.join(training_args.output_dir, "warm_start"), seed=training_args.seed)
        report("warm start")
    else:
        report("start")

    trainer = AEMGRPOTrainer(
        model=model,
        args=training_args,
        train_dataset=make_env_dataset(agent_args.num_train_tasks, prompt=agent_args.prompt),
        processing_class=tokenizer,
        env=agent_args.env_id,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    model = trainer.model
    report("after RL")
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
