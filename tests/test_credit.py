"""trl_aem.credit on hand-computed cases: GiGPO's step advantages over anchor states, ECHO's credited-token mask for a
rollout with two rebuilds, the positive part, and the masking of overlong rollouts."""

import math

import pytest
import torch

from trl_aem.credit import (
    anchor_state_ids,
    discounted_returns,
    echo_credit_mask,
    gigpo_advantages,
    gigpo_step_advantages,
    mask_overlong,
    positive_part,
)

# ---------------------------------------------------------------- GiGPO
# One task (group 0), three trajectories; A and C both pass through state s1 (and all three start in s0).
#   A: s0 -> s1 -> s2, rewards 0, 0, 10   (success)
#   B: s0 -> s3,       rewards 0, 0
#   C: s0 -> s1 -> s4, rewards -1, 0, 0   (an invalid first action)
# A second task (group 1) has one trajectory D that starts in an observation with s0's text: it must not join
# group 0's step group.
STEPS = [  # (episode, step, group, state, reward)
    (0, 0, 0, "s0", 0.0), (0, 1, 0, "s1", 0.0), (0, 2, 0, "s2", 10.0),
    (1, 0, 0, "s0", 0.0), (1, 1, 0, "s3", 0.0),
    (2, 0, 0, "s0", -1.0), (2, 1, 0, "s1", 0.0), (2, 2, 0, "s4", 0.0),
    (3, 0, 1, "s0", 10.0),
]


def columns(steps=STEPS):
    episode, step, group, state, reward = zip(*steps)
    return (torch.tensor(reward), torch.tensor(episode), torch.tensor(step), torch.tensor(group),
            anchor_state_ids(state))


def test_discounted_returns_by_hand():
    rewards, episode, step, _, _ = columns()
    returns = discounted_returns(rewards, episode, step, gamma=0.5)
    # A: R2 = 10, R1 = 0 + 0.5 * 10 = 5, R0 = 0 + 0.5 * 5 = 2.5; B: 0, 0; C: R2 = 0, R1 = 0, R0 = -1; D: 10
    assert returns.tolist() == [2.5, 5.0, 10.0, 0.0, 0.0, -1.0, 0.0, 0.0, 10.0]
    # order of the rows does not matter
    perm = torch.tensor([8, 2, 5, 0, 7, 1, 3, 6, 4])
    shuffled = discounted_returns(rewards[perm], episode[perm], step[perm], gamma=0.5)
    assert shuffled.tolist() == returns[perm].tolist()
    assert discounted_returns(rewards, episode, step, gamma=1.0)[:3].tolist() == [10.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(rewards, episode, step, gamma=1.5)


def test_gigpo_step_advantages_compare_steps_that_share_an_anchor_state():
    rewards, episode, step, group, state = columns()
    returns = discounted_returns(rewards, episode, step, gamma=0.5)
    # step group (0, s0): returns 2.5, 0, -1 -> mean 0.5, deviations 2, -0.5, -1.5, sample std sqrt(6.5 / 2)
    # step group (0, s1): returns 5 (A), 0 (C) -> mean 2.5, deviations 2.5, -2.5, sample std sqrt(12.5)
    # every other step is alone in its group (D's s0 is in group 1): advantage 0
    plain, size = gigpo_step_advantages(returns, group, state, scale="none")
    assert plain.tolist() == [2.0, 2.5, 0.0, -0.5, 0.0, -1.5, -2.5, 0.0, 0.0]
    assert size.tolist() == [3, 2, 1, 3, 1, 3, 2, 1, 1]
    scaled, _ = gigpo_step_advantages(returns, group, state, scale="std", eps=0.0)
    s0, s1 = math.sqrt(6.5 / 2), math.sqrt(12.5)
    expected = [2.0 / s0, 2.5 / s1, 0.0, -0.5 / s0, 0.0, -1.5 / s0, -2.5 / s1, 0.0, 0.0]
    torch.testing.assert_close(scaled, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    # combined with the episode-level advantage, weight omega
    episode_adv = torch.tensor([1.0, 1.0, 1.0, -0.5, -0.5, -0.5, -0.5, -0.5, 0.0])
    combined = gigpo_advantages(episode_adv, plain, omega=0.5)
    assert combined.tolist() == [2.0, 2.25, 1.0, -0.75, -0.5, -1.25, -1.75, -0.5, 0.0]
    assert gigpo_advantages(episode_adv, plain, omega=0.0).tolist() == episode_adv.tolist()


def test_gigpo_excluded_steps_and_errors():
    rewards, episode, step, group, state = columns()
    returns = discounted_returns(rewards, episode, step, gamma=0.5)
    returns[3] = float("nan")  # B's first step is excluded (an environment fault): s0's group is A and C only
    adv, size = gigpo_step_advantages(returns, group, state, scale="none")
    assert adv[[0, 3, 5]].tolist() == [1.75, 0.0, -1.75] and size[[0, 3, 5]].tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match="scale"):
        gigpo_step_advantages(returns, group, state, scale="max")
    with pytest.raises(ValueError, match="group_index"):
        gigpo_step_advantages(returns, group.float(), state)
    with pytest.raises(ValueError, match="omega"):
        gigpo_advantages(returns, returns, omega=-1.0)
    assert anchor_state_ids(["a", "b", "a"]).tolist()[0] == anchor_state_ids(["a"]).item()
    assert anchor_state_ids(["a", "b"]).unique().numel() == 2
    assert int(anchor_state_ids(["x" * 100]).item()) < 2 ** 53  # exact in float64


# ---------------------------------------------------------------- ECHO
M0, M1 = 100_000, 100_001  # the span ids of rebuild 0's and rebuild 1's selections


def test_echo_credit_mask_for_a_rollout_with_two_rebuilds():
    """Episode 0 plays turns 0..6 in three segments:
        segment 0: turns 0, 1, 2, then selection M0 (selects turn 1)
        segment 1 (prompt: turn 1's record + recent turns): turns 3, 4, then selection M1 (selects turns 1 and 3)
        segment 2 (final): turns 5, 6
    Credited: all of segment 2, turn 1 (in segment 0), turn 3 and M1 (in segment 1). Not credited: turns 0, 2, 4
    and the earlier selection M0. Episode 1 rebuilt once and selected nothing: only its final segment is credited,
    its turn 1 is not (episode 0's selection of turn 1 must not leak into it)."""
    x = -1  # observation / padding tokens
    span_ids = torch.tensor([
        [0, 0, x, 1, 1, x, 2, x, M0, M0],     # episode 0, segment 0
        [3, x, 4, 4, x, M1, M1, M1, x, x],    # episode 0, segment 1
        [5, 5, x, 6, 6, 6, x, x, x, x],       # episode 0, segment 2 (final)
        [0, x, 1, 1, x, M0, x, x, x, x],      # episode 1, segment 0
        [2, 2, x, x, x, x, x, x, x, x],       # episode 1, segment 1 (final)
    ])
    row_episode = torch.tensor([0, 0, 0, 1, 1])
    final_row = torch.tensor([False, False, True, False, True])
    credited = torch.tensor([[0, 1], [0, 3], [0, M1]])
    mask = echo_credit_mask(span_ids, row_episode, final_row, credited)
    assert mask.int().tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    # no rebuild at all: the final (only) segment is credited entirely, i.e. dense credit
    only = echo_credit_mask(span_ids[2:3], torch.tensor([0]), torch.tensor([True]), torch.zeros(0, 2, dtype=torch.long))
    assert only.int().tolist() == [[1, 1, 0, 1, 1, 1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="credited_spans"):
        echo_credit_mask(span_ids, row_episode, final_row, torch.tensor([0, 1]))


def test_positive_part_and_overlong_masking():
    advantages = torch.tensor([1.5, -0.5, 0.0, -2.0])
    assert positive_part(advantages).tolist() == [1.5, 0.0, 0.0, 0.0]
    overlong = torch.tensor([False, True, False, True])
    assert mask_overlong(advantages, overlong).tolist() == [1.5, 0.0, 0.0, 0.0]
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, -1.0], [5.0, 6.0]])
    assert mask_overlong(per_token, overlong).tolist() == [[1.0, 2.0], [0.0, 0.0], [-1.0, -1.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="overlong"):
        mask_overlong(advantages, torch.tensor([True]))
