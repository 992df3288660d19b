"""Command-line scripts behind ``trl-aem train`` and ``trl-aem eval`` (each also runs as ``python -m``)."""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn


def usage_error(prog: str | None, message) -> NoReturn:
    """Print ``<prog>: error: <message>`` to stderr and exit with code 2 (a usage error), without argparse's usage
    block (the training parser's lists hundreds of options)."""
    print(f"{prog or 'trl-aem'}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def resolve_env_id(env_id: str) -> str:
    """Handle gymnasium's ``"module:EnvId"`` form: import ``module`` (which registers the id) and return ``EnvId``.

    Plain ids are returned unchanged. This is how ``trl-aem train/eval --env_id my_package.envs:my_envs/Counter-v0``
    reaches an environment registered by your own code.
    """
    if ":" not in env_id:
        return env_id
    module, _, name = env_id.partition(":")
    importlib.import_module(module)
    return name


def check_env_id(env_id: str) -> str:
    """:func:`resolve_env_id`, then check that gymnasium knows the id; returns it, or raises ``ValueError`` (a usage
    error on the command line) naming the id."""
    try:
        name = resolve_env_id(env_id)
    except ImportError as exc:
        raise ValueError(f"env_id {env_id!r}: cannot import the module before ':' ({exc})") from exc
    import gymnasium

    try:
        gymnasium.spec(name)
    except gymnasium.error.Error as exc:
        raise ValueError(f"env_id {env_id!r} is not a registered gymnasium environment ({exc}); `trl-aem env list` "
                         "shows the built-in ones, and `module:id` imports the module that registers yours") from exc
    return name
