"""trl_aem.generation: chunked generation (env_generation_chunk_size) on a tiny offline Qwen2."""

import pytest
from transformers import GenerationConfig

from trl_aem import AEMGRPOConfig
from trl_aem.generation import make_hf_generate_fn


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
