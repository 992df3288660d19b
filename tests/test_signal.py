"""How AEM's signal reaches the loss (issue 11): GSPO's token form for multi-span rows, failed episodes kept out of
every baseline, entropies recorded under chunked prefill, comparable clip metrics, the shuffle generator."""

import math
import warnings

import pytest
import torch
from conftest import base_args, red_reward
from datasets import Dataset
from test_env_trainer import env_dataset, make_trainer
from test_rollout import SayEnv
from trl import GRPOConfig, GRPOTrainer

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.aem import (
    row_constant_values,
    sequence_token_old_logps,
    token_entropy_from_logits,
)
from trl_aem.generation import GenerationEntropyRecorder, make_hf_generate_fn


def grad_probe(base):
    """A subclass of ``base`` keeping the loss pass's per-token log-probabilities (``probe_logps``), so a test can
    read d loss / d logp_t."""

    class Probe(base):
        probe_logps = None

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if logps.requires_grad:
                logps.retain_grad()
                type(self).probe_logps = logps
            return logps, entropies, aux

    return Probe


_GradProbe, _GRPOGradProbe = grad_probe(AEMGRPOTrainer), grad_probe(GRPOTrainer)


def loss_trainer(cls, config_cls, tmp_path, make_model, tokenizer, color_dataset, **overrides):
    args = config_cls(**base_args(tmp_path, **overrides))
    trainer = cls(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                  processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def hand_batch(tokenizer, advantages, token_mask, old_shift=None):
    """A scored batch as GRPOTrainer hands it to the loss: 2 prompt tokens, completions of ``token_mask``'s width."""
    rows, width = token_mask.shape
    words = tokenizer("say red blue green red blue green red blue green red blue", add_special_tokens=False)["input_ids"]
    completion = torch.tensor([words[:width]] * rows)
    batch = {
        "prompt_ids": torch.tensor([words[:2]] * rows),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": completion,
        "completion_mask": torch.ones(rows, width, dtype=torch.long),
        "tool_mask": token_mask.long(),
        "advantages": advantages,
        "num_items_in_batch": token_mask.sum(),
    }
    if old_shift is not None:
        batch["old_per_token_logps"] = old_shift  # filled with real logps + shift by the caller
    return batch


# ---------------------------------------------------------------- 1. sequence-level ratios and per-span alphas
def test_row_constant_values_and_sequence_token_old_logps_by_hand():
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]])
    values = torch.tensor([[2.0, 2.0, 9.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-1.0, 7.0, -1.0, -1.0]])
    torch.testing.assert_close(row_constant_values(values, mask), torch.tensor([2.0, 5.0, -1.0]))
    values[2, 3] = -0.5  # two spans with different values in row 2
    assert row_constant_values(values, mask) is None
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        row_constant_values(values[0], mask[0])

    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.5, -2.0], [-0.5, -1.5, 0.0]])
    token_mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    new_old, mean_log_ratio = sequence_token_old_logps(logps, old, token_mask)
    # row 0: log ratios 0.5, 0.5 -> m = 0.5; row 1: 0, 1 -> m = 0.5 (masked token ignored)
    torch.testing.assert_close(mean_log_ratio, torch.tensor([0.5, 0.5]))
    log_w = logps - new_old
    torch.testing.assert_close(log_w, torch.full((2, 3), 0.5))  # same ratio value on every token
    assert not new_old.requires_grad
    log_w.sum().backward()  # and one gradient path per token
    torch.testing.assert_close(logps.grad, torch.ones(2, 3))
    _, on_policy = sequence_token_old_logps(logps, None, token_mask)
    assert on_policy.abs().max() == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo", "luspo"])
def test_sequence_level_gradient_follows_each_spans_alpha(tmp_path, make_model, tokenizer, color_dataset, loss_type):
    """One row, two spans with alphas 1.5 and 0.5 (base advantage 1): d loss / d logp_t is 3x larger on the first
    span's tokens. TRL's one-ratio-per-row form gives every token the same weight (the row's mean advantage)."""
    trainer = loss_trainer(_GradProbe, AEMGRPOConfig, tmp_path, make_model, tokenizer, color_dataset,
                           importance_sampling_level="sequence", loss_type=loss_type)
    token_mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])  # span 0: tokens 0-2, observation 3-4, span 1: 5-7
    alpha = torch.tensor([[1.5, 1.5, 1.5, 1.0, 1.0, 0.5, 0.5, 0.5]])
    loss = trainer.compute_loss(trainer.model, hand_batch(tokenizer, alpha * 1.0, token_mask))
    loss.backward()
    grad = _GradProbe.probe_logps.grad[0]
    assert grad[0] < 0  # gradient descent raises the log-probability of positive-advantage tokens
    torch.testing.assert_close(grad[:3] / grad[5:], torch.full((3,), 3.0))
    assert grad[3:5].abs().max() == 0  # observation tokens take no gradient
    if loss_type == "grpo":  # per-row mean over the 6 loss tokens of -ratio * A, at ratio 1
        torch.testing.assert_close(loss.detach(), torch.tensor(-(3 * 1.5 + 3 * 0.5) / 6))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_one_value_per_row_gives_exactly_trls_numbers(tmp_path, make_model, tokenizer, color_dataset, level):
    """(B, T) advantages with one value per row (single-turn, or AEM gated) reach TRL as (B,): same loss, gradient
    and clip metrics as GRPOTrainer given those (B,) advantages, bit for bit."""
    common = dict(importance_sampling_level=level, epsilon=0.05)
    ours = loss_trainer(_GradProbe, AEMGRPOConfig, tmp_path / "a", make_model, tokenizer, color_dataset, **common)
    theirs = loss_trainer(_GRPOGradProbe, GRPOConfig, tmp_path / "b", make_model, tokenizer, color_dataset, **common)
    token_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    per_row = torch.tensor([0.7, -1.3, 0.2])
    results = []
    for trainer, probe, advantages in ((ours, _GradProbe, per_row[:, None].expand(-1, 6).clone()),
                                       (theirs, _GRPOGradProbe, per_row)):
        batch = hand_batch(tokenizer, advantages, token_mask)
        with torch.no_grad():
            logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), 6)
        # sequence ratios e^0.1, 1, e^-0.1 (token ratios vary around them): rows clip differently, and a
        # token-weighted clip fraction would differ from the per-sequence one
        batch["old_per_token_logps"] = logps + torch.tensor([[-0.1], [0.0], [0.1]]) + torch.linspace(-0.04, 0.04, 6)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("clip_ratio")}
        results.append((loss.detach(), probe.probe_logps.grad.clone(), metrics))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]
    if level == "sequence":
        assert results[0][2]["clip_ratio/high_mean"] == pytest.approx(1 / 3)  # row 0 only


def test_sequence_level_clip_metrics_count_sequences_not_tokens(tmp_path, make_model, tokenizer, color_dataset):
    """Multi-span rows at sequence level: TRL's clip metrics stay per-sequence fractions, as in a base GSPO run."""
    trainer = loss_trainer(_GradProbe, AEMGRPOConfig, tmp_path, make_model, tokenizer, color_dataset,
                           importance_sampling_level="sequence", epsilon=0.1)
    token_mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1], [1, 0, 1, 0, 0, 0, 0]])
    advantages = torch.tensor([[-1.2, -1.2, -1.2, -1.0, -0.8, -0.8, -0.8], [1.1, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0]])
    batch = hand_batch(tokenizer, advantages, token_mask)
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), 7)
    # row 0: ratio exp(-0.5) < 0.9 with a negative advantage: clipped low; row 1: ratio 1, not clipped
    batch["old_per_token_logps"] = logps + torch.tensor([[0.5] * 7, [0.0] * 7])
    trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["clip_ratio/low_mean"][-1] == pytest.approx(0.5)  # 1 of 2 sequences (tokens would give 6/8)
    assert metrics["clip_ratio/high_mean"][-1] == 0.0
    assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(0.5)
    assert metrics["clip_ratio/low_min"][-1] == 0.0 and metrics["clip_ratio/high_max"][-1] == 0.0
    assert trainer.importance_sampling_level == "sequence"  # restored after the token-form pass
    assert batch["old_per_token_logps"].shape == (2, 7) and "aem_sequence_log_ratio" not in batch  # caller's batch


def test_multi_turn_gspo_training_sends_per_turn_alphas_to_the_gradient(tmp_path, say_tokenizer):
    """Multi-turn GSPO training runs through the token form (and trains)."""
    def spread(completions, **kwargs):  # rewards with spread, so that advantages are not all zero
        return [float(i % 4) for i in range(len(completions))]

    trainer = make_trainer(tmp_path, say_tokenizer, importance_sampling_level="sequence", max_steps=2,
                           env_max_turns=3, reward_funcs=[spread])
    calls = []
    original = AEMGRPOTrainer._aem_sequence_clip_metrics

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    AEMGRPOTrainer._aem_sequence_clip_metrics = spy
    try:
        trainer.train()
    finally:
        AEMGRPOTrainer._aem_sequence_clip_metrics = original
    assert calls, "no multi-span batch went through GSPO's token form"
    assert all("clip_ratio/low_mean" in e for e in trainer.state.log_history if "loss" in e)


# ---------------------------------------------------------------- 2. failed episodes and the group baseline
class OneStepEnv(SayEnv):
    """Any action ends the episode with reward 0; a row with ``fail=True`` crashes in ``step``."""

    def reset(self, seed=None, options=None):
        self.fail = bool((options or {}).get("fail"))
        return "say red", {}

    def step(self, action):
        if self.fail:
            raise RuntimeError("simulator crashed")
        return "done", 0.0, True, False, {"success": False}


class _FixedEntropy(AEMGRPOTrainer):
    """Entropies set by the test: row r's tokens all get ``row_entropy[r]``."""

    row_entropy = None

    def _aem_collect_token_entropy(self, output):
        super()._aem_collect_token_entropy(output)
        shape = output["completion_ids"].shape
        return torch.tensor(self.row_entropy, dtype=torch.float32)[:, None].expand(shape).clone()


def test_failed_episode_takes_no_part_in_the_baseline_nor_in_aems_statistics(tmp_path, say_tokenizer):
    def flags_failures(completions, env_error, **kwargs):  # a second reward that scores the failed row differently
        return [1.0 if error else 0.0 for error in env_error]

    trainer = make_trainer(tmp_path, say_tokenizer, env=OneStepEnv, trainer_cls=_FixedEntropy,
                           reward_funcs=[flags_failures])
    trainer.model.train()
    rows = [dict(env_dataset()[0], fail=(i == 1)) for i in range(trainer.num_generations)]
    _FixedEntropy.row_entropy = [1.0, 100.0, 2.0, 3.0]  # the failed row's entropy would dominate the range
    output = trainer._generate_and_score_completions(rows)
    assert [bool(r["env_error"]) for r in rows] == [False, True, False, False]
    # healthy rewards are identical (0 + 0): every advantage is 0 (before the fix: -0.5, 0, -0.5, -0.5)
    assert trainer.aem_base_advantages.tolist() == [0.0, 0.0, 0.0, 0.0]
    # AEM's group statistics over the healthy rows' entropies 1, 2, 3 only: the hand-computed alphas
    alpha = trainer.aem_last_token_alpha
    mask = output["completion_mask"] * output["tool_mask"]
    per_row = [alpha[r][mask[r].bool()].unique().tolist() for r in range(4)]
    assert per_row[1] == [1.0]
    torch.testing.assert_close(torch.tensor([per_row[0][0], per_row[2][0], per_row[3][0]]),
                               torch.tensor([1.519441173166962, 0.9215876571554952, 0.5589711696775427]))
    entry = trainer._metrics["train"]
    assert entry["aem/nonfinite_entropy_spans"][-1] == 0.0 and entry["aem/spans"][-1] == 3.0


def test_env_return_docstring_matches_its_behaviour():
    from trl_aem.trainer import env_return

    assert env_return(None, env_return=[1.0, 2.0], env_error=[None, "boom"]) == [1.0, None]
    assert "takes no part in its group's mean and std" in env_return.__doc__


# ---------------------------------------------------------------- 3. chunked prefill and recorded entropies
class _CompareEntropy(AEMGRPOTrainer):
    """Records, per scored batch, the entropies AEM used and a fresh forward pass's, on the loss tokens."""

    pairs = []

    def _aem_collect_token_entropy(self, output):
        used = super()._aem_collect_token_entropy(output)
        fresh = self._aem_entropy_pass(output)
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask &= output["tool_mask"].bool()
        type(self).pairs.append((used[mask], fresh[mask]))
        return used


@pytest.mark.parametrize("where", ["model_generation_config", "generation_kwargs"])
def test_recorded_entropies_match_a_forward_pass_under_chunked_prefill(tmp_path, make_model, tokenizer, where):
    _CompareEntropy.pairs = []
    model = make_model()
    overrides = dict(max_steps=1, max_completion_length=10, aem_entropy_source="generation")
    if where == "model_generation_config":
        model.generation_config.prefill_chunk_size = 3
    else:
        overrides["generation_kwargs"] = {"prefill_chunk_size": 3}
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "say a color name say a color name"}]}] * 8)
    args = AEMGRPOConfig(**base_args(tmp_path, **overrides))
    trainer = _CompareEntropy(model=model, reward_funcs=red_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    assert trainer.aem_entropy_source == "generation"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: the recording itself must be right
        trainer.train()
    assert _CompareEntropy.pairs
    for used, fresh in _CompareEntropy.pairs:
        assert used.numel() > 0
        torch.testing.assert_close(used, fresh, atol=1e-5, rtol=1e-5)


def test_recorded_entropies_match_a_forward_pass_under_chunked_prefill_in_env_rollouts(tmp_path, say_tokenizer):
    _CompareEntropy.pairs = []
    trainer = make_trainer(tmp_path, say_tokenizer, trainer_cls=_CompareEntropy, max_steps=1,
                           aem_entropy_source="generation")
    trainer.model.generation_config.prefill_chunk_size = 4
    trainer.train()
    assert _CompareEntropy.pairs
    for used, fresh in _CompareEntropy.pairs:
        assert used.numel() > 0 and torch.isfinite(used).all()
        torch.testing.assert_close(used, fresh, atol=1e-5, rtol=1e-5)


def test_recorder_keeps_only_decoding_steps_and_rejects_mismatches():
    recorder = GenerationEntropyRecorder()
    logits = [torch.randn(2, 1, 5) for _ in range(6)]

    class Out:
        def __init__(self, value):
            self.logits = value

    # a 7-token prompt fed in chunks 3, 3, 1, then 3 decoding forwards of one token
    for width, value in zip([3, 3, 1, 1, 1, 1], logits):
        recorder(None, (), {"input_ids": torch.zeros(2, width, dtype=torch.long)}, Out(value))
    kept = recorder.entropies(prefill_width=7, generated_width=4)
    assert kept.shape == (2, 4)
    expected = torch.stack([token_entropy_from_logits(v[:, -1]) for v in logits[2:]], dim=1)
    torch.testing.assert_close(kept, expected)  # the last prompt chunk's step and the 3 decoding steps
    assert recorder.entropies(prefill_width=7, generated_width=5) is None  # one step too few
    assert recorder.entropies(prefill_width=7, generated_width=3) is None  # one step too many
    # synchronised generation (ZeRO-3/FSDP): a process that finished first runs extra forwards at the end
    torch.testing.assert_close(recorder.entropies(prefill_width=7, generated_width=3, trailing_steps=True),
                               expected[:, :3])
    assert recorder.entropies(prefill_width=5, generated_width=4) is None  # forwards do not add up to the prompt
    assert recorder.entropies().shape == (2, 6)


def test_hf_generate_fn_returns_nan_entropies_when_the_recording_cannot_be_matched(tokenizer, make_model, caplog,
                                                                                  monkeypatch):
    from transformers import GenerationConfig

    model = make_model().eval()
    monkeypatch.setattr(GenerationEntropyRecorder, "entropies", lambda self, **kwargs: None)
    config = GenerationConfig(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    generate = make_hf_generate_fn(model, tokenizer.pad_token_id, tokenizer.eos_token_id, config)
    tokens, entropies = generate([tokenizer("say red", add_special_tokens=False)["input_ids"]], 3)
    assert len(entropies[0]) == len(tokens[0]) > 0
    assert all(math.isnan(value) for value in entropies[0])  # NaN: the trainer falls back to a forward pass
    assert "could not match the recorded entropies" in caplog.text


# ---------------------------------------------------------------- smaller items
def test_shuffle_generator_is_separate_from_evaluation_and_saved_in_checkpoints(tmp_path, make_model, tokenizer,
                                                                               color_dataset):
    common = dict(aem_direction="shuffle", aem_min_entropy_range=0.0, max_steps=3, save_strategy="steps",
                  save_steps=1)
    args = AEMGRPOConfig(**base_args(tmp_path / "full", **common))
    full = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                          processing_class=tokenizer)
    full.train()
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / AEMGRPOTrainer.AEM_RNG_STATE_FILE, weights_only=True)
    assert not torch.equal(saved["aem_generator"], torch.Generator().manual_seed(0).get_state())  # it was used

    # Resuming at step 2 restores the generator: the run ends in the same state as the uninterrupted one.
    args = AEMGRPOConfig(**base_args(tmp_path / "full", **common))
    resumed = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                             processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert torch.equal(resumed._aem_generator.get_state(), full._aem_generator.get_state())

    # Evaluation draws from its own generator.
    before = full._aem_generator.get_state()
    full.model.eval()
    batch = [color_dataset[0]] * full.num_generations
    full._generate_and_score_completions(batch)
    assert torch.equal(full._aem_generator.get_state(), before)


def test_trajectory_scope_on_single_turn_data_warns_once(tmp_path, make_model, tokenizer, color_dataset):
    args = AEMGRPOConfig(**base_args(tmp_path, aem_scope="trajectory", max_steps=2))
    trainer = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                             processing_class=tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "aem_scope=\"trajectory\"" in str(w.message)]
    assert len(messages) == 1 and "plain GRPO" in messages[0]


def test_completions_table_shows_base_advantage_and_each_rows_alpha(tmp_path, say_tokenizer):
    trainer = make_trainer(tmp_path, say_tokenizer, max_steps=1)
    trainer.model.train()
    rows = [env_dataset()[0] for _ in range(trainer.num_generations)]
    output = trainer._generate_and_score_completions(rows)
    alpha = trainer.aem_last_token_alpha
    mask = (output["completion_mask"] * output["tool_mask"]).double()
    expected = ((alpha.double() * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    assert list(trainer._logs["extra"]["aem_alpha"]) == pytest.approx(expected)
    assert list(trainer._logs["advantages"]) == pytest.approx(trainer.aem_base_advantages.tolist())
