"""Batches with no trainable token (issue 17): AEM's span functions and the trainer go on as GRPOTrainer does."""

import math

import pytest
import torch
from conftest import base_args, red_reward
from hypothesis import given, settings
from hypothesis import strategies as st
from test_env_trainer import make_trainer
from test_rollout import SayEnv
from trl import GRPOConfig, GRPOTrainer

from trl_aem import (
    AEMGRPOConfig,
    AEMGRPOTrainer,
    aem_modulation,
    broadcast_span_values,
    span_mean_entropy,
)

# ---------------------------------------------------------------- the pure functions, on random masks


@st.composite
def masked_batches(draw):
    """(entropy, loss_mask, span_ids or None, group size): all-zero rows and batches, single tokens, NaN entropies."""
    rows = draw(st.integers(min_value=1, max_value=6))
    width = draw(st.integers(min_value=1, max_value=7))
    kind = draw(st.sampled_from(["random", "all_zero", "single_token"]))
    if kind == "all_zero":
        mask = torch.zeros(rows, width, dtype=torch.long)
    elif kind == "single_token":
        mask = torch.zeros(rows, width, dtype=torch.long)
        mask[draw(st.integers(0, rows - 1)), draw(st.integers(0, width - 1))] = 1
    else:
        bits = draw(st.lists(st.booleans(), min_size=rows * width, max_size=rows * width))
        mask = torch.tensor(bits, dtype=torch.long).view(rows, width)
        for row in draw(st.lists(st.integers(0, rows - 1), max_size=rows)):
            mask[row] = 0  # whole rows masked out
    values = draw(st.lists(st.one_of(st.floats(0.0, 8.0), st.just(float("nan"))), min_size=rows * width,
                           max_size=rows * width))
    entropy = torch.tensor(values, dtype=torch.float32).view(rows, width)
    span_ids = None
    if draw(st.booleans()):  # multi-turn: span ids per token, -1 outside spans
        ids = draw(st.lists(st.integers(-1, 3), min_size=rows * width, max_size=rows * width))
        span_ids = torch.tensor(ids).view(rows, width)
    group_size = draw(st.integers(min_value=1, max_value=rows))
    return entropy, mask, span_ids, group_size


@settings(max_examples=300, deadline=None)
@given(batch=masked_batches(), scope=st.sampled_from(["group", "trajectory", "batch"]),
       direction=st.sampled_from(["normal", "reverse", "shuffle"]), min_range=st.sampled_from([0.0, 0.1, 1.0]))
def test_span_functions_never_fail_and_alpha_stays_finite_positive_mean_one(batch, scope, direction, min_range):
    entropy, mask, span_ids, group_size = batch
    table = span_mean_entropy(entropy, mask, span_ids)
    num_spans = table.row.numel()
    assert table.response_entropy.shape == table.num_tokens.shape == table.span_id.shape == (num_spans,)
    assert table.span_index.shape == entropy.shape and (table.span_index < num_spans).all()
    if num_spans == 0:
        assert (table.span_index == -1).all()
    # spans without loss tokens have NaN entropy; the others the mean over their loss tokens
    assert torch.isnan(table.response_entropy[table.num_tokens == 0]).all()

    span_entropy = torch.where(table.num_tokens > 0, table.response_entropy,
                               torch.full_like(table.response_entropy, float("nan")))
    result = aem_modulation(span_entropy, table.row // group_size, scope=scope, direction=direction,
                            min_range=min_range, trajectory_index=table.row, generator=torch.Generator().manual_seed(0))
    alpha = result.alpha
    assert alpha.shape == (num_spans,)
    assert torch.isfinite(alpha).all() and (alpha > 0).all()
    assert torch.equal(alpha[~result.valid], torch.ones_like(alpha[~result.valid]))
    if scope == "group":
        for group in (table.row // group_size).unique():
            members = (table.row // group_size == group) & result.valid & ~result.gated
            if members.any():
                assert alpha[members].double().mean().item() == pytest.approx(1.0, abs=1e-5)

    token_alpha = broadcast_span_values(alpha, table.span_index)
    assert token_alpha.shape == entropy.shape
    assert torch.isfinite(token_alpha).all() and (token_alpha > 0).all()
    assert torch.equal(token_alpha[table.span_index < 0], torch.ones_like(token_alpha[table.span_index < 0]))


def test_all_masked_batch_gives_an_empty_table_and_alpha_one_everywhere():
    entropy = torch.rand(3, 4)
    table = span_mean_entropy(entropy, torch.zeros(3, 4))
    assert table.row.numel() == 0 and (table.span_index == -1).all()
    result = aem_modulation(table.response_entropy, table.row)
    assert result.alpha.numel() == 0
    assert torch.equal(broadcast_span_values(result.alpha, table.span_index), torch.ones(3, 4))


# ---------------------------------------------------------------- the trainer
def truncating_args(tmp_path, tokenizer, **overrides):
    """Every completion runs to max_completion_length (EOS suppressed) and is masked out of the loss."""
    values = dict(max_completion_length=3, mask_truncated_completions=True, max_steps=2,
                  generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id, tokenizer.pad_token_id]})
    values.update(overrides)
    return base_args(tmp_path, **values)


@pytest.mark.parametrize("options", [dict(loss_type="grpo"), dict(loss_type="dapo"),
                                     dict(loss_type="grpo", importance_sampling_level="sequence")],
                         ids=["grpo", "dapo", "gspo"])
def test_all_completions_truncated_trains_through_with_zero_loss_as_grpo(tmp_path, make_model, tokenizer,
                                                                         color_dataset, options):
    runs = {}
    for name, trainer_cls, config_cls in (("grpo", GRPOTrainer, GRPOConfig), ("aem", AEMGRPOTrainer, AEMGRPOConfig)):
        model = make_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = config_cls(**truncating_args(tmp_path / name, tokenizer, **options))
        trainer = trainer_cls(model=model, reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                              processing_class=tokenizer)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        assert len(logs) == 2 and all(e["loss"] == 0.0 for e in logs)
        assert all(e["completions/clipped_ratio"] == 1.0 for e in logs)  # every completion was truncated
        assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        assert all(math.isfinite(v) for e in logs for k, v in e.items() if isinstance(v, float)), logs
        runs[name] = logs
    for entry in runs["aem"]:
        # the span statistics are absent for a step with no span; the counters are there and zero
        assert entry["aem/spans"] == 0.0 and entry["aem/nonfinite_entropy_spans"] == 0.0
        assert "aem/alpha_mean" not in entry and "aem/response_entropy_mean" not in entry


def test_evaluation_of_an_all_masked_batch(tmp_path, make_model, tokenizer, color_dataset):
    args = AEMGRPOConfig(**truncating_args(tmp_path, tokenizer, eval_strategy="no", per_device_eval_batch_size=4))
    trainer = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                             eval_dataset=color_dataset.select(range(4)), processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == 0.0 and metrics["eval_aem/spans"] == 0.0
    assert all(not isinstance(v, float) or math.isfinite(v) for v in metrics.values())


class NoTurnEnv(SayEnv):
    def reset(self, seed=None, options=None):
        raise RuntimeError("could not start the simulator")


def test_multi_turn_batch_with_no_generated_token_trains_on(tmp_path, say_tokenizer):
    trainer = make_trainer(tmp_path, say_tokenizer, env=NoTurnEnv, max_steps=1)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["loss"] == 0.0 and entry["aem/spans"] == 0.0 and entry["env/episode_errors"] == 4.0
