"""Pieces both benchmarks use: the word-parity task, the padded word tokenizer, the special tokens to suppress so
every completion has a fixed length, and the CPU's name. Imported by the scripts in this folder."""

from __future__ import annotations

import platform

from trl_aem.tiny import build_word_tokenizer


def parity_fraction(text: str, want: int) -> float:
    """Fraction of the words of ``text`` that are dummy words ``w<k>`` with ``k % 2 == want`` (0 even, 1 odd)."""
    words = text.split()
    if not words:
        return 0.0
    hits = sum(1 for w in words if w.startswith("w") and w[1:].isdigit() and int(w[1:]) % 2 == want)
    return hits / len(words)


def padded_word_tokenizer(task_words: list[str], vocab_size: int):
    """Word tokenizer with ``task_words``, padded with dummy words ``w0, w1, ...`` to ``vocab_size`` entries."""
    base = len(build_word_tokenizer(task_words))
    return build_word_tokenizer(task_words + [f"w{k}" for k in range(max(0, vocab_size - base))])


def special_token_ids(tokenizer) -> list[int]:
    """Ids of EOS, padding, ``<|im_start|>`` and ``<unk>``: suppressed in generation to force full-length turns."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<unk>")}
    return sorted(i for i in ids if i is not None and i >= 0)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
