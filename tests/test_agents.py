"""Evaluation, env datasets, the expert warm-start dataset, and TRL's own environment_factory still working."""

import pytest
import torch
from conftest import base_args, red_reward
from datasets import Dataset

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer, evaluate, expert_sft_dataset, make_env_dataset, warm_start
from trl_aem.agents import _pass_at_k, eos_token_ids
from trl_aem.envs import CodeBreaker, env_vocabulary
from trl_aem.rollout import initial_messages
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer

CB = "trl_aem/CodeBreaker-v0"


def test_evaluate_expert_and_random():
    expert = evaluate(CB, "expert", num_tasks=50, env_kwargs=CodeBreaker.EASIEST)
    random_ = evaluate(CB, "random", num_tasks=50, env_kwargs=CodeBreaker.EASIEST, k=3)
    assert expert.success_rate == 1.0 and expert.pass_at_k == 1.0 and expert.mean_return == 10.0
    assert 0.0 < random_.success_rate < 1.0
    assert random_.pass_at_k >= random_.success_rate  # pass@3 over 3 attempts is at least the mean success
    assert len(random_.episodes) == 150 and random_.k == 3


def test_pass_at_k_unbiased_estimator():
    # n = 4 attempts, c = 1 success: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert _pass_at_k([[True, False, False, False]], 1) == pytest.approx(0.25)
    assert _pass_at_k([[True, False, False, False]], 2) == pytest.approx(0.5)
    assert _pass_at_k([[False] * 4, [True] * 4], 2) == pytest.approx(0.5)


def test_evaluate_model_policy_runs_the_training_rollouts():
    tokenizer = build_word_tokenizer(env_vocabulary(CB, **CodeBreaker.EASIEST))
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    result = evaluate(CB, "model", model=model, tokenizer=tokenizer, num_tasks=6, k=2, greedy=False,
                      env_kwargs=CodeBreaker.EASIEST, max_turns=3, max_new_tokens_per_turn=4)
    assert len(result.episodes) == 12
    assert all(1 <= e["turns"] <= 3 for e in result.episodes)
    assert 0.0 <= result.success_rate <= 1.0
    with pytest.raises(ValueError, match="model= and tokenizer="):
        evaluate(CB, "model", num_tasks=1)
    with pytest.raises(ValueError, match="policy must be"):
        evaluate(CB, "oracle", num_tasks=1)


def test_eos_token_ids_are_built_as_trl_builds_them():
    """The tokenizer's EOS first unless the model declares it; every id the model declares (one, or a list)."""
    tokenizer = build_word_tokenizer(env_vocabulary(CB, **CodeBreaker.EASIEST))
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    eos = tokenizer.eos_token_id
    assert eos_token_ids(model, tokenizer) == [eos]
    model.generation_config.eos_token_id = [7, eos]  # e.g. Qwen2.5: <|im_end|> and <|endoftext|>
    assert eos_token_ids(model, tokenizer) == [7, eos]
    model.generation_config.eos_token_id = 7
    assert eos_token_ids(model, tokenizer) == [eos, 7]
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, tokenizer) == [eos]


def test_evaluate_stops_turns_on_every_eos_id_the_model_declares(monkeypatch):
    """As in training (TRL's eos_token_ids), a turn ends at any EOS id of the model's generation_config, not only at
    the tokenizer's: here the untrained model's first word, declared as a second EOS, ends every action."""
    import trl_aem.agents as agents

    tokenizer = build_word_tokenizer(env_vocabulary(CB, **CodeBreaker.EASIEST))
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    settings = dict(model=model, tokenizer=tokenizer, num_tasks=2, env_kwargs=CodeBreaker.EASIEST, max_turns=2,
                    max_new_tokens_per_turn=4)
    before = evaluate(CB, "model", **settings)
    first_action = before.episodes[0]["actions"][0]
    word_ids = tokenizer.encode(first_action, add_special_tokens=False)
    assert len(word_ids) == 4 and tokenizer.eos_token_id not in word_ids  # the greedy turn used its whole budget
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, word_ids[0]]
    seen = []
    real = agents.make_hf_generate_fn
    monkeypatch.setattr(agents, "make_hf_generate_fn",
                        lambda model, pad, eos, config, **kw: seen.append((eos, config.eos_token_id)) or
                        real(model, pad, eos, config, **kw))
    after = evaluate(CB, "model", **settings)
    assert seen == [([tokenizer.eos_token_id, word_ids[0]], [tokenizer.eos_token_id, word_ids[0]])]
    stop_word = tokenizer.decode(word_ids[:1])
    assert all(action == stop_word for episode in after.episodes for action in episode["actions"]), after.episodes


def test_warm_start_prints_no_raw_metric_dicts(capsys, tmp_path):
    """The supervised warm start trains quietly: no dictionary per log on the console (they stay in the trainer's
    log history; log level info prints them)."""
    tokenizer = build_word_tokenizer(env_vocabulary(CB, **CodeBreaker.EASIEST))
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    data = expert_sft_dataset(CB, range(8), env_kwargs=CodeBreaker.EASIEST)
    warm_start(model, tokenizer, data, max_steps=2, batch_size=4, output_dir=str(tmp_path))  # logs every step
    out, err = capsys.readouterr()
    assert "{'loss'" not in out + err and "{'train_runtime'" not in out + err
    assert "[train]" not in out  # no summary line either: the caller reports the warm start


def test_make_env_dataset_and_expert_sft_dataset():
    dataset = make_env_dataset(5, seed_offset=10)
    assert dataset["seed"] == [10, 11, 12, 13, 14]
    assert dataset[0]["prompt"][0]["role"] == "user"
    sft = expert_sft_dataset(CB, range(3), env_kwargs=CodeBreaker.EASIEST, system_prompt="be brief .")
    first = sft[0]
    assert first["completion"][0]["role"] == "assistant" and first["completion"][0]["content"].startswith("guess")
    # The first prompt is rendered as rollouts render it: system prompt, then the prompt + first observation.
    assert first["prompt"][0] == {"role": "system", "content": "be brief ."}
    assert first["prompt"][1]["content"].startswith(make_env_dataset(1)[0]["prompt"][0]["content"] + "\n")
    assert initial_messages("a", "b", None) == [{"role": "user", "content": "a\nb"}]
    # Later turns carry the earlier actions as assistant messages.
    multi = [row for row in sft if len(row["prompt"]) > 2]
    assert multi and multi[0]["prompt"][2]["role"] == "assistant"


class Counter:
    """A TRL environment_factory environment: a tool method and a reward."""

    def reset(self, **kwargs):
        self.calls = 0
        return "you can call increment ."

    def increment(self, amount: int) -> str:
        """Add to the counter.

        Args:
            amount: how much to add.
        """
        self.calls += 1
        return str(self.calls)


def test_trl_environment_factory_still_works(tmp_path, make_model, tokenizer):
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "say a color ."}]}] * 8)
    args = AEMGRPOConfig(**base_args(tmp_path, max_completion_length=8, aem_min_entropy_range=0.0))
    trainer = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=dataset,
                             processing_class=tokenizer, environment_factory=Counter)
    assert trainer.aem_entropy_source == "extra_pass"  # tool loops run several generate calls: entropies recomputed
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "aem/alpha_mean" in entry]
    assert logs and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert "tools/call_frequency" in logs[0]
