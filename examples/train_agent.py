"""Train an agent with AEM on a gymnasium text environment, TRL-style: command-line flags or a YAML recipe.

    # a tiny model built in code, on CPU (about 1 minute)
    python examples/train_agent.py --config examples/recipes/tiny-codebreaker-cpu.yaml
    # Qwen2.5-1.5B-Instruct with LoRA on one GPU, the paper's settings
    python examples/train_agent.py --config examples/recipes/qwen2.5-1.5b-household-lora.yaml
    # any field can be overridden on the command line
    python examples/train_agent.py --config examples/recipes/qwen2.5-1.5b-household-lora.yaml --max_steps 10

Every field of AEMGRPOConfig (TRL's GRPOConfig + AEM + env_*), TRL's ModelConfig (model, dtype, LoRA) and the
AgentArguments can be set in the YAML file or as --flags; `--help` lists them all.

The training logic lives in the package (`trl_aem.scripts.train_agent`); this file only calls it, and
`trl-aem train ...` (the console script) runs the same code.
"""

from trl_aem.scripts.train_agent import AgentArguments, main, make_parser, train

__all__ = ["AgentArguments", "main", "make_parser", "train"]

if __name__ == "__main__":
    # As TRL's scripts: keys of the YAML recipe meant for `accelerate launch` (e.g. num_processes) are tolerated.
    main(fail_with_unknown_args=False)
