"""The AEM formula against hand-computed numbers, and its properties (trl_aem/aem.py, no TRL involved)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_aem import (
    aem_coefficients,
    aem_modulation,
    broadcast_span_values,
    modulate_advantages,
    span_mean_entropy,
    token_entropy_from_logits,
)

# Group 0: entropies 0.5, 1.0, 1.5 -> Htilde 0, 0.5, 1 -> w = 1, e^-0.5, e^-1, mean(w) = 0.658137
#   alpha = w / mean(w) = 1.519441, 0.921588, 0.558971
GROUP0 = [0.5, 1.0, 1.5]
ALPHA0 = [1.519441173166962, 0.9215876571554952, 0.5589711696775427]
# Group 1: entropies 2.0, 2.0, 3.0, 2.5 -> Htilde 0, 0, 1, 0.5 -> w = 1, 1, e^-1, e^-0.5, mean(w) = 0.743605
ALPHA1 = [1.3448044702413735, 1.3448044702413735, 0.49472591699725404, 0.8156651425199988]
ALPHA1_REVERSE = [0.6282390533983312, 0.6282390533983312, 1.7077308027809954, 1.0357910904223424]


def test_hand_computed_two_groups_interleaved():
    # Groups need not be contiguous: interleave the spans of group 0 and group 1.
    entropy = torch.tensor([0.5, 2.0, 1.0, 2.0, 1.5, 3.0, 2.5])
    group = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    alpha = aem_coefficients(entropy, group)
    expected = torch.tensor([ALPHA0[0], ALPHA1[0], ALPHA0[1], ALPHA1[1], ALPHA0[2], ALPHA1[2], ALPHA1[3]])
    torch.testing.assert_close(alpha, expected, rtol=1e-6, atol=1e-6)


def test_reverse_direction_hand_computed():
    alpha = aem_coefficients(torch.tensor([2.0, 2.0, 3.0, 2.5]), torch.zeros(4, dtype=torch.long), direction="reverse")
    torch.testing.assert_close(alpha, torch.tensor(ALPHA1_REVERSE), rtol=1e-6, atol=1e-6)


def test_lambda_scales_the_exponent():
    # lam = 2 on group 0: w = 1, e^-1, e^-2
    w = [1.0, math.exp(-1), math.exp(-2)]
    expected = torch.tensor([x / (sum(w) / 3) for x in w])
    alpha = aem_coefficients(torch.tensor(GROUP0), torch.zeros(3, dtype=torch.long), lam=2.0)
    torch.testing.assert_close(alpha, expected, rtol=1e-6, atol=1e-6)


def test_range_gate():
    # Range 0.09 < 0.1: every alpha is 1. Range 0.11 >= 0.1: modulated.
    gated = aem_modulation(torch.tensor([1.0, 1.05, 1.09]), torch.zeros(3, dtype=torch.long))
    assert torch.equal(gated.alpha, torch.ones(3))
    assert gated.gated.all()
    open_ = aem_modulation(torch.tensor([1.0, 1.05, 1.11]), torch.zeros(3, dtype=torch.long))
    assert not open_.gated.any()
    assert open_.alpha[0] > 1 > open_.alpha[2]
    # The gate is per group: one gated group does not affect another.
    mixed = aem_coefficients(torch.tensor([1.0, 1.01, 0.5, 1.5]), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(mixed[:2], torch.ones(2))
    assert mixed[2] > 1 > mixed[3]


def test_edge_cases():
    one = torch.zeros(1, dtype=torch.long)
    assert torch.equal(aem_coefficients(torch.tensor([2.3]), one), torch.ones(1))  # a group with one span
    same = torch.zeros(4, dtype=torch.long)
    assert torch.equal(aem_coefficients(torch.full((4,), 1.7), same), torch.ones(4))  # all equal
    assert torch.equal(aem_coefficients(torch.full((4,), 1.7), same, min_range=0.0), torch.ones(4))  # 0/0 avoided
    assert torch.equal(aem_coefficients(torch.tensor(GROUP0), one.repeat(3), lam=0.0), torch.ones(3))  # lam = 0
    empty = aem_coefficients(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_nonfinite_entropy_gets_alpha_one_and_is_excluded():
    entropy = torch.tensor([0.5, float("nan"), 1.0, float("inf"), 1.5])
    result = aem_modulation(entropy, torch.zeros(5, dtype=torch.long))
    assert result.alpha[1] == 1 and result.alpha[3] == 1
    assert torch.isfinite(result.alpha).all()
    assert result.valid.tolist() == [True, False, True, False, True]
    # The valid spans are modulated exactly as group 0 alone.
    torch.testing.assert_close(result.alpha[[0, 2, 4]], torch.tensor(ALPHA0), rtol=1e-6, atol=1e-6)
    advantages = modulate_advantages(torch.tensor([1.0, -2.0, 0.0, 3.0, -1.0]), result.alpha.unsqueeze(1))
    assert torch.isfinite(advantages).all()
    # Only non-finite spans: everything gated to 1.
    assert torch.equal(aem_coefficients(torch.tensor([float("nan")] * 3), torch.zeros(3, dtype=torch.long)), torch.ones(3))


def test_scopes():
    entropy = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.0, 3.0, 2.5])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    # batch scope: one unit over all spans, range 0.5..3.0
    batch = aem_coefficients(entropy, group, scope="batch")
    htilde = (entropy.double() - 0.5) / 2.5
    w = torch.exp(-htilde)
    torch.testing.assert_close(batch, (w / w.mean()).float())
    assert batch.mean().item() == pytest.approx(1.0, abs=1e-6)
    # trajectory scope: spans 0-1 in trajectory 0, 2 in trajectory 1 (alone: gated), 3-6 in trajectory 2
    trajectory = torch.tensor([0, 0, 1, 2, 2, 2, 2])
    by_traj = aem_coefficients(entropy, group, scope="trajectory", trajectory_index=trajectory)
    assert by_traj[2] == 1.0
    expected01 = torch.tensor([1.0, math.exp(-1.0)])
    torch.testing.assert_close(by_traj[:2], (expected01 / expected01.mean()).float())
    torch.testing.assert_close(by_traj[3:], torch.tensor(ALPHA1))
    with pytest.raises(ValueError, match="trajectory_index"):
        aem_coefficients(entropy, group, scope="trajectory")


def test_shuffle_permutes_within_groups_and_is_seeded():
    entropy = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.0, 3.0, 2.5, 9.9])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    normal = aem_coefficients(entropy, group)
    seen_different = False
    for seed in range(20):
        shuffled = aem_coefficients(entropy, group, direction="shuffle", generator=torch.Generator().manual_seed(seed))
        again = aem_coefficients(entropy, group, direction="shuffle", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(shuffled, again)
        for g in range(3):
            assert sorted(shuffled[group == g].tolist()) == pytest.approx(sorted(normal[group == g].tolist()))
        seen_different |= not torch.equal(shuffled, normal)
    assert seen_different


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"scope": "global"}, "scope"),
        ({"direction": "backwards"}, "direction"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"min_range": -0.1}, "min_range"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        aem_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match="group_index"):
        aem_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="group_index"):
        aem_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="response_entropy"):
        aem_coefficients(torch.tensor([[1.0, 2.0]]), torch.tensor([0, 0]))


# ---------------------------------------------------------------- properties
span_groups = st.lists(
    st.tuples(st.integers(min_value=0, max_value=4), st.floats(min_value=0.0, max_value=8.0, allow_nan=False)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(spans=span_groups, lam=st.floats(min_value=0.0, max_value=5.0), min_range=st.floats(min_value=0.0, max_value=1.0))
def test_properties(spans, lam, min_range):
    group = torch.tensor([g for g, _ in spans])
    entropy = torch.tensor([h for _, h in spans], dtype=torch.float64)
    result = aem_modulation(entropy, group, lam=lam, min_range=min_range)
    alpha = result.alpha
    assert (alpha > 0).all()
    for g in group.unique():
        members = group == g
        # mean 1 per group (exactly 1 everywhere when gated)
        assert alpha[members].mean().item() == pytest.approx(1.0, abs=1e-9)
        h = entropy[members]
        if result.gated[members].any():
            assert torch.equal(alpha[members], torch.ones_like(alpha[members]))
            assert (h.max() - h.min() < min_range) or h.max() == h.min()
        else:
            # monotone non-increasing in entropy for direction="normal"
            order = torch.argsort(h)
            assert (alpha[members][order].diff() <= 1e-12).all()
    # the sign of every advantage is kept, zeros stay zero
    advantages = torch.randn(len(spans), dtype=torch.float64)
    advantages[::3] = 0.0
    modulated = modulate_advantages(advantages, alpha.unsqueeze(1)).squeeze(1)
    assert torch.equal(torch.sign(modulated), torch.sign(advantages))


@settings(max_examples=100, deadline=None)
@given(spans=span_groups)
def test_reverse_is_monotone_increasing(spans):
    group = torch.tensor([g for g, _ in spans])
    entropy = torch.tensor([h for _, h in spans], dtype=torch.float64)
    alpha = aem_coefficients(entropy, group, direction="reverse", min_range=0.0)
    for g in group.unique():
        members = group == g
        order = torch.argsort(entropy[members])
        assert (alpha[members][order].diff() >= -1e-12).all()


# ---------------------------------------------------------------- spans and broadcasting
def test_span_mean_entropy_single_turn():
    token_entropy = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 6.0, 9.0, 9.0]])
    loss_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    table = span_mean_entropy(token_entropy, loss_mask)
    torch.testing.assert_close(table.response_entropy, torch.tensor([2.0, 5.0]))
    assert table.row.tolist() == [0, 1] and table.num_tokens.tolist() == [3, 2]
    assert table.span_index.tolist() == [[0, 0, 0, -1], [1, 1, -1, -1]]


def test_span_mean_entropy_multi_turn_with_environment_tokens():
    # Row 0: turn 0 = tokens 0-1, environment tokens 2-3 (span -1), turn 1 = tokens 4-5.
    # Row 1: turn 0 = tokens 0-2, then padding. Row 2: one span entirely outside the loss mask (empty span).
    token_entropy = torch.tensor(
        [[1.0, 3.0, 7.0, 7.0, 0.5, 1.5], [2.0, 2.0, 5.0, 0.0, 0.0, 0.0], [4.0, 4.0, 0.0, 0.0, 0.0, 0.0]]
    )
    span_ids = torch.tensor([[0, 0, -1, -1, 1, 1], [0, 0, 0, -1, -1, -1], [0, 0, -1, -1, -1, -1]])
    loss_mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    table = span_mean_entropy(token_entropy, loss_mask, span_ids)
    assert table.row.tolist() == [0, 0, 1, 2]
    assert table.span_id.tolist() == [0, 1, 0, 0]
    assert table.num_tokens.tolist() == [2, 2, 3, 0]
    torch.testing.assert_close(table.response_entropy[:3], torch.tensor([2.0, 1.0, 3.0]))
    assert math.isnan(table.response_entropy[3].item())
    alpha = torch.tensor([2.0, 0.5, 1.5, 1.0])
    token_alpha = broadcast_span_values(alpha, table.span_index)
    assert token_alpha.tolist() == [
        [2.0, 2.0, 1.0, 1.0, 0.5, 0.5],
        [1.5, 1.5, 1.5, 1.0, 1.0, 1.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    ]
    per_token = modulate_advantages(torch.tensor([1.0, -1.0, 0.0]), token_alpha)
    assert per_token[0].tolist() == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    assert per_token[1].tolist()[:3] == [-1.5, -1.5, -1.5]
    assert per_token[2].abs().sum() == 0


def test_token_entropy_from_logits():
    uniform = torch.zeros(2, 8)
    torch.testing.assert_close(token_entropy_from_logits(uniform), torch.full((2,), math.log(8)))
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert token_entropy_from_logits(peaked).item() < 1e-6
    # temperature: entropy of softmax([2, 0] / 2) = entropy of softmax([1, 0])
    p = 1 / (1 + math.exp(-1))
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert token_entropy_from_logits(torch.tensor([2.0, 0.0]), temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy_from_logits(uniform, temperature=0.0)


def test_per_turn_alpha_by_hand():
    """Two trajectories of one group (G=2), 2 and 1 turns; the group is all three turns (the paper's rule).

    Turn mean entropies: traj 0 turn 0 = (1 + 3) / 2 = 2.0, traj 0 turn 1 = 1.0, traj 1 turn 0 = (3 + 3) / 2 = 3.0.
    Htilde = 0.5, 0, 1 -> w = e^-0.5, 1, e^-1; mean(w) = (0.606531 + 1 + 0.367879) / 3 = 0.658137
    alpha = 0.921588, 1.519441, 0.558971. Advantages: traj 0 = +1, traj 1 = -1.
    """
    token_entropy = torch.tensor([[1.0, 3.0, 9.0, 1.0], [3.0, 3.0, 0.0, 0.0]])
    span_ids = torch.tensor([[0, 0, -1, 1], [0, 0, -1, -1]])  # token 2 of row 0 is an observation token
    loss_mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]])
    table = span_mean_entropy(token_entropy, loss_mask, span_ids)
    torch.testing.assert_close(table.response_entropy, torch.tensor([2.0, 1.0, 3.0]))
    alpha = aem_coefficients(table.response_entropy, table.row // 2)
    torch.testing.assert_close(alpha, torch.tensor([ALPHA0[1], ALPHA0[0], ALPHA0[2]]), rtol=1e-6, atol=1e-6)
    advantages = modulate_advantages(torch.tensor([1.0, -1.0]), broadcast_span_values(alpha, table.span_index))
    torch.testing.assert_close(advantages[0, [0, 1, 3]], torch.tensor([ALPHA0[1], ALPHA0[1], ALPHA0[0]]))
    torch.testing.assert_close(advantages[1, :2], torch.tensor([-ALPHA0[2], -ALPHA0[2]]))


def test_span_ids_from_mask_numbers_generated_runs():
    from trl_aem import span_ids_from_mask

    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    assert span_ids_from_mask(mask).tolist() == [
        [0, 0, -1, -1, 1, 1, -1],
        [-1, 0, -1, 1, -1, 2, 2],
        [-1, -1, -1, -1, -1, -1, -1],
    ]
