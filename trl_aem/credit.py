"""Credit assignment beyond one advantage per episode, as pure functions over tensors (GiGPO, ECHO, SUPO).

Nothing in this module imports TRL; like :mod:`trl_aem.aem`, every function takes explicit group, episode, step or
span indices, so that it can be tested on hand-computed cases and wired into any trainer.

* GiGPO (arXiv:2505.10978), step-level credit: :func:`discounted_returns` gives every step its discounted return,
  :func:`gigpo_step_advantages` compares steps that share an *anchor state* (the same observation in the same task
  group) on those returns, and :func:`gigpo_advantages` adds the step part, weighted by ``omega``, to the episode
  part.
* ECHO (arXiv:2606.31650), traceable credit: :func:`echo_credit_mask` keeps, per episode, every generated token of the
  final segment plus the tokens of the spans the final rebuild selected (the selected turns' actions and findings, and
  the selection itself); :func:`positive_part` keeps only the positive part of an advantage.
* SUPO (arXiv:2510.06727) and ECHO both give every segment its rollout's advantage and mask overlong rollouts:
  :func:`mask_overlong`.

:func:`anchor_state_ids` turns observation texts into the integer state ids the GiGPO functions compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = [
    "STEP_SCALES",
    "anchor_state_ids",
    "discounted_returns",
    "echo_credit_mask",
    "gigpo_advantages",
    "gigpo_step_advantages",
    "mask_overlong",
    "positive_part",
]

#: How :func:`gigpo_step_advantages` scales a step's deviation from its step group's mean.
STEP_SCALES = ("std", "none")


def _check_1d(name: str, value: torch.Tensor, length: int | None = None, integer: bool = False) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor")
    if length is not None and value.numel() != length:
        raise ValueError(f"{name} must have {length} entries (one per step), got {value.numel()}")
    if integer and (value.is_floating_point() or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")


def anchor_state_ids(observations: Sequence[str]) -> torch.Tensor:
    """One integer id per observation text; equal texts get equal ids (a 52-bit hash, exact in float64).

    GiGPO's anchor states are identical observations; hashing the text lets the ids travel through float64
    collectives (``accelerator.gather``) without losing precision.
    """
    ids = [int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:13], 16) for text in observations]
    return torch.tensor(ids, dtype=torch.long)


def discounted_returns(rewards: torch.Tensor, episode_index: torch.Tensor, step_index: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """Discounted return from every step to the end of its episode: ``R_t = r_t + gamma * R_{t+1}``.

    Args:
        rewards: ``(N,)`` float, the reward of each step (the environment's reward after that step's action).
        episode_index: ``(N,)`` integer, the episode each step belongs to (episodes need not be contiguous).
        step_index: ``(N,)`` integer, the step's position in its episode; within an episode the steps must have
            distinct positions (gaps are allowed: a step's return sums the rewards of the later positions present).
        gamma: the discount, in ``[0, 1]``.

    Returns:
        ``(N,)`` returns, in ``rewards``' dtype (computed in float64). A NaN reward makes the returns of its step
        and of the earlier steps of its episode NaN.
    """
    _check_1d("rewards", rewards)
    _check_1d("episode_index", episode_index, rewards.numel(), integer=True)
    _check_1d("step_index", step_index, rewards.numel(), integer=True)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    values = rewards.detach().to(torch.float64).cpu()
    episodes, steps = episode_index.cpu(), step_index.cpu()
    out = torch.zeros_like(values)
    # order by episode, then by step, latest first; one pass accumulates each episode's return backwards
    order = sorted(range(values.numel()), key=lambda i: (int(episodes[i]), -int(steps[i])))
    previous_episode, running = None, 0.0
    for i in order:
        episode = int(episodes[i])
        if episode != previous_episode:
            previous_episode, running = episode, 0.0
        running = float(values[i]) + gamma * running
        out[i] = running
    return out.to(device=rewards.device, dtype=rewards.dtype if rewards.is_floating_point() else torch.float32)


def gigpo_step_advantages(returns: torch.Tensor, group_index: torch.Tensor, state_index: torch.Tensor, *,
                          scale: str = "std", eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """GiGPO's step-level advantage: each step against the other steps of its anchor-state group.

    A step group is every step with the same ``(group_index, state_index)``: the steps of one task's G trajectories
    that saw the same observation. Within it, ``A_step = (R - mean) / (std + eps)`` (``scale="std"``, the sample
    standard deviation as TRL's GRPO) or ``R - mean`` (``scale="none"``, verl-agent's ``mean_norm``).

    Args:
        returns: ``(N,)`` float, each step's discounted return (:func:`discounted_returns`); NaN marks a step that
            takes no part (e.g. an episode ended by an environment fault): advantage 0, not counted in any group.
        group_index: ``(N,)`` integer, the task group (prompt) of each step's episode.
        state_index: ``(N,)`` integer, the anchor state (:func:`anchor_state_ids` of the step's observation).
        scale: ``"std"`` or ``"none"``.
        eps: added to the standard deviation.

    Returns:
        ``(advantage, group_size)``: ``(N,)`` step advantages (0 for a step alone in its group, or in a group whose
        returns are all equal) and ``(N,)`` long, the size of each step's group (0 for excluded steps).
    """
    _check_1d("returns", returns)
    _check_1d("group_index", group_index, returns.numel(), integer=True)
    _check_1d("state_index", state_index, returns.numel(), integer=True)
    if scale not in STEP_SCALES:
        raise ValueError(f"scale must be one of {list(STEP_SCALES)}, got {scale!r}")
    device = returns.device
    values = returns.detach().to(torch.float64)
    valid = torch.isfinite(values)
    if values.numel() == 0:
        return returns.new_zeros(0), torch.zeros(0, dtype=torch.long, device=device)
    keys = torch.stack([group_index.to(device).long(), state_index.to(device).long()], dim=1)
    _, unit = torch.unique(keys, dim=0, return_inverse=True)
    num_units = int(unit.max().item()) + 1
    weights = valid.to(torch.float64)
    safe = torch.where(valid, values, torch.zeros_like(values))
    count = torch.zeros(num_units, dtype=torch.float64, device=device).index_add_(0, unit, weights)
    total = torch.zeros(num_units, dtype=torch.float64, device=device).index_add_(0, unit, safe)
    mean = total / count.clamp(min=1.0)
    deviation = torch.where(valid, values - mean[unit], torch.zeros_like(values))
    squares = torch.zeros(num_units, dtype=torch.float64, device=device).index_add_(0, unit, deviation ** 2)
    std = torch.sqrt(squares / (count - 1.0).clamp(min=1.0))
    advantage = deviation / (std[unit] + eps) if scale == "std" else deviation
    advantage = torch.where(valid & (count[unit] > 1), advantage, torch.zeros_like(advantage))
    size = torch.where(valid, count[unit], torch.zeros_like(count[unit])).long()
    out_dtype = returns.dtype if returns.is_floating_point() else torch.float32
    return advantage.to(out_dtype), size


def gigpo_advantages(episode_advantages: torch.Tensor, step_advantages: torch.Tensor, omega: float = 1.0) -> torch.Tensor:
    """GiGPO's combined advantage of every step: ``A_episode + omega * A_step`` (same shapes, any)."""
    if episode_advantages.shape != step_advantages.shape:
        raise ValueError(f"episode and step advantages must have the same shape, got {tuple(episode_advantages.shape)} "
                         f"and {tuple(step_advantages.shape)}")
    if not (omega >= 0 and omega < float("inf")):
        raise ValueError(f"omega must be a finite number >= 0, got {omega}")
    return episode_advantages + omega * step_advantages.to(episode_advantages.dtype)


def positive_part(advantages: torch.Tensor) -> torch.Tensor:
    """``max(A, 0)``: ECHO applies only the positive part of the group-relative advantage (failed rollouts get no
    update)."""
    return advantages.clamp(min=0.0)


def mask_overlong(advantages: torch.Tensor, overlong: torch.Tensor) -> torch.Tensor:
    """Zero the advantages of overlong rollouts (SUPO's and ECHO's rule for a rollout that ran out of rebuilds).

    Args:
        advantages: ``(B,)`` or ``(B, T)`` advantages, one row per rollout (or per segment row).
        overlong: ``(B,)`` bool, True for the rows of overlong rollouts.
    """
    if overlong.dim() != 1 or overlong.numel() != advantages.size(0):
        raise ValueError("overlong must be a (B,) bool tensor with one entry per row of advantages")
    keep = ~overlong.to(device=advantages.device, dtype=torch.bool)
    if advantages.dim() == 2:
        keep = keep.unsqueeze(1)
    return torch.where(keep, advantages, torch.zeros_like(advantages))


def echo_credit_mask(span_ids: torch.Tensor, row_episode: torch.Tensor, final_row: torch.Tensor,
                     credited_spans: torch.Tensor) -> torch.Tensor:
    """ECHO's traceable credit: which generated tokens of segment rows get a gradient.

    A token is credited when it is generated (``span_ids >= 0``) and either lies in its episode's final segment or
    belongs to one of the spans ``credited_spans`` lists for its episode: the turns selected in the episode's final
    rebuild (their actions and findings, wherever they were generated) and the final rebuild's selection. Every
    other token (earlier segments' unselected turns, earlier selections, observation and padding tokens) is not.

    Args:
        span_ids: ``(M, T)`` integer span id of every token of the ``M`` segment rows (the turn index for a turn's
            answer, a distinct id for a memory generation such as a selection), -1 for tokens outside any span.
            Span ids are unique within an episode.
        row_episode: ``(M,)`` integer, the episode each row belongs to.
        final_row: ``(M,)`` bool, True for the row of each episode's final segment.
        credited_spans: ``(K, 2)`` integer ``(episode, span_id)`` pairs credited beyond the final segments
            (``K`` may be 0).

    Returns:
        ``(M, T)`` bool mask.
    """
    if span_ids.dim() != 2:
        raise ValueError("span_ids must be a (M, T) tensor")
    _check_1d("row_episode", row_episode, span_ids.size(0), integer=True)
    _check_1d("final_row", final_row, span_ids.size(0))
    if credited_spans.dim() != 2 or credited_spans.size(1) != 2 or credited_spans.is_floating_point():
        raise ValueError("credited_spans must be a (K, 2) integer tensor of (episode, span_id) pairs")
    device = span_ids.device
    spans = span_ids.long()
    generated = spans >= 0
    in_final = final_row.to(device=device, dtype=torch.bool).unsqueeze(1) & generated
    if credited_spans.numel() == 0:
        return in_final
    stride = int(max(int(spans.max().item()), int(credited_spans[:, 1].max().item()))) + 1
    token_keys = row_episode.to(device).long().unsqueeze(1) * stride + spans.clamp(min=0)
    credited_keys = credited_spans[:, 0].to(device).long() * stride + credited_spans[:, 1].to(device).long()
    selected = torch.isin(token_keys, credited_keys) & generated
    return in_final | selected
