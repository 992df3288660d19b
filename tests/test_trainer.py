"""AEMGRPOTrainer on a tiny offline Qwen2: equivalence with GRPOTrainer, GRPO options, entropy sources, errors."""

import math

import pytest
import torch
from conftest import base_args, red_reward, short_reward
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.trainer import SCORED_BATCH_KEYS

AEM_METRICS = [
    "aem/alpha_mean", "aem/alpha_std", "aem/alpha_min", "aem/alpha_max", "aem/gated_frac",
    "aem/response_entropy_mean", "aem/neg_adv_frac", "aem/nonfinite_entropy_spans",
]


def train(trainer_cls, config_cls, tmp_path, model, tokenizer, dataset, reward_funcs=red_reward, peft_config=None,
          **overrides):
    args = config_cls(**base_args(tmp_path, **overrides))
    if args.beta != 0.0 and peft_config is None:
        # GRPOTrainer loads its reference model from the policy's path: give the in-memory model one.
        model.save_pretrained(tmp_path / "init")
        model.config._name_or_path = str(tmp_path / "init")
    trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return trainer


def step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def scored_logs(trainer):
    """Log entries of optimizer steps that generated and scored a new batch (they carry AEM's metrics)."""
    entries = [entry for entry in step_logs(trainer) if "aem/alpha_mean" in entry]
    assert entries, "no step logged AEM metrics"
    return entries


def final_weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["generation-entropy", "old-logps-entropy"])
def test_aem_off_and_lambda_zero_reproduce_grpo(tmp_path, make_model, tokenizer, color_dataset, num_iterations):
    """Same seed: use_aem=False and aem_lambda=0 give GRPOTrainer's losses and final weights, bit for bit."""
    common = dict(num_iterations=num_iterations, max_steps=3, beta=0.05)
    grpo = train(GRPOTrainer, GRPOConfig, tmp_path / "grpo", make_model(), tokenizer, color_dataset, **common)
    off = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path / "off", make_model(), tokenizer, color_dataset,
                use_aem=False, **common)
    zero = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path / "zero", make_model(), tokenizer, color_dataset,
                 aem_lambda=0.0, aem_min_entropy_range=0.0, **common)
    grpo_losses = [entry["loss"] for entry in step_logs(grpo)]
    assert any(loss != 0 for loss in grpo_losses)  # the comparison is not vacuous
    assert [entry["loss"] for entry in step_logs(off)] == grpo_losses
    assert [entry["loss"] for entry in step_logs(zero)] == grpo_losses
    assert [entry["grad_norm"] for entry in step_logs(zero)] == [entry["grad_norm"] for entry in step_logs(grpo)]
    reference = final_weights(grpo)
    assert any(not torch.equal(p, q) for p, q in zip(reference.values(), {n: p for n, p in make_model().named_parameters()}.values()))
    for other in (off, zero):
        weights = final_weights(other)
        assert all(torch.equal(reference[name], weights[name]) for name in reference)
    assert all(entry["aem/alpha_std"] == 0.0 for entry in scored_logs(zero))
    assert "aem/alpha_mean" not in step_logs(off)[0]


def test_reporting_callbacks_leave_training_unchanged(tmp_path, make_model, tokenizer, color_dataset):
    """Progress bar with success, plots after every log: use_aem=False and aem_lambda=0 still equal GRPOTrainer."""
    common = dict(max_steps=3, disable_tqdm=False)
    grpo = train(GRPOTrainer, GRPOConfig, tmp_path / "grpo", make_model(), tokenizer, color_dataset, **common)
    off = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path / "off", make_model(), tokenizer, color_dataset,
                use_aem=False, aem_plot_every=1, **common)
    zero = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path / "zero", make_model(), tokenizer, color_dataset,
                 aem_lambda=0.0, aem_plot_every=1, **common)
    grpo_losses = [entry["loss"] for entry in step_logs(grpo)]
    assert any(loss != 0 for loss in grpo_losses)
    reference = final_weights(grpo)
    for other in (off, zero):
        assert [entry["loss"] for entry in step_logs(other)] == grpo_losses
        weights = final_weights(other)
        assert all(torch.equal(reference[name], weights[name]) for name in reference)
    # the callbacks really ran
    assert (tmp_path / "off" / "plots" / "entropy.png").exists() and (tmp_path / "zero" / "plots" / "alpha.png").exists()
    names = {type(cb).__name__ for cb in off.callback_handler.callbacks}
    assert {"AEMPlotCallback", "SuccessProgressCallback"} <= names


def test_aem_changes_training_and_logs_metrics(tmp_path, make_model, tokenizer, color_dataset):
    grpo = train(GRPOTrainer, GRPOConfig, tmp_path / "grpo", make_model(), tokenizer, color_dataset, max_steps=3)
    aem = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path / "aem", make_model(), tokenizer, color_dataset,
                max_steps=3, aem_min_entropy_range=0.0)
    logs = scored_logs(aem)
    assert len(logs) == 3
    for key in AEM_METRICS:
        assert all(key in entry and math.isfinite(entry[key]) for entry in logs), key
    assert any(entry["aem/alpha_std"] > 0 for entry in logs)
    for entry in logs:
        assert entry["aem/alpha_mean"] == pytest.approx(1.0, abs=1e-5)
        assert 0 < entry["aem/alpha_min"] <= 1.0 <= entry["aem/alpha_max"]
        assert 0.0 <= entry["aem/neg_adv_frac"] <= 1.0
        assert entry["aem/nonfinite_entropy_spans"] == 0.0
    weights_grpo, weights_aem = final_weights(grpo), final_weights(aem)
    assert any(not torch.equal(weights_grpo[n], weights_aem[n]) for n in weights_grpo)


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": "grpo"},
        {"loss_type": "dapo"},
        {"loss_type": "dr_grpo"},
        {"loss_type": "bnpo"},
        {"importance_sampling_level": "sequence", "loss_type": "grpo"},  # GSPO
        {"scale_rewards": "group"},
        {"scale_rewards": "batch"},
        {"scale_rewards": "none"},
        {"num_iterations": 2},
        {"beta": 0.1},
        {"aem_scope": "trajectory"},
        {"aem_scope": "batch"},
        {"aem_direction": "reverse"},
        {"aem_direction": "shuffle"},
        {"aem_entropy_source": "extra_pass"},
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_grpo_options_compose_with_aem(tmp_path, make_model, tokenizer, color_dataset, overrides):
    trainer = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path, make_model(), tokenizer, color_dataset,
                    aem_min_entropy_range=0.0, **overrides)
    assert len(step_logs(trainer)) == 2
    for entry in step_logs(trainer):
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"])
    logs = scored_logs(trainer)
    for entry in logs:
        assert entry["aem/alpha_mean"] == pytest.approx(1.0, abs=1e-5)
    if overrides.get("aem_scope") != "trajectory":  # single-turn: one span per trajectory, so always gated
        assert any(entry["aem/alpha_std"] > 0 for entry in logs)
    else:
        assert all(entry["aem/gated_frac"] == 1.0 for entry in logs)


def test_several_reward_functions(tmp_path, make_model, tokenizer, color_dataset):
    trainer = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path, make_model(), tokenizer, color_dataset,
                    reward_funcs=[red_reward, short_reward], reward_weights=[1.0, 0.5], aem_min_entropy_range=0.0)
    logs = scored_logs(trainer)
    assert "rewards/red_reward/mean" in logs[0] and "rewards/short_reward/mean" in logs[0]
    assert any(entry["aem/alpha_std"] > 0 for entry in logs)


def test_lora(tmp_path, make_model, tokenizer, color_dataset):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], task_type="CAUSAL_LM")
    trainer = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path, make_model(), tokenizer, color_dataset,
                    peft_config=lora, beta=0.05, aem_min_entropy_range=0.0)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all(math.isfinite(entry["loss"]) for entry in step_logs(trainer))
    assert any(entry["aem/alpha_std"] > 0 for entry in scored_logs(trainer))
    assert trainer.aem_entropy_source == "generation"


def _scored_batch(trainer, dataset, num_prompts=2):
    trainer.model.train()
    rows = [dataset[i] for i in range(num_prompts) for _ in range(trainer.num_generations)]
    return trainer._generate_and_score_completions(rows)


class _RecordingTrainer(AEMGRPOTrainer):
    """Keeps the entropies AEM used, and counts scoring passes."""

    passes = 0

    def _aem_collect_token_entropy(self, output):
        self.used_entropy = super()._aem_collect_token_entropy(output)
        return self.used_entropy

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        type(self).passes += 1
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)


@pytest.mark.parametrize("source, overrides", [("generation", {}), ("old_logps", {"num_iterations": 2})])
def test_entropy_sources_agree_with_an_extra_forward_pass(tmp_path, make_model, tokenizer, color_dataset, source,
                                                          overrides):
    """Recorded entropies equal those of a fresh forward pass under the sampling policy, at every loss token."""
    args = AEMGRPOConfig(**base_args(tmp_path, aem_entropy_source=source, **overrides))
    trainer = _RecordingTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                                processing_class=tokenizer)
    assert trainer.aem_entropy_source == source
    _RecordingTrainer.passes = 0
    output = _scored_batch(trainer, color_dataset)
    passes_in_scoring = _RecordingTrainer.passes
    # No extra forward pass: "generation" runs none, "old_logps" reuses the one TRL runs anyway.
    assert passes_in_scoring == (0 if source == "generation" else 1)
    assert output["advantages"].shape == output["completion_ids"].shape
    recomputed = trainer._aem_entropy_pass(output)
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(trainer.used_entropy[mask], recomputed[mask], rtol=1e-4, atol=1e-4)


def test_scored_batch_advantages_are_alpha_times_base(tmp_path, make_model, tokenizer, color_dataset):
    """End of scoring: (B, T) advantages equal alpha (from the pure function) times GRPO's advantage."""
    from trl_aem import aem_coefficients, span_mean_entropy

    args = AEMGRPOConfig(**base_args(tmp_path, aem_min_entropy_range=0.0))
    trainer = _RecordingTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                                processing_class=tokenizer)
    grpo_advantages = {}
    original = GRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        grpo_advantages["value"] = out["advantages"].clone()
        return out

    GRPOTrainer._generate_and_score_completions = spy
    try:
        output = _scored_batch(trainer, color_dataset)
    finally:
        GRPOTrainer._generate_and_score_completions = original
    base = grpo_advantages["value"]
    table = span_mean_entropy(trainer.used_entropy, output["completion_mask"])
    alpha = aem_coefficients(table.response_entropy, table.row // trainer.num_generations, min_range=0.0)
    mask = output["completion_mask"].bool()
    expected = (base.unsqueeze(1) * alpha.unsqueeze(1)).expand_as(output["advantages"])
    torch.testing.assert_close(output["advantages"][mask], expected[mask])
    assert torch.equal(torch.sign(output["advantages"][mask]), torch.sign(expected[mask]))


@pytest.mark.parametrize(
    "field, value",
    [
        ("aem_lambda", -1.0),
        ("aem_lambda", float("inf")),
        ("aem_lambda", "strong"),
        ("aem_min_entropy_range", -0.5),
        ("aem_scope", "global"),
        ("aem_direction", "sideways"),
        ("aem_entropy_source", "magic"),
        ("use_aem", "yes"),
    ],
)
def test_bad_aem_fields_raise_at_config(tmp_path, field, value):
    with pytest.raises(ValueError, match=field) as excinfo:
        AEMGRPOConfig(**base_args(tmp_path, **{field: value}))
    if field in ("aem_scope", "aem_direction", "aem_entropy_source"):
        assert "must be one of" in str(excinfo.value)


def test_num_generations_one_raises(tmp_path):
    with pytest.raises(ValueError, match="at least 2 generations"):
        AEMGRPOConfig(**base_args(tmp_path, num_generations=1, per_device_train_batch_size=1))


def test_incompatible_entropy_source_raises_at_construction(tmp_path, make_model, tokenizer, color_dataset):
    args = AEMGRPOConfig(**base_args(tmp_path, aem_entropy_source="old_logps"))
    with pytest.raises(ValueError, match="aem_entropy_source='old_logps'"):
        AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                       processing_class=tokenizer)


def test_plain_grpo_config_is_upgraded(tmp_path, make_model, tokenizer, color_dataset):
    args = GRPOConfig(**base_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2))
    trainer = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                             processing_class=tokenizer)
    assert isinstance(trainer.args, AEMGRPOConfig)
    assert trainer.args.use_aem and trainer.args.aem_lambda == 1.0
    assert trainer.args.steps_per_generation == args.steps_per_generation
    assert trainer.args.generation_batch_size == args.generation_batch_size


def test_model_card_names_aem(tmp_path, make_model, tokenizer, color_dataset):
    trainer = train(AEMGRPOTrainer, AEMGRPOConfig, tmp_path, make_model(), tokenizer, color_dataset, max_steps=1)
    trainer.create_model_card(model_name="tiny-aem")
    card = (tmp_path / "README.md").read_text()
    assert "AEM" in card and "2605.00425" in card and "Adaptive Entropy Modulation" in card


def test_scored_batch_keys(tmp_path, make_model, tokenizer, color_dataset):
    args = AEMGRPOConfig(**base_args(tmp_path, use_aem=False))
    trainer = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                             processing_class=tokenizer)
    output = _scored_batch(trainer, color_dataset)
    missing = set(SCORED_BATCH_KEYS) - set(output)
    assert not missing, f"TRL's scored batch no longer has {missing}; AEM reads these keys"
    assert output["advantages"].dim() == 1
