"""trl_aem.generation: chunked generation (env_generation_chunk_size) on a tiny offline Qwen2."""

import gymnasium
import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from trl_aem import AEMGRPOConfig
from trl_aem.generation import make_hf_generate_fn
from trl_aem.rollout import EnvRunner, ObservationRenderer, RolloutLimits


def counting(model):
    """``model`` with ``model.calls``: the batch size of every ``generate`` call (the real generate runs)."""
    model.calls = []
    original = type(model).generate

    def generate(input_ids, **kwargs):
        model.calls.append(input_ids.size(0))
        return original(model, input_ids=input_ids, **kwargs)

    model.generate = generate
    return model


def contexts(tokenizer, n):
    words = ["red", "blue", "green", "say", "color", "name"]
    texts = [" ".join(words[: 1 + i % len(words)]) for i in range(n)]  # different lengths, so padding differs
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def greedy_fn(model, tokenizer, **kwargs):
    config = GenerationConfig(do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    return make_hf_generate_fn(model, tokenizer.pad_token_id, tokenizer.eos_token_id, config, **kwargs)


def test_chunked_generation_gives_the_same_tokens_and_entropies_in_smaller_calls(tokenizer, make_model):
    batch = contexts(tokenizer, 7)
    whole = counting(make_model().eval())
    tokens, entropies = greedy_fn(whole, tokenizer)(batch, 5)
    chunked = counting(make_model().eval())
    chunk_tokens, chunk_entropies = greedy_fn(chunked, tokenizer, max_batch_size=3)(batch, 5)
    assert whole.calls == [7]
    assert chunked.calls == [3, 3, 1]
    assert chunk_tokens == tokens
    assert len(chunk_entropies) == 7
    for a, b in zip(chunk_entropies, entropies):
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, abs=1e-4)


def test_synchronised_chunked_generation_makes_the_agreed_number_of_calls(tokenizer, make_model):
    model = counting(make_model().eval())
    asked = []

    def sync_calls(own):  # stands in for the max over processes: another process has 4 chunks
        asked.append(own)
        return 4

    generate = greedy_fn(model, tokenizer, max_batch_size=2, run_when_empty=True, sync_calls=sync_calls)
    tokens, _ = generate(contexts(tokenizer, 3), 3)
    assert asked == [2] and len(tokens) == 3
    assert model.calls == [2, 1, 1, 1]  # two real chunks, then two one-context dummy calls
    model.calls.clear()
    tokens, entropies = generate([], 3)
    assert tokens == [] and entropies == []
    assert model.calls == [1, 1, 1, 1]


def test_chunked_generation_arguments_are_checked(tokenizer, make_model):
    model = make_model()
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        greedy_fn(model, tokenizer, max_batch_size=0)
    with pytest.raises(ValueError, match="needs sync_calls"):
        greedy_fn(model, tokenizer, max_batch_size=2, run_when_empty=True)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_env_generation_chunk_size_is_validated_in_the_config(tmp_path, value):
    with pytest.raises(ValueError, match=r"env_generation_chunk_size must be an integer >= 1, or None"):
        AEMGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                      env_generation_chunk_size=value)


class CountdownEnv(gymnasium.Env):
    """Ends after ``1 + seed % 3`` turns whatever the agent says; observations of different lengths per turn."""

    metadata = {"render_modes": []}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.left = 1 + (seed or 0) % 3
        return "say red", {}

    def step(self, action):
        self.left -= 1
        if self.left == 0:
            return "done", 1.0, True, False, {"success": True}
        return " ".join(["say"] + ["blue green"] * self.left), 0.0, False, False, {}


def play(model, tokenizer, **generate_kwargs):
    """Greedy multi-turn episodes of 6 tasks (different lengths), and the widths of every forward pass."""
    widths = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].size(1)),
                                             with_kwargs=True)
    limits = RolloutLimits(max_turns=4, max_new_tokens_per_turn=5, max_completion_length=200)
    runner = EnvRunner(CountdownEnv, ObservationRenderer(tokenizer), limits, num_workers=1, timeout=None)
    rows = [{"seed": seed} for seed in range(6)]
    prompts = [[{"role": "user", "content": "say a color ."}]] * 6
    try:
        episodes = runner.run(rows, prompts, greedy_fn(model, tokenizer, **generate_kwargs))
    finally:
        handle.remove()
    return episodes, widths


@pytest.mark.parametrize("chunk", [None, 4])
def test_reused_kv_cache_gives_the_same_episodes_and_encodes_only_new_tokens(tokenizer, make_model, chunk):
    model = make_model().eval()
    plain, plain_widths = play(model, tokenizer, max_batch_size=chunk)
    cached, cached_widths = play(model, tokenizer, max_batch_size=chunk, reuse_kv_cache=True)
    assert [e.num_turns for e in plain] == [1, 2, 3, 1, 2, 3]  # episodes end at different turns
    for a, b in zip(plain, cached):
        assert b.prompt_ids == a.prompt_ids and b.completion_ids == a.completion_ids
        assert b.env_mask == a.env_mask and b.span_ids == a.span_ids
        assert b.token_entropy == pytest.approx(a.token_entropy, abs=1e-4)
    # Prefill widths (forwards of more than one token): the first turn is the same, later turns encode only what
    # was added since the episode's previous turn, so every later prefill is narrower than the full context.
    plain_prefills = [w for w in plain_widths if w > 1]
    cached_prefills = [w for w in cached_widths if w > 1]
    first_turn_calls = 1 if chunk is None else 2
    assert cached_prefills[:first_turn_calls] == plain_prefills[:first_turn_calls]
    assert len(cached_prefills) == len(plain_prefills) > first_turn_calls
    for full, new in zip(plain_prefills[first_turn_calls:], cached_prefills[first_turn_calls:]):
        assert new < full / 2, (plain_prefills, cached_prefills)


def prefill_widths(model):
    """Record the width of every forward pass of ``model`` (returns the list and the hook handle)."""
    widths = []
    handle = model.register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].size(1)), with_kwargs=True)
    return widths, handle


def test_kv_store_keeps_only_real_tokens_and_drops_finished_episodes(tokenizer, make_model):
    model = make_model().eval()
    generate = greedy_fn(model, tokenizer, reuse_kv_cache=True)
    assert generate.accepts_keys
    batch = contexts(tokenizer, 3)
    tokens, _ = generate(batch, 4, keys=["a", "b", "c"])
    # Continue two of the three episodes: each new context = old context + its turn + one more token.
    longer = [batch[0] + tokens[0] + batch[0][:1], batch[2] + tokens[2] + batch[2][:1]]
    widths, handle = prefill_widths(model)
    try:
        again, _ = generate(longer, 4, keys=["a", "c"])
        # "b" was absent from the last call: its cache is gone, so continuing it encodes its whole context
        b_context = batch[1] + tokens[1] + batch[1][:1]
        generate([b_context], 4, keys=["b"])
    finally:
        handle.remove()
    plain, _ = greedy_fn(model, tokenizer)(longer, 4)
    assert again == plain
    # cached: everything but the last turn token (never fed) and the added token -> 2 new tokens to encode
    assert widths[0] == 2
    assert widths[4] == len(b_context)  # 4 forwards for "a"/"c" (prefill + 3 decoding steps), then b's prefill


def test_reused_cache_with_eos_mid_batch_cut_turns_and_new_episodes(tokenizer, make_model):
    """The cases a rollout produces: a row that stops at EOS while others go on, a turn the runner cut to its own
    budget, and a new episode (no cache) next to cached ones; greedy output equals re-encoding's."""
    model = make_model().eval()
    batch = contexts(tokenizer, 4)
    probe, _ = greedy_fn(model, tokenizer)(batch, 6)
    eos = probe[0][2]  # a token row 0 produces: make it the end of a turn, so row 0 stops early
    config = GenerationConfig(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                              cache_implementation="dynamic")  # TRL passes its cache_implementation setting on
    cached_fn = make_hf_generate_fn(model, tokenizer.pad_token_id, eos, config, reuse_kv_cache=True)
    plain_fn = make_hf_generate_fn(model, tokenizer.pad_token_id, eos, config)
    first, first_entropies = cached_fn(batch, 6, keys=[0, 1, 2, 3])
    assert first == plain_fn(batch, 6)[0]
    assert len(first[0]) < 6 and first[0][-1] == eos and any(len(t) == 6 for t in first[1:])  # EOS mid-batch
    observation = tokenizer(" say blue", add_special_tokens=False)["input_ids"]
    second = [
        batch[0] + first[0] + observation,  # stopped at EOS
        batch[1] + first[1][:2] + observation,  # the runner cut this turn to 2 tokens
        batch[2] + first[2] + observation + observation,  # a longer observation
        contexts(tokenizer, 6)[5],  # a new episode, nothing cached
    ]
    tokens, entropies = cached_fn(second, 5, keys=[0, 1, 2, 9])
    plain_tokens, plain_entropies = plain_fn(second, 5)
    assert tokens == plain_tokens
    for a, b in zip(entropies, plain_entropies):
        assert a == pytest.approx(b, abs=1e-4)


def test_the_runner_releases_the_caches_and_keys_are_unique_per_rollout(tokenizer, make_model):
    model = make_model().eval()
    generate = greedy_fn(model, tokenizer, reuse_kv_cache=True)
    seen_keys, released = [], []
    original_release = generate.release

    def spy(contexts, max_new_tokens, keys=None):
        seen_keys.append(list(keys))
        return generate(contexts, max_new_tokens, keys=keys)

    spy.accepts_keys = True
    spy.release = lambda: (released.append(True), original_release())
    limits = RolloutLimits(max_turns=2, max_new_tokens_per_turn=3, max_completion_length=100)
    runner = EnvRunner(CountdownEnv, ObservationRenderer(tokenizer), limits, num_workers=1, timeout=None)
    for _ in range(2):
        runner.run([{"seed": 1}, {"seed": 2}], [[{"role": "user", "content": "say red ."}]] * 2, spy)
    assert released == [True, True]
    first_run, second_run = seen_keys[0], seen_keys[-1]
    assert [i for _, i in first_run] == [0, 1] and not set(first_run) & set(second_run)


def test_a_model_without_a_plain_dynamic_cache_falls_back_to_re_encoding(tokenizer, make_model, caplog):
    config = make_model().config.to_dict()
    config.update(use_sliding_window=True, sliding_window=4, max_window_layers=0, layer_types=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).eval()  # sliding-window layers: not a plain dynamic cache
    generate = greedy_fn(model, tokenizer, reuse_kv_cache=True)
    batch = contexts(tokenizer, 2)
    with caplog.at_level("WARNING", logger="trl_aem.generation"):
        tokens, _ = generate(batch, 3, keys=["a", "b"])
    assert "re-encodes the whole context" in caplog.text
    longer = [c + t + c[:1] for c, t in zip(batch, tokens)]
    widths, handle = prefill_widths(model)
    try:
        again, _ = generate(longer, 3, keys=["a", "b"])
    finally:
        handle.remove()
    assert widths[0] == max(len(c) for c in longer)  # nothing was kept: the whole contexts are encoded
    assert again == greedy_fn(model, tokenizer)(longer, 3)[0]
