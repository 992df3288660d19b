"""Batched ``transformers`` generation that records the entropy of every sampled token (no extra forward pass)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .aem import token_entropy_from_logits


class GenerationEntropyRecorder:
    """Forward hook on a causal LM: records ``H(softmax(logits[:, -1] / temperature))`` at every decoding step.

    ``generate`` runs one forward per new token and samples from the last position's logits, so the recorded
    step ``t`` is the full-vocabulary entropy of the distribution token ``t`` was drawn from (temperature-scaled,
    before top-k/top-p, as TRL's ``entropy`` metric).
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []

    def __call__(self, module, args, output):
        logits = getattr(output, "logits", None)
        if logits is not None and logits.dim() == 3:
            self.steps.append(token_entropy_from_logits(logits[:, -1, :], self.temperature))

    @contextmanager
    def attached(self, module: torch.nn.Module):
        """Record while the ``with`` block runs (the hook is removed afterwards, even on error)."""
        self.steps = []
        handle = module.register_forward_hook(self)
        try:
            yield self
        finally:
            handle.remove()

    def entropies(self) -> torch.Tensor | None:
        """``(B, steps)`` recorded entropies, or None if nothing was recorded."""
        return torch.stack(self.steps, dim=1) if self.steps else None


def causal_lm_module(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers module whose forward ``generate`` calls (the base model under a PEFT wrapper)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def tokens_through_eos(ids, eos_token_ids: set[int]) -> list[int]:
    """The sampled tokens up to and including the first end-of-turn token (all of them if there is none)."""
    ids = list(ids)
    end = next((j + 1 for j, token in enumerate(ids) if token in eos_token_ids), len(ids))
    return ids[:end]


def make_hf_generate_fn(model, pad_token_id: int, eos_token_ids, generation_config, temperature: float = 1.0,
                        record_entropy: bool = True, run_when_empty: bool = False, max_batch_size: int | None = None,
                        sync_calls: Callable[[int], int] | None = None):
    """A :data:`trl_aem.rollout.GenerateFn` over ``model.generate``: one left-padded batch per call.

    Args:
        model: a transformers causal LM (or a PEFT model around one), already in the mode and on the device wanted.
        pad_token_id: the id used for left padding.
        eos_token_ids: an id or ids that end a turn; the returned tokens stop after the first one.
        generation_config: the ``GenerationConfig`` to sample with (copied; ``max_new_tokens`` set per call).
        temperature: the sampling temperature, for the recorded entropies.
        record_entropy: record per-token entropies (returned as lists of floats) or return ``None``.
        run_when_empty: still call ``generate`` (on one dummy context) when there is no context, for synchronised
            generation across processes (ZeRO-3/FSDP), where every process must make the same calls.
        max_batch_size: most contexts per ``generate`` call; more are generated in consecutive chunks of this size
            (bounds the prefill activations and KV cache). ``None``: all contexts in one call.
        sync_calls: with ``run_when_empty`` and ``max_batch_size``, a collective returning the largest of the
            processes' numbers of calls this turn; a process with fewer chunks makes up the difference with dummy
            calls, so that all make the same number of ``generate`` calls.
    """
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size!r}")
    if run_when_empty and max_batch_size is not None and sync_calls is None:
        raise ValueError("synchronised generation (run_when_empty) in chunks needs sync_calls, so that every process "
                         "makes the same number of generate calls")
    eos = set(eos_token_ids if isinstance(eos_token_ids, (list, tuple, set)) else [eos_token_ids]) - {None}
    hooked = causal_lm_module(model)

    def generate(contexts: list[list[int]], max_new_tokens: int):
        chunk = max_batch_size or max(1, len(contexts))
        chunks = [contexts[start: start + chunk] for start in range(0, len(contexts), chunk)]
        calls = len(chunks)
        if run_when_empty:
            calls = sync_calls(calls) if sync_calls is not None else max(calls, 1)
        tokens, entropies = [], []
        for part in chunks:
            part_tokens, part_entropies = _generate_batch(part, max_new_tokens)
            tokens += part_tokens
            if record_entropy:
                entropies += part_entropies
        for _ in range(calls - len(chunks)):
            _generate_batch([[pad_token_id]], max_new_tokens)
        return tokens, (entropies if record_entropy else None)

    def _generate_batch(contexts: list[list[int]], max_new_tokens: int):
        device = next(model.parameters()).device
        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(contexts), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, context in enumerate(contexts):
            input_ids[row, width - len(context):] = torch.tensor(context, dtype=torch.long)
            attention_mask[row, width - len(context):] = 1
        config = copy.deepcopy(generation_config)
        config.max_new_tokens = max_new_tokens
        if config.min_new_tokens is not None:  # a user's minimum applies per turn, within the turn's budget
            config.min_new_tokens = min(config.min_new_tokens, max_new_tokens)
        recorder = GenerationEntropyRecorder(temperature)
        with torch.no_grad(), (recorder.attached(hooked) if record_entropy else _null()):
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
        generated = output[:, width:].cpu()
        recorded = recorder.entropies() if record_entropy else None
        tokens, entropies = [], []
        for row in range(generated.size(0)):
            turn = tokens_through_eos(generated[row].tolist(), eos)
            tokens.append(turn)
            if recorded is not None:
                entropies.append(recorded[row, : len(turn)].cpu().tolist())
        return tokens, (entropies if record_entropy else None)

    return generate


@contextmanager
def _null():
    yield None
