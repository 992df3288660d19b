"""AEMGRPOTrainer(env=...): multi-turn training on a tiny offline Qwen2, per-turn AEM, faults, errors."""

import math

import pytest
import torch
from conftest import base_args
from datasets import Dataset
from test_rollout import RaisingEnv, SayEnv

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer, aem_coefficients, span_mean_entropy
from trl_aem.tiny import build_tiny_qwen2


def env_dataset(n=16):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": "answer the task ."}], "seed": i}
                              for i in range(n)])


def env_args(tmp_path, **overrides):
    values = dict(max_completion_length=64, env_max_turns=3, env_max_new_tokens_per_turn=4,
                  aem_min_entropy_range=0.0)
    values.update(overrides)
    return AEMGRPOConfig(**base_args(tmp_path, **values))


def make_trainer(tmp_path, tokenizer, env=SayEnv, trainer_cls=AEMGRPOTrainer, reward_funcs=None, **overrides):
    model = build_tiny_qwen2(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)
    return trainer_cls(model=model, reward_funcs=reward_funcs, args=env_args(tmp_path, **overrides),
                       train_dataset=env_dataset(), processing_class=tokenizer, env=env)


def test_env_training_logs_env_and_per_turn_metrics(tmp_path, say_tokenizer):
    trainer = make_trainer(tmp_path, say_tokenizer)
    assert trainer.aem_entropy_source == "generation"
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "env/success_rate" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("env/success_rate", "env/return_mean", "env/turns_mean", "env/invalid_action_rate",
                    "env/truncated_frac", "env/episode_errors", "rewards/env_return/mean", "aem/turn0/alpha_mean"):
            assert key in entry and math.isfinite(entry[key]), key
        assert 1.0 <= entry["env/turns_mean"] <= 3.0
        assert entry["env/episode_errors"] == 0.0
        assert entry["aem/alpha_mean"] == pytest.approx(1.0, abs=1e-5)


class _Recording(AEMGRPOTrainer):
    def _aem_collect_token_entropy(self, output):
        self.used_entropy = super()._aem_collect_token_entropy(output)
        return self.used_entropy


def test_per_turn_alpha_uses_turn_spans_grouped_over_the_prompts_trajectories(tmp_path, say_tokenizer):
    trainer = make_trainer(tmp_path, say_tokenizer, trainer_cls=_Recording, env_max_turns=3)
    trainer.model.train()
    dataset = env_dataset()
    rows = [dataset[i] for i in range(2) for _ in range(trainer.num_generations)]
    output = trainer._generate_and_score_completions(rows)
    span_ids = trainer._env_span_ids(rows, output["completion_ids"])
    loss_mask = output["completion_mask"] * output["tool_mask"]
    # The loss mask covers exactly the generated tokens: those with a turn index.
    assert torch.equal(loss_mask.bool(), span_ids >= 0)
    table = span_mean_entropy(trainer.used_entropy, loss_mask, span_ids)
    assert table.span_id.max() >= 1  # several turns per trajectory
    # The group of a turn is every turn of the prompt's G trajectories (rows // G).
    alpha = aem_coefficients(table.response_entropy, table.row // trainer.num_generations, min_range=0.0)
    assert alpha.std() > 0
    token_alpha = trainer.aem_last_token_alpha
    for k in range(len(alpha)):
        row, turn = table.row[k].item(), table.span_id[k].item()
        tokens = (span_ids[row] == turn) & loss_mask[row].bool()
        torch.testing.assert_close(token_alpha[row][tokens], alpha[k].expand(int(tokens.sum())), rtol=1e-5, atol=1e-6)
    # Advantages are alpha(turn) * A(trajectory) on generated tokens.
    base = output["advantages"].new_tensor([float(x) for x in trainer.aem_base_advantages])
    expected = base.unsqueeze(1) * token_alpha
    torch.testing.assert_close(output["advantages"][loss_mask.bool()], expected[loss_mask.bool()])


def test_failing_environment_does_not_stop_training(tmp_path, say_tokenizer):
    trainer = make_trainer(tmp_path, say_tokenizer, env=RaisingEnv, max_steps=1)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "env/episode_errors" in e)
    assert entry["env/episode_errors"] == 4.0
    assert entry["env/success_rate"] == 0.0
    assert math.isfinite(next(e for e in trainer.state.log_history if "loss" in e)["loss"])
    raising = make_trainer(tmp_path / "raise", say_tokenizer, env=RaisingEnv, max_steps=1, env_raise_on_error=True)
    with pytest.raises(RuntimeError, match="simulator crashed"):
        raising.train()


def test_extra_reward_functions_compose_with_the_episode_return(tmp_path, say_tokenizer):
    def brevity(completions, env_turns, **kwargs):
        return [-0.01 * t for t in env_turns]

    trainer = make_trainer(tmp_path, say_tokenizer, reward_funcs=[brevity], max_steps=1)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "rewards/brevity/mean" in e)
    assert "rewards/env_return/mean" in entry
    assert entry["reward"] == pytest.approx(entry["rewards/env_return/mean"] + entry["rewards/brevity/mean"], abs=1e-5)


def test_env_argument_errors(tmp_path, say_tokenizer):
    model = build_tiny_qwen2(say_tokenizer, hidden_size=32)
    with pytest.raises(ValueError, match="'prompt' column"):
        AEMGRPOTrainer(model=model, args=env_args(tmp_path), train_dataset=Dataset.from_list([{"seed": 1}] * 8),
                       processing_class=say_tokenizer, env=SayEnv)
    with pytest.raises(ValueError, match="not a registered gymnasium id"):
        AEMGRPOTrainer(model=model, args=env_args(tmp_path), train_dataset=env_dataset(),
                       processing_class=say_tokenizer, env="trl_aem/NoSuchEnv-v0")
    with pytest.raises(ValueError, match="tools="):
        AEMGRPOTrainer(model=model, args=env_args(tmp_path), train_dataset=env_dataset(),
                       processing_class=say_tokenizer, env=SayEnv, tools=[len])
    for field, value in (("env_max_turns", 0), ("env_timeout", -1.0), ("env_max_new_tokens_per_turn", "many"),
                         ("env_kwargs", "not json")):
        with pytest.raises(ValueError, match=field):
            env_args(tmp_path, **{field: value})


def test_errored_episodes_get_zero_advantage_even_with_other_rewards(tmp_path, say_tokenizer):
    def length_reward(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    trainer = make_trainer(tmp_path, say_tokenizer, env=RaisingEnv, reward_funcs=[length_reward])
    trainer.model.train()
    rows = [env_dataset()[0] for _ in range(trainer.num_generations)]
    output = trainer._generate_and_score_completions(rows)
    assert all(row["env_error"] for row in rows)
    assert output["advantages"].abs().sum() == 0


def test_env_generation_chunk_size_bounds_every_generate_call(tmp_path, say_tokenizer):
    trainer = make_trainer(tmp_path, say_tokenizer, env_generation_chunk_size=3)
    calls, original = [], type(trainer.model).generate

    def generate(input_ids, **kwargs):
        calls.append(input_ids.size(0))
        return original(trainer.model, input_ids=input_ids, **kwargs)

    trainer.model.generate = generate
    trainer.train()
    assert calls and max(calls) == 3  # 4 episodes per step: chunks of 3 and 1 in the first turn
    assert 1 in calls
    logs = [entry for entry in trainer.state.log_history if "env/success_rate" in entry]
    assert len(logs) == 2 and all(entry["aem/alpha_mean"] == pytest.approx(1.0, abs=1e-5) for entry in logs)


def test_env_reuse_kv_cache_trains_and_encodes_only_new_tokens_after_the_first_turn(tmp_path, say_tokenizer):
    trainer = make_trainer(tmp_path, say_tokenizer, env_reuse_kv_cache=True, max_steps=1)
    widths = []
    handle = trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: None if torch.is_grad_enabled() else widths.append(kwargs["input_ids"].size(1)),
        with_kwargs=True)  # generation runs without gradients, the training forward with
    try:
        trainer.train()
    finally:
        handle.remove()
    prefills = [w for w in widths if w > 1]  # one per turn: the first encodes the prompts, later ones observations
    assert len(prefills) >= 2 and all(w < prefills[0] for w in prefills[1:]), prefills
    logs = [entry for entry in trainer.state.log_history if "env/success_rate" in entry]
    assert len(logs) == 1 and logs[0]["env/turns_mean"] > 1.0
    assert logs[0]["aem/alpha_mean"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"env_reuse_kv_cache": "yes"}, "env_reuse_kv_cache must be True or False"),
    ({"env_reuse_kv_cache": True, "use_vllm": True}, "vLLM caches prefixes itself"),
    ({"env_reuse_kv_cache": True, "cache_implementation": "static"}, r"cache_implementation='static' \(allowed"),
])
def test_env_reuse_kv_cache_is_validated_in_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        env_args(tmp_path, **overrides)
