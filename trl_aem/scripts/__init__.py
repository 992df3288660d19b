"""Command-line scripts behind ``trl-aem train`` and ``trl-aem eval`` (each also runs as ``python -m``)."""

from __future__ import annotations

import importlib


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
