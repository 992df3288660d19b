"""Command-line scripts behind ``trl-aem train`` and ``trl-aem eval`` (each also runs as ``python -m``)."""

from __future__ import annotations

import sys
import warnings
from typing import NoReturn

#: Known, harmless warnings the command line and the CPU demo hide (regular expressions of their start). transformers
#: 5 renamed gradient checkpointing to activation checkpointing and warns on every use of the old names, which TRL 1.16
#: uses itself: its configs default to ``gradient_checkpointing=True`` and its generation helper calls
#: ``is_gradient_checkpointing`` and ``gradient_checkpointing_disable``/``_enable``; the old names keep working in v5.
KNOWN_HARMLESS_WARNINGS = (
    (FutureWarning,
     r"`(is_)?gradient_checkpointing(_kwargs|_enable|_disable)?` is deprecated and will be removed in v6",
     r"transformers\."),
)


def usage_error(prog: str | None, message) -> NoReturn:
    """Print ``<prog>: error: <message>`` to stderr and exit with code 2 (a usage error), without argparse's usage
    block (the training parser's lists hundreds of options)."""
    print(f"{prog or 'trl-aem'}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def quiet_known_noise() -> None:
    """Hide known, harmless console noise in this process; for entry points only (``trl-aem``, the training script,
    ``examples/cpu_demo.py``), never called on import.

    Ignores the warnings of :data:`KNOWN_HARMLESS_WARNINGS` (by category, message and the module that warns) and
    turns off ``datasets``' progress bars (the warm start's ``SFTTrainer`` preparing a few hundred rows built in
    memory draws four of them). Other warnings and the training progress bar are untouched.
    """
    for category, message, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    import datasets

    datasets.disable_progress_bars()
