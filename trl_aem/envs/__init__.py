"""Offline, deterministic-by-seed text environments for multi-turn agentic RL.

Importing this module registers three gymnasium ids (see :data:`BUILTIN_ENVS`):

* ``trl_aem/Household-v0`` -> :class:`Household` (ALFWorld-like pick / clean / heat / cool and place),
* ``trl_aem/Shop-v0`` -> :class:`Shop` (WebShop-like search, click, choose options, buy),
* ``trl_aem/CodeBreaker-v0`` -> :class:`CodeBreaker` (Mastermind-like code breaking).

All three take text actions and return text observations written in a tiny, regular language
(lowercase words, digits, and the punctuation ``: , . ( ) -`` as separate tokens), so that a
word-level tokenizer can be built from :func:`env_vocabulary`. Rewards are sparse: 10.0 for
success on the final step (Shop: ``10 * score`` on ``buy``), minus ``invalid_action_penalty`` for an
invalid action. ``reset(seed=s, options=row)`` fixes the task; ``info["success"]`` and
``info["invalid_action"]`` are set on every step.

:func:`resolve_env_id` is how every part of trl_aem that takes an environment id (``AEMGRPOTrainer(env=...)``,
:func:`trl_aem.evaluate`, :func:`env_vocabulary`, ``trl-aem train/eval --env_id``) reads it: a registered id, or
gymnasium's ``"module:EnvId"`` form, which imports ``module`` (the code that registers ``EnvId``) first.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import gymnasium as gym

from .base import (
    ACTIONS_PREFIX,
    PUNCTUATION,
    TextEnv,
    normalize_action,
    parse_listed_actions,
    split_words,
)
from .codebreaker import CodeBreaker
from .household import Household
from .shop import Product, Shop, ShopGoal, score_purchase

__all__ = [
    "ACTIONS_PREFIX",
    "BUILTIN_ENVS",
    "PUNCTUATION",
    "CodeBreaker",
    "Household",
    "Product",
    "Shop",
    "ShopGoal",
    "TextEnv",
    "entry_class",
    "env_class",
    "env_vocabulary",
    "expert_trajectories",
    "normalize_action",
    "parse_listed_actions",
    "random_policy_action",
    "register_envs",
    "resolve_env_id",
    "score_purchase",
    "split_words",
]

#: Short name -> gymnasium id of the built-in environments.
BUILTIN_ENVS: dict[str, str] = {
    "household": "trl_aem/Household-v0",
    "shop": "trl_aem/Shop-v0",
    "codebreaker": "trl_aem/CodeBreaker-v0",
}

_ENTRY_POINTS: dict[str, str] = {
    "trl_aem/Household-v0": "trl_aem.envs.household:Household",
    "trl_aem/Shop-v0": "trl_aem.envs.shop:Shop",
    "trl_aem/CodeBreaker-v0": "trl_aem.envs.codebreaker:CodeBreaker",
    "trl_aem/ClueRooms-v0": "trl_aem.envs.clues:ClueRooms",
    # real third-party environments (optional extras, imported when an episode first starts)
    "trl_aem/TextWorld-v0": "trl_aem.envs.textworld_env:TextWorldEnv",
    "trl_aem/MiniSWE-v0": "trl_aem.envs.miniswe:MiniSWE",
    "trl_aem/OpenEnv-v0": "trl_aem.envs.openenv_env:OpenEnvTextEnv",
    "trl_aem/ALFWorld-v0": "trl_aem.envs.alfworld_env:ALFWorldEnv",
    "trl_aem/ScienceWorld-v0": "trl_aem.envs.scienceworld_env:ScienceWorldEnv",
    "trl_aem/TextArena-v0": "trl_aem.envs.textarena_env:TextArenaEnv",
}

_CLASSES: dict[str, type[TextEnv]] = {
    "trl_aem/Household-v0": Household,
    "trl_aem/Shop-v0": Shop,
    "trl_aem/CodeBreaker-v0": CodeBreaker,
}


def register_envs() -> None:
    """Register the built-in ids with gymnasium (idempotent: already registered ids are skipped)."""
    for env_id, entry_point in _ENTRY_POINTS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point)


register_envs()

#: What the errors of :func:`resolve_env_id` suggest.
_ENV_ID_HINT = ("`trl-aem env list` shows the built-in ones, and gymnasium's `module:id` form imports the module that "
                "registers yours")


def resolve_env_id(env_id: str, *, name: str = "env_id") -> str:
    """The registered gymnasium id ``env_id`` names; gymnasium's ``"module:EnvId"`` form imports ``module`` first.

    ``"my_package.envs:my_envs/Counter-v0"`` imports ``my_package.envs`` (which calls ``gymnasium.register``) and
    returns ``"my_envs/Counter-v0"``; a plain id is returned unchanged. Resolving twice is harmless.

    Args:
        env_id: a registered gymnasium id, or ``"module:EnvId"``.
        name: the argument or field the id came from, named in the errors (``"env"``, ``"env_id"``).

    Raises:
        ValueError: naming ``name`` and ``env_id``, when the module cannot be imported or the id is not registered.
    """
    if not isinstance(env_id, str):
        raise ValueError(f"{name} must be a gymnasium id (a string), got {type(env_id).__name__}")
    module, colon, env_name = env_id.partition(":")
    if not colon:
        env_name = env_id
    elif not module or not env_name:
        raise ValueError(f"{name} {env_id!r}: gymnasium's `module:id` form needs both a module and an id")
    else:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"{name} {env_id!r}: cannot import the module {module!r} before ':' ({exc}); it should "
                             "be importable (on sys.path) and register the id with gymnasium.register") from exc
    try:
        gym.spec(env_name)
    except gym.error.Error as exc:  # unknown id, namespace or version (several subclasses)
        raise ValueError(f"{name} {env_id!r} is not a registered gymnasium id ({exc}); {_ENV_ID_HINT}") from exc
    return env_name


def entry_class(env_id: str) -> type:
    """The class a registered id's entry point names (any gymnasium env; its module is imported, which for the
    optional third-party environments imports nothing heavy: their packages load when an episode starts)."""
    env_id = BUILTIN_ENVS.get(env_id, env_id)
    if env_id in _CLASSES:
        return _CLASSES[env_id]
    cls = gym.spec(resolve_env_id(env_id)).entry_point
    if isinstance(cls, str):
        module, _, name = cls.partition(":")
        cls = getattr(importlib.import_module(module), name)
    return cls


def env_class(env_id: str) -> type[TextEnv]:
    """The environment class behind an id (``"trl_aem/Shop-v0"``, ``"module:EnvId"``) or a short name (``"shop"``),
    which must be one of trl_aem's own :class:`TextEnv` environments."""
    cls = entry_class(env_id)
    if not (isinstance(cls, type) and issubclass(cls, TextEnv)):
        raise ValueError(f"{env_id!r} is not a trl_aem text environment")
    return cls


def env_vocabulary(env_id: str, **kwargs: Any) -> list[str]:
    """Every word the environment can emit in observations or accept as a valid action.

    Args:
        env_id: a gymnasium id (``"trl_aem/Shop-v0"``, or ``"module:EnvId"``) or short name (``"shop"``) of an
            environment whose class has a ``vocabulary`` classmethod (trl_aem's own, and ``TextWorld-v0``, whose
            vocabulary is read from a few probe games).
        **kwargs: the difficulty keyword arguments the environment is built with.

    Returns:
        The sorted word list of ``<EnvClass>.vocabulary(**kwargs)``.
    """
    cls = entry_class(env_id)
    if not callable(getattr(cls, "vocabulary", None)):
        raise ValueError(f"{env_id!r} has no vocabulary (its class defines no `vocabulary` classmethod): a word-level "
                         "tokenizer cannot be built for it; use a real tokenizer (model_name_or_path)")
    return cls.vocabulary(**kwargs)


def random_policy_action(env: gym.Env) -> str:
    """A random executable action for the env's current state, drawn with the env's ``np_random``.

    For trl_aem's own environments it picks uniformly among the actions listed at the end of the last observation
    (equivalently ``env.unwrapped.admissible_actions()``); where nothing is listed (e.g. a large CodeBreaker code
    space) it falls back to ``env.unwrapped.random_valid_action()``. Any other environment needs an
    ``admissible_actions()`` method (the third-party wrappers of ``trl_aem.envs`` have one).

    Args:
        env: a (possibly wrapped) environment that has been reset.
    """
    base = env.unwrapped
    if isinstance(base, TextEnv):
        actions = parse_listed_actions(base.last_observation) or base.admissible_actions()
        if not actions:
            return base.random_valid_action()
    elif callable(getattr(base, "admissible_actions", None)):
        actions = list(base.admissible_actions())
        if not actions:
            raise RuntimeError(f"{type(base).__name__} lists no admissible action in this state")
    else:
        raise TypeError(f"random_policy_action needs an environment with admissible_actions(); "
                        f"{type(base).__name__} has none")
    return actions[int(base.np_random.integers(len(actions)))]


def expert_trajectories(
    env_id: str,
    seeds: Iterable[int],
    env_kwargs: dict[str, Any] | None = None,
    max_turns: int = 50,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Roll out the scripted expert, e.g. to build a supervised warm-start dataset.

    Args:
        env_id: a built-in id (or short name) or any registered id (or ``"module:EnvId"``) whose env has
            ``expert_action``.
        seeds: one episode per seed (``reset(seed=seed, options=options)``).
        env_kwargs: keyword arguments for ``gymnasium.make`` (difficulty knobs).
        max_turns: stop an episode after this many actions.
        options: passed to every ``reset`` (e.g. an explicit task).

    Returns:
        One dict per seed: ``seed``, ``task`` (the task sentence), ``steps`` (list of
        ``(observation, action)`` pairs: each action is the expert's answer to that observation),
        ``final_observation``, ``rewards`` (per step), ``return`` (sum of rewards), ``success``
        (bool) and ``num_turns``.
    """
    env = gym.make(resolve_env_id(BUILTIN_ENVS.get(env_id, env_id)), **(env_kwargs or {}))
    out: list[dict[str, Any]] = []
    try:
        for seed in seeds:
            obs, info = env.reset(seed=int(seed), options=options)
            task = info.get("task", "")
            steps: list[tuple[str, str]] = []
            rewards: list[float] = []
            success = False
            for _ in range(max_turns):
                action = env.unwrapped.expert_action()
                steps.append((obs, action))
                obs, reward, terminated, truncated, info = env.step(action)
                rewards.append(float(reward))
                success = bool(info.get("success", False))
                if terminated or truncated:
                    break
            out.append(
                {
                    "seed": int(seed),
                    "task": task,
                    "steps": steps,
                    "final_observation": obs,
                    "rewards": rewards,
                    "return": float(sum(rewards)),
                    "success": success,
                    "num_turns": len(steps),
                }
            )
    finally:
        env.close()
    return out
