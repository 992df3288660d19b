"""Evaluate a saved model (or the expert / a random policy) on a gymnasium text environment, TRL-style.

    # the model a recipe saved (a full model directory, or a LoRA adapter directory)
    # (the environment, limits and prompts must match training: here those of tiny-codebreaker-cpu.yaml)
    trl-aem eval --model_name_or_path outputs/tiny-codebreaker-cpu --env_id trl_aem/CodeBreaker-v0 \
        --env_kwargs '{"code_length": 1, "num_symbols": 3, "max_guesses": 3}' --env_max_turns 3 \
        --env_max_new_tokens_per_turn 4 --env_system_prompt "you are a helpful agent ."
    # simpler: the training recipe as the eval config (same environment, limits, prompts; training-only keys ignored)
    trl-aem eval --config examples/recipes/tiny-codebreaker-cpu.yaml --model_name_or_path outputs/tiny-codebreaker-cpu
    # reference points: the scripted expert and a random admissible action
    trl-aem eval --env_id trl_aem/Household-v0 --policy expert --num_tasks 200

Every option of :class:`EvalArguments` can be set in a YAML file (``--config``) or as a flag. The result is printed
(``success ... return ... turns ... pass@k ...``) and, with ``--output_json``, written with every episode. A bad
value (``--num_tasks 0``, an unknown ``--env_id``) is a usage error: ``<prog>: error: <message>``, exit code 2.

A LoRA adapter directory is loaded on the base model that ``--base_model_name_or_path`` names, else on
``<adapter dir>/base_model`` when the adapter's recorded base is such a folder saved by ``trl-aem train`` (so a
moved or copied output directory still works), else on the base recorded in ``adapter_config.json``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from trl import TrlParser  # noqa: E402

from ..agents import DEFAULT_PROMPT, EvalResult, evaluate  # noqa: E402
from ..config import parse_env_kwargs  # noqa: E402
from ..context import context_policy_from_args  # noqa: E402
from ..envs import resolve_env_id  # noqa: E402
from ..tiny import build_agent_tokenizer, build_tiny_qwen2  # noqa: E402
from . import quiet_known_noise, usage_error  # noqa: E402

POLICIES = ("model", "expert", "random")


@dataclass
class EvalArguments:
    """What to evaluate, on which environment, and how to decode.

    Field names match the training recipe's (``env_id``, ``env_kwargs``, ``env_max_turns``, ``prompt``, ...), so a
    training YAML works as ``--config`` here.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to evaluate: a hub id or a local directory saved by `trl-aem train` (a full model, "
                          "or a LoRA adapter directory, which is loaded with PEFT on top of its base model)."},
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "For an adapter directory: the base model to load under it (default: the one recorded "
                          "in adapter_config.json)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (default: the model directory's, else the base model's)."}
    )
    model_revision: str = field(default="main", metadata={"help": "Revision of a hub model."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    device: str = field(default="auto", metadata={"help": "Device: auto (cuda if available, else cpu), cpu, cuda, ..."})
    merge_adapter: bool = field(
        default=True, metadata={"help": "Merge a LoRA adapter into its base model before evaluating (faster)."}
    )
    tiny_model: bool = field(
        default=False,
        metadata={"help": "Without --model_name_or_path: build an untrained tiny Qwen2 and word tokenizer in code "
                          "(a smoke run of the evaluation pipeline; its success is near 0)."},
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Hidden size of the tiny model."})
    policy: str = field(
        default="model",
        metadata={"help": "Who acts: the model, the environment's scripted expert, or a random admissible action.",
                  "choices": list(POLICIES)},
    )
    env_id: str = field(
        default="trl_aem/CodeBreaker-v0",
        metadata={"help": "gymnasium id of the environment; `module:id` imports `module` first (e.g. the module of "
                          "your own environments that calls gymnasium.register)."},
    )
    env_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for gymnasium.make (a JSON object string, or a dict)."}
    )
    num_tasks: int = field(default=100, metadata={"help": "Held-out tasks to play (seeds seed_offset ...)."})
    k: int = field(default=1, metadata={"help": "Attempts per task; pass@k counts a task solved if any succeeds."})
    seed_offset: int = field(default=100_000, metadata={"help": "First task seed (keep apart from training seeds)."})
    greedy: bool = field(default=False, metadata={"help": "Greedy decoding instead of sampling (use False for k > 1)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (when not greedy)."})
    env_max_turns: int = field(default=10, metadata={"help": "Most agent turns per episode."})
    env_max_new_tokens_per_turn: int = field(default=64, metadata={"help": "Most tokens generated in one turn."})
    max_completion_length: int = field(
        default=1024, metadata={"help": "Most tokens in a whole trajectory (actions and observations)."}
    )
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "Instruction before the first observation."})
    env_system_prompt: str | None = field(default=None, metadata={"help": "System message before the prompt."})
    env_context: str = field(
        default="full", metadata={"help": "What the model sees per turn, as in training: full, window, summary or echo."})
    env_history_turns: int = field(
        default=2, metadata={"help": "With env_context=window: earlier observation/action pairs per prompt."})
    env_context_budget: int | None = field(
        default=None, metadata={"help": "With env_context=summary/echo: tokens that trigger a rebuild, as in training."})
    env_memory_max_tokens: int = field(default=64, metadata={"help": "Most tokens of one summary or selection."})
    env_max_rebuilds: int = field(default=5, metadata={"help": "Most rebuilds per episode (summary/echo)."})
    env_echo_recent_turns: int = field(
        default=3, metadata={"help": "With env_context=echo: recent turns every rebuilt prompt shows in full."})
    env_prompt_format: str = field(default="chat", metadata={"help": "chat or react, as in training."})
    env_invalid_action_penalty: float = field(
        default=0.1, metadata={"help": "With env_prompt_format=react: reward -penalty for a malformed answer."})
    batch_size: int = field(default=64, metadata={"help": "Episodes generated together."})
    seed: int = field(default=0, metadata={"help": "Random seed (sampling, tiny model weights)."})
    output_json: str | None = field(
        default=None, metadata={"help": "Write the settings, the result and every episode to this JSON file."}
    )
    progress: bool = field(default=False, metadata={"help": "Show a progress bar."})

    def __post_init__(self):
        self.env_kwargs = parse_env_kwargs(self.env_kwargs)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        for name in ("num_tasks", "k", "env_max_turns", "env_max_new_tokens_per_turn", "max_completion_length",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        context_policy_from_args(self)  # names a bad field


def make_parser(prog: str | None = None) -> TrlParser:
    """The argument parser of the evaluation script (:class:`EvalArguments`; ``--config`` takes a YAML file)."""
    return TrlParser(
        (EvalArguments,),
        prog=prog,
        description="Evaluate a model (or the expert / a random policy) on a gymnasium text environment: success "
                    "rate, mean return, mean turns and pass@k over held-out tasks. Options can also come from a YAML "
                    "file passed with --config (a training recipe works: its training-only keys are ignored).",
    )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


#: Where ``trl-aem train`` saves a base model that only exists locally (built in code, or warm-started).
BASE_MODEL_SUBDIR = "base_model"


def adapter_base_model(adapter_dir: str, recorded: str | None) -> str | None:
    """The base model to load under the adapter in ``adapter_dir``, whose ``adapter_config.json`` records ``recorded``.

    ``trl-aem train`` saves a base model built in code (or changed by the warm start) to
    ``<output_dir>/base_model`` and PEFT records its absolute path. When the output directory has been moved or
    copied, that path is gone or is another run's: a recorded local folder named ``base_model`` resolves to the
    adapter's own ``<adapter_dir>/base_model`` when that exists. Anything else (a hub id, another local path) is
    returned as recorded.
    """
    sibling = os.path.join(adapter_dir, BASE_MODEL_SUBDIR)
    if recorded and os.path.basename(os.path.normpath(recorded)) == BASE_MODEL_SUBDIR and os.path.isfile(
            os.path.join(sibling, "config.json")):
        return sibling
    return recorded


def load_model_and_tokenizer(args: EvalArguments):
    """Load the model to evaluate: a full model, a PEFT adapter on its base model, or the tiny model built in code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model_name_or_path is None:
        if not args.tiny_model:
            raise ValueError('policy="model" needs --model_name_or_path (or --tiny_model true for a smoke run)')
        tokenizer = build_agent_tokenizer(args.env_id, args.env_kwargs, args.prompt, args.env_system_prompt)
        return build_tiny_qwen2(tokenizer, hidden_size=args.tiny_hidden_size, seed=args.seed), tokenizer

    path = args.model_name_or_path
    load = dict(revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    adapter_config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        from peft import PeftModel

        with open(adapter_config) as handle:
            recorded = json.load(handle).get("base_model_name_or_path")
        base = args.base_model_name_or_path or adapter_base_model(path, recorded)
        if not base:
            raise ValueError(f"{adapter_config} names no base model: pass --base_model_name_or_path")
        print(f"[eval] LoRA adapter {path} on the base model {base}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=args.dtype, **load)
        model = PeftModel.from_pretrained(model, path)
        if args.merge_adapter:
            model = model.merge_and_unload()
        has_tokenizer = any(os.path.isfile(os.path.join(path, name))
                            for name in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer_source = args.tokenizer_name_or_path or (path if has_tokenizer else base)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, **load)
        tokenizer_source = args.tokenizer_name_or_path or path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **load)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run_eval(args: EvalArguments) -> EvalResult:
    """Play ``args.num_tasks`` tasks with :func:`trl_aem.evaluate`, print the result, optionally write JSON."""
    torch.manual_seed(args.seed)
    args.env_id = resolve_env_id(args.env_id)  # `module:id` -> id (imports module)
    model = tokenizer = None
    if args.policy == "model":
        model, tokenizer = load_model_and_tokenizer(args)
        model.to(_resolve_device(args.device))
    result = evaluate(
        args.env_id, args.policy, model=model, tokenizer=tokenizer, num_tasks=args.num_tasks, k=args.k,
        seed_offset=args.seed_offset, env_kwargs=args.env_kwargs, greedy=args.greedy, temperature=args.temperature,
        max_turns=args.env_max_turns, max_new_tokens_per_turn=args.env_max_new_tokens_per_turn,
        max_completion_length=args.max_completion_length, prompt=args.prompt, system_prompt=args.env_system_prompt,
        batch_size=args.batch_size, progress=args.progress, context=context_policy_from_args(args),
        history_turns=args.env_history_turns, prompt_format=args.env_prompt_format,
        invalid_action_penalty=args.env_invalid_action_penalty,
    )
    what = args.model_name_or_path or ("tiny model (untrained)" if args.tiny_model else "")
    decoding = "greedy" if args.greedy else f"sampled, temperature {args.temperature}"
    label = f"{args.policy} {what}".strip() if args.policy == "model" else args.policy
    print(f"[eval] {args.env_id} {json.dumps(args.env_kwargs or {})} | {label} | {decoding}", flush=True)
    print(f"[eval] {result}", flush=True)
    summary = {"env_id": args.env_id, "policy": args.policy, **result.as_dict(), "k": result.k,
               "num_tasks": result.num_tasks}
    print("[eval] json " + json.dumps(summary), flush=True)
    if args.output_json:
        directory = os.path.dirname(os.path.abspath(args.output_json))
        os.makedirs(directory, exist_ok=True)
        with open(args.output_json, "w") as handle:
            json.dump({"settings": asdict(args), "result": summary, "episodes": result.episodes}, handle, indent=2)
    return result


def main(argv: list[str] | None = None, *, prog: str | None = None) -> EvalResult:
    """Parse flags / ``--config`` (``argv``, default ``sys.argv[1:]``) and :func:`run_eval`."""
    parser = make_parser(prog)
    try:
        args, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
        resolve_env_id(args.env_id)  # imports `module` of `module:id`; ValueError if unknown
    except ValueError as exc:  # validation of the arguments: a usage error (exit code 2)
        usage_error(parser.prog, exc)
    if cli_remaining:
        parser.error(f"unrecognized arguments: {' '.join(cli_remaining)}")
    if config_remaining:
        ignored = [item[2:] for item in config_remaining[::2]]
        print(f"[eval] config keys not used by evaluation (ignored): {', '.join(ignored)}", file=sys.stderr)
    if args.policy == "model" and args.model_name_or_path is None and not args.tiny_model:
        parser.error('--policy model needs --model_name_or_path (or --tiny_model true for a smoke run)')
    return run_eval(args)


if __name__ == "__main__":
    quiet_known_noise()
    main()
