"""trl-aem: Adaptive Entropy Modulation (arXiv:2605.00425) for TRL's GRPOTrainer.

Swap ``GRPOTrainer``/``GRPOConfig`` for :class:`AEMGRPOTrainer`/:class:`AEMGRPOConfig` to get AEM.

``import trl_aem`` is light: it registers the built-in gymnasium environments (``trl_aem/Household-v0``, ...) and
imports torch, transformers and TRL only when one of the names below is first used (``from trl_aem import
AEMGRPOTrainer`` works as usual), so that ``trl-aem --help`` and ``trl-aem env list`` start quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import envs  # registers the built-in gymnasium environments (trl_aem/Household-v0, ...); no torch

__version__ = "0.1.0"

#: Public name -> the submodule that defines it (imported on first use, by :func:`__getattr__`).
_LAZY_NAMES: dict[str, str] = {
    **dict.fromkeys(("AEMResult", "SpanTable", "aem_coefficients", "aem_modulation", "broadcast_span_values",
                     "modulate_advantages", "span_ids_from_mask", "span_mean_entropy", "token_entropy_from_logits"),
                    "aem"),
    **dict.fromkeys(("DEFAULT_PROMPT", "EvalResult", "evaluate", "expert_sft_dataset", "make_env_dataset",
                     "warm_start"), "agents"),
    "AEMGRPOConfig": "config",
    **dict.fromkeys(("EnvRunner", "Episode", "EnvironmentProtocolError", "ObservationRenderer", "RolloutLimits"),
                    "rollout"),
    **dict.fromkeys(("AEMGRPOTrainer", "env_return"), "trainer"),
}

#: Submodules reachable as attributes (``trl_aem.trainer``) without importing them first.
_SUBMODULES = ("aem", "agents", "callbacks", "cli", "config", "envs", "generation", "rollout", "scripts", "tiny",
               "trainer")

if TYPE_CHECKING:  # for type checkers and the API docs (griffe reads these imports); not run
    from .aem import (
        AEMResult,
        SpanTable,
        aem_coefficients,
        aem_modulation,
        broadcast_span_values,
        modulate_advantages,
        span_ids_from_mask,
        span_mean_entropy,
        token_entropy_from_logits,
    )
    from .agents import DEFAULT_PROMPT, EvalResult, evaluate, expert_sft_dataset, make_env_dataset, warm_start
    from .config import AEMGRPOConfig
    from .rollout import EnvRunner, Episode, EnvironmentProtocolError, ObservationRenderer, RolloutLimits
    from .trainer import AEMGRPOTrainer, env_return


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule) of ``trl_aem`` on first use, and keep it as a module attribute."""
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's attributes, the lazily imported public names and submodules included."""
    return sorted(set(globals()) | set(_LAZY_NAMES) | set(_SUBMODULES))


__all__ = [
    "DEFAULT_PROMPT",
    "EnvRunner",
    "EnvironmentProtocolError",
    "Episode",
    "EvalResult",
    "ObservationRenderer",
    "RolloutLimits",
    "env_return",
    "envs",
    "evaluate",
    "expert_sft_dataset",
    "make_env_dataset",
    "warm_start",
    "AEMGRPOConfig",
    "AEMGRPOTrainer",
    "AEMResult",
    "SpanTable",
    "aem_coefficients",
    "aem_modulation",
    "broadcast_span_values",
    "modulate_advantages",
    "span_ids_from_mask",
    "span_mean_entropy",
    "token_entropy_from_logits",
]
