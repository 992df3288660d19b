"""Segment rows for ``env_context="window"``: padded training tensors, and splits that never drop a row.

With a windowed context every turn of an episode is one training row (a *segment*, see :mod:`trl_aem.context`), so
a rollout of N episodes gives a number of rows that varies from one rollout to the next. These pure functions turn
the segments into the padded tensors TRL's loss reads, and split a variable number of rows into TRL's
``steps_per_generation`` micro-batches (and a micro-batch into bounded forward passes) without dropping,
duplicating or reordering statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["pad_segments", "row_parts", "split_rows", "take_rows"]


def _pad(rows: Sequence[Sequence], value, side: str, multiple: int | None, dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    width = max(width, 1)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            values = torch.tensor(list(row), dtype=dtype)
            if side == "left":
                out[i, width - len(row):] = values
            else:
                out[i, : len(row)] = values
    return out


def pad_segments(segments: Sequence[Any], pad_token_id: int, eos_token_ids: Sequence[int], *,
                 pad_to_multiple_of: int | None = None, mask_truncated: bool = False) -> dict[str, torch.Tensor]:
    """Padded tensors of segment rows, as TRL's scored batch holds them.

    Args:
        segments: objects with ``prompt_ids``, ``completion_ids``, ``env_mask``, ``span_ids`` and ``token_entropy``
            (:class:`trl_aem.rollout.Segment`). A segment with no completion token becomes one masked pad token.
        pad_token_id: the padding id (prompts are left-padded, completions right-padded, as TRL does).
        eos_token_ids: the ids that end a turn.
        pad_to_multiple_of: pad widths to a multiple of this (TRL's ``pad_to_multiple_of``).
        mask_truncated: TRL's ``mask_truncated_completions``: a row whose last generated token is not an EOS (or
            pad) is left out of the loss.

    Returns:
        ``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask`` (1 on every completion token, as
        TRL's rollout path), ``tool_mask`` (1 on generated tokens), ``span_ids`` (turn index on generated tokens,
        -1 elsewhere) and ``token_entropy`` (recorded entropies, 0 elsewhere), all ``(M, width)``.
    """
    completions = [list(s.completion_ids) or [pad_token_id] for s in segments]
    env_masks = [list(s.env_mask) if s.completion_ids else [0] for s in segments]
    span_ids = [list(s.span_ids) if s.completion_ids else [-1] for s in segments]
    entropies = [list(s.token_entropy) if s.completion_ids else [0.0] for s in segments]
    prompts = [list(s.prompt_ids) or [pad_token_id] for s in segments]
    batch = {
        "prompt_ids": _pad(prompts, pad_token_id, "left", pad_to_multiple_of, torch.long),
        "prompt_mask": _pad([[1] * len(p) for p in prompts], 0, "left", pad_to_multiple_of, torch.long),
        "completion_ids": _pad(completions, pad_token_id, "right", pad_to_multiple_of, torch.long),
        "completion_mask": _pad([[1] * len(c) for c in completions], 0, "right", pad_to_multiple_of, torch.long),
        "tool_mask": _pad(env_masks, 0, "right", pad_to_multiple_of, torch.long),
        "span_ids": _pad(span_ids, -1, "right", pad_to_multiple_of, torch.long),
        "token_entropy": _pad(entropies, 0.0, "right", pad_to_multiple_of, torch.float32),
    }
    if mask_truncated:
        ends = set(eos_token_ids) | {pad_token_id}
        kept = torch.tensor([bool(s.completion_ids) and s.completion_ids[-1] in ends for s in segments])
        batch["completion_mask"] = batch["completion_mask"] * kept.unsqueeze(1).long()
        batch["tool_mask"] = batch["tool_mask"] * kept.unsqueeze(1).long()
    return batch


def take_rows(batch: dict[str, Any], index: torch.Tensor | slice) -> dict[str, Any]:
    """The rows ``index`` of every per-row entry of ``batch`` (tensors with a first dimension, lists); 0-dim
    tensors and other values are shared."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value[index]
        elif isinstance(value, list):
            positions = range(len(value))[index] if isinstance(index, slice) else index.tolist()
            out[key] = [value[i] for i in positions]
        else:
            out[key] = value
    return out


def split_rows(num_rows: int, num_chunks: int) -> list[slice]:
    """``num_chunks`` consecutive slices covering ``range(num_rows)``, sizes differing by at most one (the first
    ones larger); every row in exactly one slice. Chunks are empty only when ``num_rows < num_chunks``."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    base, extra = divmod(num_rows, num_chunks)
    slices, start = [], 0
    for k in range(num_chunks):
        size = base + (1 if k < extra else 0)
        slices.append(slice(start, start + size))
        start += size
    return slices


def row_parts(num_rows: int, max_rows: int | None) -> list[slice]:
    """Consecutive slices of at most ``max_rows`` rows covering ``range(num_rows)`` (one slice if ``None``)."""
    if max_rows is None or num_rows <= max_rows:
        return [slice(0, num_rows)]
    return [slice(start, min(start + max_rows, num_rows)) for start in range(0, num_rows, max_rows)]
