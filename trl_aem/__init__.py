"""trl-aem: Adaptive Entropy Modulation (arXiv:2605.00425) for TRL's GRPOTrainer.

Swap ``GRPOTrainer``/``GRPOConfig`` for :class:`AEMGRPOTrainer`/:class:`AEMGRPOConfig` to get AEM.
"""

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
from . import envs  # registers the built-in gymnasium environments (trl_aem/Household-v0, ...)
from .agents import DEFAULT_PROMPT, EvalResult, evaluate, expert_sft_dataset, make_env_dataset, warm_start
from .config import AEMGRPOConfig
from .rollout import EnvRunner, Episode, EnvironmentProtocolError, ObservationRenderer, RolloutLimits
from .trainer import AEMGRPOTrainer, env_return

__version__ = "0.1.0"

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
