"""Train an agent with AEM on a gymnasium text environment, TRL-style: command-line flags or a YAML recipe.

    # a tiny model built in code, on CPU (about 1 minute)
    python examples/train_agent.py --config examples/recipes/tiny-codebreaker-cpu.yaml
    # Qwen2.5-1.5B-Instruct with LoRA on one GPU, the paper's settings
    python examples/train_agent.py --config examples/recipes/qwen2.5-1.5b-household-lora.yaml
    # any field can be overridden on the command line
    python examples/train_agent.py --config examples/recipes/qwen2.5-1.5b-household-lora.yaml --max_steps 10

Every field of AEMGRPOConfig (TRL's GRPOConfig + AEM + env_*), TRL's ModelConfig (model, dtype, LoRA) and the
AgentArguments can be set in the YAML file or as --flags; `--help` lists them all. Any other key or flag is an
error (exit code 2), except options of `accelerate launch` (`num_processes: 4`, `--config_file ...`): with them
this script relaunches itself through `accelerate launch`, as `trl-aem train` does.

The training logic lives in the package (`trl_aem.scripts.train_agent`); this file only calls it, and
`trl-aem train ...` (the console script) runs the same code.
"""

from trl_aem.scripts.train_agent import AgentArguments, main, make_parser, run_script, train

__all__ = ["AgentArguments", "main", "make_parser", "run_script", "train"]

if __name__ == "__main__":
    raise SystemExit(run_script())
