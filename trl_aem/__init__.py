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
    span_mean_entropy,
    token_entropy_from_logits,
)
from .config import AEMGRPOConfig
from .trainer import AEMGRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "AEMGRPOConfig",
    "AEMGRPOTrainer",
    "AEMResult",
    "SpanTable",
    "aem_coefficients",
    "aem_modulation",
    "broadcast_span_values",
    "modulate_advantages",
    "span_mean_entropy",
    "token_entropy_from_logits",
]
