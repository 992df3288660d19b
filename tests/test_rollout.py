"""Multi-turn rollouts: token-exact trajectories, masks and span ids, limits, faults (trl_aem/rollout.py)."""

import logging
import random
import time

import gymnasium
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trl_aem.rollout import EnvironmentProtocolError, EnvRunner, ObservationRenderer, RolloutLimits, row_seed
from trl_aem.tiny import qwen2_5_chat_template

WORDS = ["red", "blue", "green"]


class SayEnv(gymnasium.Env):
    """Say the requested words one per turn. Reward 10 after the last one, -0.1 for a wrong word."""

    metadata = {"render_modes": []}

    def __init__(self, length: int = 2):
        self.length = length

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        rng = random.Random(seed)
        self.targets = [rng.choice(WORDS) for _ in range(self.length)]
        self.index = 0
        return f"say {self.targets[0]}", {}

    def step(self, action):
        if action.strip() != self.targets[self.index]:
            return f"wrong . say {self.targets[self.index]}", -0.1, False, False, {"invalid_action": True}
        self.index += 1
        if self.index == self.length:
            return "done", 10.0, True, False, {"success": True}
        return f"say {self.targets[self.index]}", 0.0, False, False, {}


def bpe_tokenizer(chat_template: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in code (whitespace is kept, so token-exactness is strict)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["say red blue green wrong done answer the task .", "user assistant system\n\n"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    if chat_template:
        tokenizer.chat_template = qwen2_5_chat_template()
    return tokenizer


def scripted_generate(tokenizer, answers):
    """A deterministic stand-in for the model: answers[k] is the text every context gets at turn k."""
    calls, seen = [], []

    def generate(contexts, max_new_tokens):
        turn = len(calls)
        calls.append((len(contexts), max_new_tokens))
        seen.extend(list(c) for c in contexts)
        text = answers[min(turn, len(answers) - 1)]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = [ids[:max_new_tokens] for _ in contexts]
        entropies = [[0.5 + 0.1 * j for j in range(len(t))] for t in tokens]
        return tokens, entropies

    generate.calls, generate.contexts = calls, seen
    return generate


def runner(env_factory, tokenizer, **kwargs):
    limits = RolloutLimits(max_turns=kwargs.pop("max_turns", 5), max_new_tokens_per_turn=kwargs.pop("per_turn", 8),
                           max_completion_length=kwargs.pop("max_len", 256))
    return EnvRunner(env_factory, ObservationRenderer(tokenizer, kwargs.pop("system_prompt", None)), limits, **kwargs)


PROMPT = [{"role": "user", "content": "answer the task ."}]


def task_of(seed, length):
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(length)]


def seed_for(targets):
    return next(s for s in range(1000) if task_of(s, len(targets)) == targets)


def test_chat_trajectory_is_token_exact():
    tokenizer = bpe_tokenizer(chat_template=True)
    seed = seed_for(["red", "blue"])
    generate = scripted_generate(tokenizer, ["red<|im_end|>", "blue<|im_end|>"])
    [episode] = runner(SayEnv, tokenizer).run([{"seed": seed}], [PROMPT], generate)
    assert episode.success and episode.terminated and not episode.truncated
    assert episode.actions == ["red", "blue"] and episode.rewards == [0.0, 10.0]
    conversation = [
        {"role": "user", "content": "answer the task .\nsay red"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "say blue"},
        {"role": "assistant", "content": "blue"},
    ]
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert full.endswith("<|im_end|>\n")
    expected = tokenizer(full[: -len("\n")], add_special_tokens=False)["input_ids"]  # ends at the last EOS
    assert episode.prompt_ids + episode.completion_ids == expected
    prompt_text = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert episode.prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    red = tokenizer("red<|im_end|>", add_special_tokens=False)["input_ids"]
    blue = tokenizer("blue<|im_end|>", add_special_tokens=False)["input_ids"]
    observation = tokenizer("\n<|im_start|>user\nsay blue<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False)["input_ids"]
    assert episode.completion_ids == red + observation + blue
    # The loss mask covers exactly the generated tokens; span ids are the turn index, -1 on observations.
    assert episode.env_mask == [1] * len(red) + [0] * len(observation) + [1] * len(blue)
    assert episode.span_ids == [0] * len(red) + [-1] * len(observation) + [1] * len(blue)
    assert episode.token_entropy[: len(red)] == pytest.approx([0.5 + 0.1 * j for j in range(len(red))])
    assert episode.token_entropy[len(red): len(red) + len(observation)] == [0.0] * len(observation)


def test_plain_text_trajectory_is_token_exact():
    tokenizer = bpe_tokenizer(chat_template=False)
    seed = seed_for(["green", "red"])
    generate = scripted_generate(tokenizer, ["green<|im_end|>", "red<|im_end|>"])
    [episode] = runner(SayEnv, tokenizer, system_prompt="answer").run([{"seed": seed}], ["the task ."], generate)
    assert episode.success
    text = "answer\nthe task .\nsay green\n" + "green<|im_end|>" + "\nsay red\n" + "red<|im_end|>"
    assert episode.prompt_ids + episode.completion_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    green = tokenizer("green<|im_end|>", add_special_tokens=False)["input_ids"]
    red = tokenizer("red<|im_end|>", add_special_tokens=False)["input_ids"]
    observation = tokenizer("\nsay red\n", add_special_tokens=False)["input_ids"]
    assert episode.completion_ids == green + observation + red
    assert episode.span_ids == [0] * len(green) + [-1] * len(observation) + [1] * len(red)
    assert episode.env_mask == [1] * len(green) + [0] * len(observation) + [1] * len(red)


def test_group_shares_the_task_and_generation_is_batched():
    tokenizer = bpe_tokenizer(chat_template=True)
    generate = scripted_generate(tokenizer, ["red<|im_end|>"])
    rows = [{"seed": 7, "prompt": PROMPT}] * 4 + [{"seed": 8, "prompt": PROMPT}] * 4
    episodes = runner(lambda: SayEnv(length=3), tokenizer, max_turns=3).run(rows, [PROMPT] * 8, generate)
    targets = [task_of(s, 3) for s in (7, 8)]
    for k, episode in enumerate(episodes):
        assert episode.observations[0] == f"say {targets[k // 4][0]}"
    # One generate call per turn for all active episodes (8 contexts at turn 0).
    assert generate.calls[0] == (8, 8)
    assert len(generate.calls) == 3
    assert row_seed({"prompt": "x"}) == row_seed({"prompt": "x"}) != row_seed({"prompt": "y"})


def test_limits_end_episodes_as_failures():
    tokenizer = bpe_tokenizer(chat_template=True)
    wrong = scripted_generate(tokenizer, ["green green green<|im_end|>"])
    seed = seed_for(["red", "blue"])
    [episode] = runner(SayEnv, tokenizer, max_turns=3).run([{"seed": seed}], [PROMPT], wrong)
    assert episode.num_turns == 3 and episode.truncated and not episode.success
    assert episode.rewards == [-0.1, -0.1, -0.1] and episode.invalid_actions == 3
    assert episode.episode_return == pytest.approx(-0.3)
    # Per-turn token limit: a turn cut at 2 tokens is still one whole span (never split, never dropped).
    cut = scripted_generate(tokenizer, ["green green green<|im_end|>"])
    [episode] = runner(SayEnv, tokenizer, max_turns=2, per_turn=2).run([{"seed": seed}], [PROMPT], cut)
    first_turn = [s for s in episode.span_ids if s == 0]
    assert len(first_turn) == 2 and cut.calls[0][1] == 2
    # Whole-trajectory budget: the observation that does not fit ends the episode; spans stay whole.
    [episode] = runner(SayEnv, tokenizer, max_turns=5, max_len=12).run([{"seed": seed}], [PROMPT], wrong)
    assert episode.truncated and not episode.success and len(episode.completion_ids) <= 12
    assert episode.env_mask[-1] == 1  # ends with a generated turn, not a partial observation


class RaisingEnv(SayEnv):
    def step(self, action):
        raise RuntimeError("simulator crashed")


class HangingEnv(SayEnv):
    def step(self, action):
        time.sleep(30)


class NonStringEnv(SayEnv):
    def reset(self, seed=None, options=None):
        return {"text": "say red"}, {}


class FourTupleEnv(SayEnv):
    def step(self, action):
        return "say red", 0.0, False, {}


def test_environment_that_raises_fails_only_its_episode(caplog):
    tokenizer = bpe_tokenizer(chat_template=True)
    factories = iter([RaisingEnv(), SayEnv()])
    run = runner(lambda: next(factories), tokenizer, max_turns=2)
    seed = seed_for(["red", "blue"])
    generate = scripted_generate(tokenizer, ["red<|im_end|>", "blue<|im_end|>"])
    with caplog.at_level(logging.WARNING, logger="trl_aem.rollout"):
        bad, good = run.run([{"seed": seed}, {"seed": seed}], [PROMPT, PROMPT], generate)
    assert bad.error and "simulator crashed" in bad.error and not bad.success
    assert good.success and good.error is None
    assert run.last_error_count == 1
    assert "Traceback" in caplog.text and "simulator crashed" in caplog.text
    with pytest.raises(RuntimeError, match="simulator crashed"):
        runner(RaisingEnv, tokenizer, raise_on_error=True).run([{"seed": seed}], [PROMPT], generate)


def test_environment_that_hangs_times_out():
    tokenizer = bpe_tokenizer(chat_template=True)
    run = runner(HangingEnv, tokenizer, timeout=0.5)
    start = time.monotonic()
    [episode] = run.run([{"seed": 1}], [PROMPT], scripted_generate(tokenizer, ["red<|im_end|>"]))
    assert time.monotonic() - start < 10
    assert episode.error and "EnvironmentTimeout" in episode.error and not episode.success


@pytest.mark.parametrize("env_cls, message", [(NonStringEnv, r"reset\(\) returned a dict observation"),
                                              (FourTupleEnv, r"step\(\) must return \(observation, reward")])
def test_malformed_environment_gets_a_clear_error(env_cls, message):
    tokenizer = bpe_tokenizer(chat_template=True)
    with pytest.raises(EnvironmentProtocolError, match=message) as excinfo:
        runner(env_cls, tokenizer).run([{"seed": 1}], [PROMPT], scripted_generate(tokenizer, ["red<|im_end|>"]))
    assert env_cls.__name__ in str(excinfo.value)


def test_bad_limits():
    with pytest.raises(ValueError, match="max_turns"):
        RolloutLimits(max_turns=0)
