"""AEM (Adaptive Entropy Modulation, arXiv:2605.00425) as pure functions over tensors.

Nothing in this module imports TRL. The trainer only wires these functions in:

1. :func:`token_entropy_from_logits` gives the full-vocabulary entropy at each generated position.
2. :func:`span_mean_entropy` turns per-token entropies, a loss mask and per-token span ids into one mean
   entropy per response span (one span per agent turn; a single-turn completion is one span).
3. :func:`aem_coefficients` turns per-span entropies and their group index into one coefficient ``alpha``
   per span: min-max normalise within the scope, gate when the range is small, then
   ``alpha = exp(-lam * Htilde) / mean(exp(-lam * Htilde))``.
4. :func:`broadcast_span_values` puts one value per span back onto a ``(B, T)`` tensor, and
   :func:`modulate_advantages` multiplies the base advantages by it.

Edge cases (all documented on :func:`aem_modulation`): a scope unit with a single valid span, or whose
entropies are all equal, or whose range is below ``min_range`` is *gated* (every alpha is 1); a span with a
NaN or infinite entropy, or with no tokens in the loss mask, is *invalid*: it takes no part in the
statistics and gets alpha 1. ``lam=0`` gives alpha exactly 1 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCOPES = ("group", "trajectory", "batch")
DIRECTIONS = ("normal", "reverse", "shuffle")


@dataclass
class AEMResult:
    """Per-span output of :func:`aem_modulation`.

    Attributes:
        alpha: ``(S,)`` float tensor, the AEM coefficient of every span (1 for gated or invalid spans).
        gated: ``(S,)`` bool tensor, True where the span's scope unit was gated (range below ``min_range``).
        valid: ``(S,)`` bool tensor, True where the span's entropy was finite (it took part in the statistics).
        normalized_entropy: ``(S,)`` float tensor, ``Htilde`` in [0, 1] (0 for gated or invalid spans).
    """

    alpha: torch.Tensor
    gated: torch.Tensor
    valid: torch.Tensor
    normalized_entropy: torch.Tensor


def token_entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary entropy of ``softmax(logits / temperature)`` over the last dimension, in float32.

    This is the quantity TRL logs as ``entropy``: the entropy of the temperature-scaled next-token
    distribution the completion was sampled from (before top-k/top-p truncation).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


@dataclass
class SpanTable:
    """Spans found in a ``(B, T)`` batch by :func:`span_mean_entropy`.

    Attributes:
        response_entropy: ``(S,)`` mean token entropy of every span (NaN for a span with no loss tokens).
        row: ``(S,)`` long, the batch row (trajectory) each span lies in.
        span_id: ``(S,)`` long, the span id inside its row (the turn index for multi-turn rollouts).
        num_tokens: ``(S,)`` long, how many loss-mask tokens the span has.
        span_index: ``(B, T)`` long, for each token the index into the ``(S,)`` arrays, or -1 if the token
            belongs to no span.
    """

    response_entropy: torch.Tensor
    row: torch.Tensor
    span_id: torch.Tensor
    num_tokens: torch.Tensor
    span_index: torch.Tensor


def span_mean_entropy(
    token_entropy: torch.Tensor, loss_mask: torch.Tensor, span_ids: torch.Tensor | None = None
) -> SpanTable:
    """Mean token entropy of every response span.

    Args:
        token_entropy: ``(B, T)`` per-token entropies.
        loss_mask: ``(B, T)`` 1 for generated tokens that enter the loss, 0 otherwise (padding, environment
            or tool tokens, masked truncated completions).
        span_ids: ``(B, T)`` integer span id of each token (for multi-turn, the turn index), -1 for tokens
            that belong to no span. ``None`` means one span per row covering its loss-mask tokens
            (single-turn). A span is a ``(row, span_id)`` pair; its mean runs over its loss-mask tokens.

    Returns:
        A :class:`SpanTable`, spans ordered by row then span id. Spans whose tokens are all outside the loss
        mask are kept (``num_tokens == 0``, entropy NaN) so the caller can count and skip them. A batch with no
        span at all (no token in any span) gives an empty table (``S == 0``, every ``span_index`` -1).
    """
    if token_entropy.dim() != 2 or loss_mask.shape != token_entropy.shape:
        raise ValueError(
            f"token_entropy and loss_mask must both be (B, T); got {tuple(token_entropy.shape)} and "
            f"{tuple(loss_mask.shape)}"
        )
    device = token_entropy.device
    mask = loss_mask.bool()
    if span_ids is None:
        span_ids = torch.where(mask, 0, -1)
    elif span_ids.shape != token_entropy.shape:
        raise ValueError(f"span_ids must be (B, T) like token_entropy; got {tuple(span_ids.shape)}")
    span_ids = span_ids.to(device=device, dtype=torch.long)
    in_span = span_ids >= 0
    num_rows = token_entropy.size(0)
    rows = torch.arange(num_rows, device=device).unsqueeze(1).expand_as(span_ids)
    stride = int(span_ids.max().item()) + 1 if in_span.any() else 1
    keys = rows * stride + span_ids.clamp(min=0)
    unique_keys, inverse = torch.unique(keys[in_span], return_inverse=True)  # sorted: row-major order
    num_spans = unique_keys.numel()
    if num_spans == 0:  # every token masked out (e.g. all completions truncated and masked): an empty table
        empty = torch.zeros(0, dtype=torch.long, device=device)
        float_dtype = token_entropy.dtype if token_entropy.is_floating_point() else torch.float32
        return SpanTable(torch.zeros(0, dtype=float_dtype, device=device), empty, empty.clone(), empty.clone(),
                         torch.full_like(span_ids, -1))

    span_index = torch.full_like(span_ids, -1)
    span_index[in_span] = inverse
    counted = in_span & mask
    weights = counted.to(torch.float64)
    safe_entropy = torch.where(counted, token_entropy.double(), torch.zeros((), dtype=torch.float64, device=device))
    flat_index = span_index.clamp(min=0).reshape(-1)
    sums = torch.zeros(num_spans, dtype=torch.float64, device=device).index_add_(
        0, flat_index, (safe_entropy * weights).reshape(-1)
    )
    counts = torch.zeros(num_spans, dtype=torch.float64, device=device).index_add_(0, flat_index, weights.reshape(-1))
    mean = torch.where(counts > 0, sums / counts.clamp(min=1.0), torch.full_like(sums, float("nan")))
    return SpanTable(
        response_entropy=mean.to(token_entropy.dtype if token_entropy.is_floating_point() else torch.float32),
        row=torch.div(unique_keys, stride, rounding_mode="floor"),
        span_id=unique_keys % stride,
        num_tokens=counts.long(),
        span_index=span_index,
    )


def span_ids_from_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Number the contiguous runs of 1s in each row of a ``(B, T)`` loss mask: 0, 1, 2, ... (-1 outside runs).

    For trajectories whose generated turns are separated by masked tool/environment tokens (TRL's ``tool_mask``,
    a ``rollout_func``'s ``env_mask``), each run is one generated turn, i.e. one AEM span.
    """
    mask = loss_mask.bool()
    starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    run_index = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(mask, run_index, torch.full_like(run_index, -1))


def _validate(response_entropy, group_index, lam, min_range, scope, direction, trajectory_index):
    if not isinstance(response_entropy, torch.Tensor) or response_entropy.dim() != 1:
        raise ValueError("response_entropy must be a 1-D tensor with one mean entropy per span")
    if not response_entropy.is_floating_point():
        raise ValueError(f"response_entropy must be a float tensor, got dtype {response_entropy.dtype}")
    if not isinstance(group_index, torch.Tensor) or group_index.shape != response_entropy.shape:
        raise ValueError("group_index must be a 1-D tensor with one group id per span (same length as response_entropy)")
    if group_index.is_floating_point() or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must be an integer tensor, got dtype {group_index.dtype}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (lam >= 0 and lam < float("inf")):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if not (min_range >= 0 and min_range < float("inf")):
        raise ValueError(f"min_range must be a finite number >= 0, got {min_range}")
    if scope == "trajectory":
        if trajectory_index is None:
            raise ValueError('scope="trajectory" needs trajectory_index (the trajectory each span belongs to)')
        if trajectory_index.shape != response_entropy.shape or trajectory_index.is_floating_point():
            raise ValueError("trajectory_index must be a 1-D integer tensor with one entry per span")


def _segment_stats(values: torch.Tensor, unit: torch.Tensor, valid: torch.Tensor, num_units: int):
    """Per-unit min, max, count of ``values`` over ``valid`` entries (float64)."""
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    vmin = torch.full((num_units,), float("inf"), dtype=values.dtype, device=values.device)
    vmax = torch.full((num_units,), float("-inf"), dtype=values.dtype, device=values.device)
    vmin = vmin.scatter_reduce(0, unit, torch.where(valid, values, inf), reduce="amin")
    vmax = vmax.scatter_reduce(0, unit, torch.where(valid, values, -inf), reduce="amax")
    count = torch.zeros(num_units, dtype=values.dtype, device=values.device).index_add_(0, unit, valid.to(values.dtype))
    return vmin, vmax, count


def _shuffle_within(values: torch.Tensor, group: torch.Tensor, eligible: torch.Tensor, generator) -> torch.Tensor:
    """Permute ``values[eligible]`` at random within each group (uniformly, driven by ``generator``)."""
    idx = torch.nonzero(eligible, as_tuple=False).squeeze(1)
    if idx.numel() < 2:
        return values
    sub_group = group[idx].to(torch.float64)
    # Both orderings list the members of each group as one contiguous block, in the same block order: the first
    # in index order, the second in a random order. Pairing them position by position permutes within groups.
    rank = torch.arange(idx.numel(), dtype=torch.float64, device=values.device) / idx.numel()
    noise = torch.rand(idx.numel(), generator=generator, dtype=torch.float64, device="cpu").to(values.device)
    by_index = torch.argsort(sub_group * 2 + rank, stable=True)
    by_noise = torch.argsort(sub_group * 2 + noise, stable=True)
    out = values.clone()
    out[idx[by_index]] = values[idx[by_noise]]
    return out


def aem_modulation(
    response_entropy: torch.Tensor,
    group_index: torch.Tensor,
    *,
    lam: float = 1.0,
    min_range: float = 0.1,
    scope: str = "group",
    direction: str = "normal",
    trajectory_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AEMResult:
    """AEM coefficients with the diagnostics the trainer logs; see :func:`aem_coefficients` for the arguments.

    Rules, per scope unit (a group, a trajectory, or the whole batch):

    * Valid spans are those with a finite entropy; invalid spans get alpha 1 and are not counted.
    * ``range = max - min`` of the valid entropies. If the unit has fewer than 2 valid spans, or
      ``range < min_range``, or ``range == 0``, the unit is gated: alpha is 1 for all its spans.
    * Otherwise ``Htilde = (H - min) / range`` and ``w = exp(-lam * Htilde)`` (``exp(+lam * Htilde)`` for
      ``direction="reverse"``), and ``alpha = w / mean_unit(w)``, so alpha averages exactly 1 over the valid
      spans of every unit (and over all its spans, since invalid ones are 1).
    * ``direction="shuffle"`` computes the normal alpha, then permutes the alphas of valid spans at random
      within each group (``group_index``), using ``generator``.
    """
    _validate(response_entropy, group_index, lam, min_range, scope, direction, trajectory_index)
    device = response_entropy.device
    num_spans = response_entropy.numel()
    entropy = response_entropy.detach().to(torch.float64)
    valid = torch.isfinite(entropy)
    if num_spans == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=device)
        return AEMResult(response_entropy.new_ones(0), empty, empty, response_entropy.new_zeros(0))

    if scope == "group":
        raw_unit = group_index.to(device=device, dtype=torch.long)
    elif scope == "trajectory":
        raw_unit = trajectory_index.to(device=device, dtype=torch.long)
    else:
        raw_unit = torch.zeros(num_spans, dtype=torch.long, device=device)
    _, unit = torch.unique(raw_unit, return_inverse=True)
    num_units = int(unit.max().item()) + 1

    vmin, vmax, count = _segment_stats(entropy, unit, valid, num_units)
    value_range = vmax - vmin
    unit_active = (count >= 2) & (value_range > 0) & (value_range >= min_range)
    active = unit_active[unit] & valid

    safe_range = torch.where(unit_active, value_range, torch.ones_like(value_range))
    normalized = torch.where(active, (entropy - vmin[unit]) / safe_range[unit], torch.zeros_like(entropy))
    sign = 1.0 if direction == "reverse" else -1.0
    weight = torch.where(active, torch.exp(sign * lam * normalized), torch.zeros_like(entropy))
    weight_sum = torch.zeros(num_units, dtype=torch.float64, device=device).index_add_(0, unit, weight)
    weight_mean = weight_sum / count.clamp(min=1.0)
    alpha = torch.where(active, weight / torch.where(unit_active, weight_mean, 1.0)[unit], torch.ones_like(entropy))

    if direction == "shuffle":
        alpha = _shuffle_within(alpha, group_index.to(device=device, dtype=torch.long), valid, generator)

    out_dtype = response_entropy.dtype
    return AEMResult(
        alpha=alpha.to(out_dtype),
        gated=valid & ~unit_active[unit],
        valid=valid,
        normalized_entropy=normalized.to(out_dtype),
    )


def aem_coefficients(
    response_entropy: torch.Tensor,
    group_index: torch.Tensor,
    *,
    lam: float = 1.0,
    min_range: float = 0.1,
    scope: str = "group",
    direction: str = "normal",
    trajectory_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One AEM coefficient ``alpha`` per response span.

    Args:
        response_entropy: ``(S,)`` float, the mean token entropy ``Hbar_k`` of every span.
        group_index: ``(S,)`` integer, the group (prompt) each span belongs to; groups need not be contiguous.
        lam: the strength ``lambda`` (paper: 1.0). ``lam=0`` gives alpha 1 everywhere.
        min_range: the range gate (paper: 0.1): a unit whose entropy range is below it keeps alpha 1.
        scope: where min-max normalisation and the mean run: ``"group"`` (the paper's), ``"trajectory"``
            (needs ``trajectory_index``), ``"batch"`` (all spans together; the EMPG-style baseline).
        direction: ``"normal"`` (``exp(-lam * Htilde)``, the paper's), ``"reverse"`` (``exp(+lam * Htilde)``),
            or ``"shuffle"`` (normal alphas permuted at random within each group, seeded by ``generator``).
        trajectory_index: ``(S,)`` integer, the trajectory each span belongs to (only for ``scope="trajectory"``).
        generator: a ``torch.Generator`` (CPU) for ``direction="shuffle"``.

    Returns:
        ``(S,)`` tensor of alphas, > 0, with mean exactly 1 over each scope unit (1 everywhere in a gated unit;
        1 for spans with NaN/inf entropy). See :func:`aem_modulation` for the full rules.
    """
    return aem_modulation(
        response_entropy,
        group_index,
        lam=lam,
        min_range=min_range,
        scope=scope,
        direction=direction,
        trajectory_index=trajectory_index,
        generator=generator,
    ).alpha


def broadcast_span_values(span_values: torch.Tensor, span_index: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """Put one value per span onto every token of that span.

    Args:
        span_values: ``(S,)`` values, e.g. alphas.
        span_index: ``(B, T)`` index of each token's span into ``span_values`` (as :class:`SpanTable` gives it),
            -1 for tokens outside any span.
        fill: the value for tokens outside any span.

    Returns:
        ``(B, T)`` tensor of ``span_values``' dtype.
    """
    gathered = span_values[span_index.clamp(min=0)] if span_values.numel() else span_values.new_empty(span_index.shape)
    return torch.where(span_index >= 0, gathered, torch.full_like(gathered, fill))


def modulate_advantages(advantages: torch.Tensor, token_alpha: torch.Tensor) -> torch.Tensor:
    """``A_aem = alpha * A_base`` per token.

    Args:
        advantages: ``(B,)`` base advantages (one per trajectory) or ``(B, T)`` per-token advantages.
        token_alpha: ``(B, T)`` alpha of each token's span (1 outside spans).

    Returns:
        ``(B, T)`` advantages. Signs are kept and zeros stay zero, because alpha > 0.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return advantages * token_alpha.to(advantages.dtype)


def row_constant_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The one value of each row of ``values`` over its mask, or ``None`` if some row holds two different values.

    Args:
        values: ``(B, T)`` per-token values (e.g. AEM's advantages ``alpha * A_base``).
        mask: ``(B, T)`` 1 for the tokens that count (the loss mask).

    Returns:
        ``(B,)`` tensor: for each row the value its masked tokens share (the value at column 0 for a row with no
        masked token), or ``None`` when a row's masked tokens differ (a multi-span row with distinct alphas).
        Used to hand TRL ``(B,)`` advantages wherever a ``(B, T)`` tensor would carry nothing more, so its loss
        and metrics are exactly those of the base method.
    """
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"values and mask must both be (B, T); got {tuple(values.shape)} and {tuple(mask.shape)}")
    present = mask.bool()
    has_token = present.any(dim=1)
    first = torch.where(has_token, present.int().argmax(dim=1), torch.zeros_like(has_token, dtype=torch.long))
    per_row = values.gather(1, first.unsqueeze(1)).squeeze(1)
    same = (values == per_row.unsqueeze(1)) | ~present
    return per_row if bool(same.all()) else None


def sequence_token_old_logps(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
                             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Old log-probabilities that turn a token-level ratio into GSPO's token form of the sequence ratio.

    GSPO's sequence-level ratio ``s = exp(mean_t (logp_t - old_t))`` has one gradient path per sequence, so a row's
    per-token advantages only enter through their mean. The GSPO-token form (GSPO paper, eq. for per-token
    advantages) keeps the value and gives each token its own path:
    ``log w_t = logp_t - sg(logp_t) + sg(mean_t (logp_t - old_t))``. A token-level loss computes
    ``log w_t = logp_t - old'_t``; this returns ``old'_t = sg(logp_t) - sg(m)`` so that it computes exactly that.

    Args:
        per_token_logps: ``(B, T)`` log-probabilities under the current policy (with gradient).
        old_per_token_logps: ``(B, T)`` log-probabilities under the sampling policy, or ``None`` (on-policy: equal
            to ``per_token_logps``, ratio 1).
        mask: ``(B, T)`` loss mask; the mean runs over it (as TRL's sequence-level ratio).

    Returns:
        ``(old', m)``: ``(B, T)`` detached old log-probabilities and the ``(B,)`` mean sequence log ratio ``m``.
    """
    current = per_token_logps.detach()
    old = current if old_per_token_logps is None else old_per_token_logps
    weights = mask.to(current.dtype)
    log_ratio = torch.where(mask.bool(), current - old, torch.zeros_like(current))
    mean_log_ratio = log_ratio.sum(-1) / weights.sum(-1).clamp(min=1.0)
    return current - mean_log_ratio.unsqueeze(-1), mean_log_ratio
