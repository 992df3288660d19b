"""Tiny models and tokenizers built in code, for tests, the CPU demo and benchmarks.

Nothing here downloads anything. The tokenizer is a word-level ``tokenizers`` tokenizer wrapped in
``PreTrainedTokenizerFast`` with Qwen2.5's chat template (shipped inside TRL's wheel), and the model is a
``Qwen2ForCausalLM`` of the same architecture as Qwen2.5, only smaller.
"""

from __future__ import annotations

from importlib import resources
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

#: Special tokens of Qwen2.5's chat format, in the order they get ids after the base vocabulary.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: Words every tiny vocabulary contains: the roles of the chat template and a few common words.
BASE_WORDS = (
    "system", "user", "assistant", "you", "are", "a", "an", "the", "helpful", "agent", "answer", "task",
    "with", "one", "word", "number", "only", ":", ",", ".", "(", ")", "-", "?", "!", "'", '"',
)


def qwen2_5_chat_template() -> str:
    """Return Qwen2.5's chat template as TRL ships it (``trl/chat_templates/qwen2_5.jinja``)."""
    return resources.files("trl").joinpath("chat_templates", "qwen2_5.jinja").read_text(encoding="utf-8")


def build_word_tokenizer(words: Iterable[str], chat_template: str | None = "qwen2_5") -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over ``words`` (plus digits, punctuation and Qwen's chat tokens).

    Text is lower-cased and split on whitespace and punctuation; every word is one token, so a tiny model
    learns quickly. Unknown words map to ``<unk>``. ``chat_template="qwen2_5"`` installs Qwen2.5's template;
    pass a Jinja string for another, or ``None`` for a plain-text tokenizer.
    """
    vocab_words = ["<unk>"]
    seen = set(vocab_words)
    for word in list(BASE_WORDS) + [str(d) for d in range(10)] + [w.lower() for w in words]:
        if word and word not in seen and word not in QWEN_SPECIAL_TOKENS:
            seen.add(word)
            vocab_words.append(word)
    vocab = {word: i for i, word in enumerate(vocab_words)}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template == "qwen2_5":
        tokenizer.chat_template = qwen2_5_chat_template()
    elif chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_agent_tokenizer(env_id: str, env_kwargs: dict | None, prompt: str,
                          system_prompt: str | None = None) -> PreTrainedTokenizerFast:
    """The word tokenizer of a tiny agent: the environment's vocabulary, then the prompt's and system prompt's words."""
    from .envs import env_vocabulary

    return build_word_tokenizer(env_vocabulary(env_id, **(env_kwargs or {})) + prompt.split()
                                + (system_prompt or "").split())


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """Build a randomly initialised ``Qwen2ForCausalLM`` sized for ``tokenizer`` (float32, eval-free).

    The module names match Qwen2.5 (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
    ``up_proj``, ``down_proj``), so LoRA recipes written for the real model apply unchanged.
    """
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
