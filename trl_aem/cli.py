"""The ``trl-aem`` command line, in the style of TRL's ``trl`` command.

    trl-aem train --config examples/recipes/tiny-codebreaker-cpu.yaml [--any_field value ...]
    trl-aem eval --model_name_or_path outputs/tiny-codebreaker-cpu --config examples/recipes/tiny-codebreaker-cpu.yaml
    trl-aem env list

``train`` and ``eval`` parse dataclass arguments with ``trl.TrlParser`` (flags, or a YAML file with ``--config``;
flags override the file); ``trl-aem train --help`` and ``trl-aem eval --help`` list every option. As with
``trl grpo``, options of ``accelerate launch`` given to ``train`` (``--num_processes 4``, ``--config_file ...``, or
``--accelerate_config zero2``, a name of TRL's shipped configs or a path) relaunch the training script through
``accelerate launch``; without them it runs in this process. ``python -m trl_aem ...`` is the same command.

Usage errors (unknown options or YAML keys, bad values, options before the command) print
``trl-aem <command>: error: <message>`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Sequence

COMMANDS = {
    "train": "Train an agent with AEM-GRPO on a gymnasium text environment (flags or --config recipe.yaml).",
    "eval": "Evaluate a saved model (or the expert / a random policy) on a gymnasium text environment.",
    "env": "Environments: `trl-aem env list` shows the registered trl_aem/* ids and their knobs.",
}

EXAMPLES = """examples:
  trl-aem train --config examples/recipes/tiny-codebreaker-cpu.yaml --max_steps 10
  trl-aem train --config examples/recipes/qwen2.5-7b-household-lora.yaml \\
      --config_file examples/accelerate/zero2.yaml --num_processes 4      # through accelerate launch
  trl-aem eval --config examples/recipes/tiny-codebreaker-cpu.yaml --model_name_or_path outputs/tiny-codebreaker-cpu
  trl-aem eval --env_id trl_aem/Household-v0 --policy expert --num_tasks 200
  trl-aem env list

Run `trl-aem <command> --help` for the options of a command."""


class CommandError(Exception):
    """A command-line usage error (reported with exit code 2)."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-aem",
        description="AEM (Adaptive Entropy Modulation) for TRL: train and evaluate multi-turn agents.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"trl-aem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{train,eval,env}", title="commands")
    # train and eval hand their arguments (--help included) to their own TrlParser, as TRL's commands do.
    subparsers.add_parser("train", help=COMMANDS["train"], add_help=False)
    subparsers.add_parser("eval", help=COMMANDS["eval"], add_help=False)
    env = subparsers.add_parser("env", help=COMMANDS["env"], description=COMMANDS["env"])
    env_actions = env.add_subparsers(dest="env_command", metavar="{list}", title="env commands")
    env_list = env_actions.add_parser(
        "list", help="List the registered trl_aem/* environment ids and their knobs.",
        description="List the registered trl_aem/* gymnasium ids: class, constructor keyword arguments (env_kwargs) "
                    "with defaults, and the easiest preset.")
    env_list.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


# ----------------------------------------------------------------------------------------------------------- train
#: Set in the environment of the processes ``trl-aem train`` starts through ``accelerate launch``: their YAML keys
#: meant for ``accelerate launch`` (``num_processes: 4``) were applied by the launcher, so the script accepts them.
LAUNCHED_BY_TRL_AEM = "TRL_AEM_LAUNCHED"

#: A stand-in for the training script when asking ``accelerate launch``'s parser about an option.
_PROBE = "__trl_aem_probe__.py"

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence`` (as TRL's CLI does)."""
    remaining = iter(subsequence)
    current = next(remaining, None)
    out = []
    for item in items:
        if current is not None and item == current:
            current = next(remaining, None)
        else:
            out.append(item)
    return out


def _option_groups(args: Sequence[str]) -> list[list[str]]:
    """``["--a", "1", "--b", "--c=2"]`` -> ``[["--a", "1"], ["--b"], ["--c=2"]]`` (an option and its values)."""
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("-") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def _split_accelerate_config(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take ``--accelerate_config NAME`` (or ``--accelerate_config=NAME``) out of ``args``: (``[it, NAME]``, rest)."""
    found, rest = [], []
    for group in _option_groups(args):
        name, eq, value = group[0].partition("=")
        if name in ("--accelerate_config", "--accelerate-config"):
            if found:
                raise ValueError("--accelerate_config is given twice")
            values = [value] if eq else group[1:]
            if len(values) != 1 or not values[0]:
                raise ValueError(f"--accelerate_config takes one value (a path, or one of TRL's config names), "
                                 f"got {' '.join(group)!r}")
            found = ["--accelerate_config", values[0]]
        else:
            rest.extend(group)
    return found, rest


def check_launch_options(args: Sequence[str]) -> list[str]:
    """Check that ``args`` (options left over by the training parser, from the command line or the ``--config`` file)
    are all options of ``accelerate launch``, and return them ready for it; raises :class:`CommandError` naming the
    others.

    ``--accelerate_config NAME`` (or ``=NAME``) stays as it is (see :func:`split_launch_args`). A YAML boolean
    given to a flag of ``accelerate launch`` (``multi_gpu: true``, which TRL's parser hands over as
    ``--multi_gpu True``) becomes the bare flag, or nothing for ``false``. Uses only ``accelerate launch``'s public
    parser: each option is parsed in front of a stand-in script name.
    """
    from accelerate.commands.launch import launch_command_parser

    accelerate_config, rest = _split_accelerate_config(args)
    parser = launch_command_parser()
    unknown, out = [], []
    for group in _option_groups(rest):
        option = group[0]
        if not option.startswith("-"):
            unknown.append(option)
            continue
        namespace, extra = parser.parse_known_args(group + [_PROBE])
        if extra:
            unknown.append(option.split("=", 1)[0])
        elif len(group) == 2 and namespace.training_script == group[1]:
            # A flag (it took no value, so the value became the "script"): YAML true -> the flag, false -> nothing.
            if group[1].lower() in _TRUE:
                out.append(option)
            elif group[1].lower() not in _FALSE:
                raise CommandError(f"{option} of `accelerate launch` is a flag and takes no value, got {group[1]!r}")
        else:
            out.extend(group)
    if unknown:
        raise CommandError(f"unknown option(s) or config key(s) {', '.join(repr(u.lstrip('-')) for u in unknown)}: "
                           "neither a training option (see `trl-aem train --help`) nor an `accelerate launch` option")
    return accelerate_config + out


def split_launch_args(argv: Sequence[str], prog: str = "trl-aem train") -> tuple[list[str], list[str]]:
    """Split ``trl-aem train`` arguments into ``(accelerate launch arguments, training script arguments)``.

    Parses and validates the training arguments first: a bad value raises ``ValueError`` (as the training
    configuration does), ``--help`` exits. Arguments the training dataclasses do not know (on the command line or as
    keys of the ``--config`` file) must be ``accelerate launch`` options, else :class:`CommandError`.
    ``--accelerate_config NAME`` (or ``--accelerate_config=NAME``) becomes ``--config_file <TRL's NAME.yaml, or the
    path NAME>``.
    """
    from .scripts.train_agent import check_args, make_parser

    argv = list(argv)
    *parsed, config_remaining, cli_remaining = make_parser(prog).parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True)
    check_args(*parsed)
    if not config_remaining and not cli_remaining:
        return [], argv
    from_config, from_cli = check_launch_options(config_remaining), check_launch_options(cli_remaining)
    if from_config[:1] == from_cli[:1] == ["--accelerate_config"]:
        from_config = from_config[2:]  # flags override the file (for accelerate's own options, the last one wins)
    launch_args = from_config + from_cli
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    return resolve_accelerate_config_argument(launch_args), _subtract_subsequence(argv, cli_remaining)


def run_train(argv: Sequence[str], prog: str = "trl-aem train") -> int:
    """``trl-aem train``: run the training script here, or through ``accelerate launch`` when given its options.

    Returns the exit code, 0 or that of a failed training process; ``--help`` (0) and usage errors (2: bad or
    unknown options or YAML keys, bad values) leave through ``SystemExit``.
    """
    from .scripts import quiet_known_noise, usage_error

    quiet_known_noise()
    try:
        launch_args, script_args = split_launch_args(argv, prog)
    except (CommandError, ValueError) as exc:
        usage_error(prog, exc)
    if not launch_args:
        from .scripts.train_agent import main as train_main

        train_main(script_args, prog=prog)
        return 0
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    accelerate_args = launch_command_parser().parse_args(
        launch_args + ["--module", "trl_aem.scripts.train_agent"] + script_args)
    previous = os.environ.get(LAUNCHED_BY_TRL_AEM)
    os.environ[LAUNCHED_BY_TRL_AEM] = "1"  # inherited by the launched processes
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as exc:  # the training process failed; it printed why
        return exc.returncode or 1
    except ChildFailedError as exc:  # several processes (torch.distributed.run): one failed; it printed why
        print(f"{prog}: a training process failed:\n{exc}", file=sys.stderr)
        return 1
    finally:
        if previous is None:
            os.environ.pop(LAUNCHED_BY_TRL_AEM, None)
        else:
            os.environ[LAUNCHED_BY_TRL_AEM] = previous
    return 0


# ------------------------------------------------------------------------------------------------------------ eval
def run_eval(argv: Sequence[str], prog: str = "trl-aem eval") -> int:
    """``trl-aem eval``: evaluate and print the result (see :mod:`trl_aem.scripts.eval_agent`)."""
    from .scripts import quiet_known_noise
    from .scripts.eval_agent import main as eval_main

    quiet_known_noise()
    eval_main(list(argv), prog=prog)
    return 0


# ------------------------------------------------------------------------------------------------------------- env
def list_envs() -> list[dict]:
    """The registered ``trl_aem/*`` gymnasium ids with their class, knobs (constructor defaults), easiest preset and
    optional extra (its name, and whether the modules it installs, ``EXTRA_MODULES`` or the extra's name, import)."""
    import gymnasium

    import importlib.util

    from .envs import entry_class

    rows = []
    for env_id in sorted(i for i in gymnasium.registry if i.startswith("trl_aem/")):
        cls = entry_class(env_id)
        extra = getattr(cls, "EXTRA", None)
        knobs = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                 if name not in ("self", "render_mode") and p.default is not inspect.Parameter.empty}
        rows.append({"id": env_id, "class": f"{cls.__module__}.{cls.__qualname__}",
                     "summary": " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].replace("``", "").split()),
                     "env_kwargs": knobs, "easiest": dict(getattr(cls, "EASIEST", {})),
                     "extra": None if extra is None else {
                         "name": extra, "installed": all(importlib.util.find_spec(module) is not None
                                                         for module in getattr(cls, "EXTRA_MODULES", (extra,)))}})
    return rows


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def run_env(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``trl-aem env list``: print the registered environments."""
    if args.env_command != "list":
        parser.parse_args(["env", "--help"])  # prints the env help and exits 0
    rows = list_envs()
    if args.json:
        print(json.dumps({row["id"]: {k: ({n: _jsonable(v) for n, v in row[k].items()} if isinstance(row[k], dict)
                                           else row[k]) for k in row if k != "id"} for row in rows}, indent=2))
        return 0
    for row in rows:
        print(f"{row['id']}  ({row['class']})")
        print(f"  {row['summary']}")
        print("  env_kwargs: " + ", ".join(f"{name}={_jsonable(value)!r}" for name, value in row["env_kwargs"].items()))
        print(f"  easiest:    {json.dumps({k: _jsonable(v) for k, v in row['easiest'].items()})}")
        if row["extra"]:
            state = "installed" if row["extra"]["installed"] else f'not installed: pip install "trl-aem[{row["extra"]["name"]}]"'
            print(f"  extra:      {row['extra']['name']} ({state})")
    return 0


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trl-aem`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
            parser.print_usage(sys.stderr)
            print(f"trl-aem: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} "
                  "(see `trl-aem --help`)", file=sys.stderr)
            return 2
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            parser.print_help()
            return 0
        position = argv.index(args.command)
        if position > 0:  # e.g. `trl-aem --bogus train ...`: the top level has no options but --help and --version
            parser.error(f"unrecognized arguments: {' '.join(argv[:position])} (the options of a command go after "
                         f"it: `trl-aem {args.command} --help` lists them)")
        rest = argv[position + 1:]
        if args.command == "train":
            return run_train(rest)
        if args.command == "eval":
            return run_eval(rest)
        return run_env(parser.parse_args(argv), parser)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
