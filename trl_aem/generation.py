"""Batched ``transformers`` generation that records the entropy of every sampled token (no extra forward pass)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .aem import token_entropy_from_logits

logger = logging.getLogger(__name__)


class GenerationEntropyRecorder:
    """Forward hook on a causal LM: records ``H(softmax(logits[:, -1] / temperature))`` at every forward of ``generate``.

    ``generate`` feeds the prompt (in one forward, or in several with chunked prefill, ``prefill_chunk_size``),
    samples the first token from the last prompt forward's logits, then runs one forward per further token. So the
    decoding steps are the forward that completes the prompt and every later one: :meth:`entropies` keeps exactly
    those (the full-vocabulary entropy of the distribution each token was drawn from, temperature-scaled, before
    top-k/top-p, as TRL's ``entropy`` metric) and rejects a recording whose number of steps does not match.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []
        self.widths: list[int | None] = []

    def __call__(self, module, args, kwargs, output):
        logits = getattr(output, "logits", None)
        if logits is not None and logits.dim() == 3:
            self.steps.append(token_entropy_from_logits(logits[:, -1, :], self.temperature))
            self.widths.append(_input_width(args, kwargs))

    @contextmanager
    def attached(self, module: torch.nn.Module):
        """Record while the ``with`` block runs (the hook is removed afterwards, even on error)."""
        self.steps, self.widths = [], []
        handle = module.register_forward_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def entropies(self, prefill_width: int | None = None, generated_width: int | None = None,
                  trailing_steps: bool = False) -> torch.Tensor | None:
        """``(B, steps)`` entropies of the decoding steps, or None if nothing (or nothing trustworthy) was recorded.

        Args:
            prefill_width: the number of prompt tokens ``generate`` fed before the first sampled token (the padded
                prompt width, less any cached prefix). The forwards that fed only part of it (chunked prefill) are
                dropped; ``None`` keeps every forward.
            generated_width: the number of tokens ``generate`` sampled (the width of its output past the prompt).
                When given, a recording with any other number of decoding steps is rejected (None).
            trailing_steps: accept (and drop) decoding steps after the ``generated_width``-th: with synchronised
                generation across processes (ZeRO-3/FSDP, transformers' ``synced_gpus``), a process whose sequences
                ended first keeps running forwards until every process is done.
        """
        if not self.steps:
            return None
        start = 0
        if prefill_width is not None:
            fed = 0
            for start, width in enumerate(self.widths):
                if width is None:
                    return None
                fed += width
                if fed >= prefill_width:
                    break
            if fed != prefill_width:  # the forwards do not add up to the prompt: not the decoding loop we know
                return None
        steps = self.steps[start:]
        if generated_width is not None:
            if len(steps) < generated_width or (len(steps) > generated_width and not trailing_steps):
                return None
            steps = steps[:generated_width]
        if not steps:
            return None
        return torch.stack(steps, dim=1)


def _input_width(args, kwargs) -> int | None:
    """How many positions one forward call fed (``input_ids`` or ``inputs_embeds``), or None if unknown."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.size(1))
    return None


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
                        sync_calls: Callable[[int], int] | None = None, reuse_kv_cache: bool = False):
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
        reuse_kv_cache: keep every episode's KV cache between its turns (the returned function then takes
            ``keys=``, one stable key per context, as :class:`~trl_aem.rollout.EnvRunner` passes, unique to the
            rollout): a turn encodes only the tokens added since the episode's previous turn (the observation), not
            its whole context. The caches of all unfinished episodes stay in memory between turns; an episode absent
            from a call is dropped, and ``generate.release()`` drops all (the runner calls it at the end of a
            rollout). Only for models whose cache is a plain ``DynamicCache`` (full attention, e.g. Qwen2); others
            fall back to re-encoding with a warning.
    """
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size!r}")
    if run_when_empty and max_batch_size is not None and sync_calls is None:
        raise ValueError("synchronised generation (run_when_empty) in chunks needs sync_calls, so that every process "
                         "makes the same number of generate calls")
    eos = set(eos_token_ids if isinstance(eos_token_ids, (list, tuple, set)) else [eos_token_ids]) - {None}
    hooked = causal_lm_module(model)
    store = _KVStore() if reuse_kv_cache else None

    def generate(contexts: list[list[int]], max_new_tokens: int, keys: list | None = None):
        if store is not None:
            store.keep_only(keys)
        chunk = max_batch_size or max(1, len(contexts))
        starts = range(0, len(contexts), chunk)
        calls = len(starts)
        if run_when_empty:
            calls = sync_calls(calls) if sync_calls is not None else max(calls, 1)
        tokens, entropies = [], []
        for start in starts:
            part_keys = None if keys is None else keys[start: start + chunk]
            part_tokens, part_entropies = _generate_batch(contexts[start: start + chunk], max_new_tokens, part_keys)
            tokens += part_tokens
            if record_entropy:
                entropies += part_entropies
        for _ in range(calls - len(starts)):
            _generate_batch([[pad_token_id]], max_new_tokens)
        return tokens, (entropies if record_entropy else None)

    def _generate_batch(contexts: list[list[int]], max_new_tokens: int, keys: list | None = None):
        device = next(model.parameters()).device
        cached = store.take(contexts, keys) if store is not None and keys is not None else [(0, None)] * len(contexts)
        prefix = max(n for n, _ in cached)  # width of the cached part; every row has >= 1 new token after it
        suffix = max(len(c) - n for c, (n, _) in zip(contexts, cached))
        input_ids = torch.full((len(contexts), prefix + suffix), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(contexts), prefix + suffix), dtype=torch.long)
        for row, (context, (n, _)) in enumerate(zip(contexts, cached)):
            # [pads | cached tokens | pads | new tokens]: positions come from the mask, so the holes are harmless
            input_ids[row, prefix - n: prefix] = torch.tensor(context[:n], dtype=torch.long)
            attention_mask[row, prefix - n: prefix] = 1
            new = context[n:]
            input_ids[row, prefix + suffix - len(new):] = torch.tensor(new, dtype=torch.long)
            attention_mask[row, prefix + suffix - len(new):] = 1
        config = copy.deepcopy(generation_config)
        config.max_new_tokens = max_new_tokens
        if config.min_new_tokens is not None:  # a user's minimum applies per turn, within the turn's budget
            config.min_new_tokens = min(config.min_new_tokens, max_new_tokens)
        extra = {}
        if store is not None and keys is not None:
            config.return_dict_in_generate = True
            config.use_cache = True
            if prefix:
                extra[_CACHE_ARGUMENT] = store.batch_cache(cached, prefix, device)
                config.cache_implementation = None  # the cache is given (a dynamic one)
            cached = None  # the rows' old K/V now live only in the batch cache
        recorder = GenerationEntropyRecorder(temperature)
        with torch.no_grad(), (recorder.attached(hooked) if record_entropy else _null()):
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config, **extra)
        sequences = output.sequences if hasattr(output, "sequences") else output
        generated = sequences[:, prefix + suffix:].cpu()
        recorded = None
        if record_entropy:
            # With a cache given, generate feeds only the uncached tokens before the first sampled one.
            prefill_width = suffix if _CACHE_ARGUMENT in extra else prefix + suffix
            recorded = recorder.entropies(prefill_width=prefill_width, generated_width=generated.size(1),
                                          trailing_steps=run_when_empty)
            if recorded is None:
                logger.warning("could not match the recorded entropies to the %d generated positions; returning NaN "
                               "entropies for this call (the trainer then computes them in a forward pass)",
                               generated.size(1))
                recorded = torch.full(generated.shape, float("nan"))
        tokens, entropies = [], []
        for row in range(generated.size(0)):
            turn = tokens_through_eos(generated[row].tolist(), eos)
            tokens.append(turn)
            if recorded is not None:
                entropies.append(recorded[row, : len(turn)].cpu().tolist())
        if store is not None and keys is not None:
            store.put(keys, contexts, tokens, attention_mask, getattr(output, _CACHE_ARGUMENT, None))
        return tokens, (entropies if record_entropy else None)

    generate.accepts_keys = store is not None
    generate.release = store.clear if store is not None else (lambda: None)
    return generate


#: ``generate``'s keyword and output field for the cache (transformers 5.x renamed ``past_key_values`` to ``cache``).
_CACHE_ARGUMENT = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


class _KVStore:
    """Per-episode KV caches kept between turns: ``key -> (tokens whose keys/values are cached, [(K, V)] per layer)``
    with ``K, V`` of shape ``(kv_heads, tokens, head_dim)``."""

    def __init__(self):
        self.entries: dict = {}
        self.warned = False

    def keep_only(self, keys) -> None:
        """Drop the episodes that are not in this turn (finished ones)."""
        wanted = set(keys or ())
        for key in [k for k in self.entries if k not in wanted]:
            del self.entries[key]

    def take(self, contexts, keys) -> list[tuple[int, list | None]]:
        """For every context: (how many of its leading tokens are cached, their per-layer K/V) -- the longest
        common prefix with what was cached, leaving at least one token to encode. Entries are removed."""
        taken = []
        for context, key in zip(contexts, keys):
            entry = self.entries.pop(key, None)
            if entry is None:
                taken.append((0, None))
                continue
            cached_tokens, layers = entry
            n = len(cached_tokens)
            if context[:n] != cached_tokens:
                n = next((j for j, (a, b) in enumerate(zip(cached_tokens, context)) if a != b), min(n, len(context)))
            n = min(n, len(context) - 1)
            taken.append((n, [(k[:, :n], v[:, :n]) for k, v in layers] if n > 0 else None))
        return taken

    @staticmethod
    def batch_cache(cached, width: int, device) -> DynamicCache:
        """A ``DynamicCache`` of ``width`` positions: each row's cached K/V right-aligned, zeros (masked) before.
        Built one layer at a time (a generator), and each row's source tensors are released once copied."""
        template = next(layers for n, layers in cached if n > 0)
        shapes = [(k.size(0), k.size(-1), k.dtype) for k, _ in template]
        del template

        def layer_data():
            for layer, (heads, head_dim, dtype) in enumerate(shapes):
                keys = torch.zeros((len(cached), heads, width, head_dim), dtype=dtype, device=device)
                values = torch.zeros_like(keys)
                for row, (n, layers) in enumerate(cached):
                    if n > 0:
                        keys[row, :, width - n:] = layers[layer][0]
                        values[row, :, width - n:] = layers[layer][1]
                        layers[layer] = None  # this row's copy of the layer is no longer needed
                yield keys, values

        return DynamicCache(ddp_cache_data=layer_data())

    def put(self, keys, contexts, turns, attention_mask, cache) -> None:
        """Keep, for each row, the K/V of its real tokens: context + the turn's tokens except the last (which
        ``generate`` sampled but never fed). Rows of a model without a plain dynamic cache are not kept."""
        layers = getattr(cache, "layers", None)
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers) \
                or any(type(layer) is not DynamicLayer for layer in layers):  # e.g. sliding-window layers
            if not self.warned:
                self.warned = True
                logger.warning("env_reuse_kv_cache: the model's cache (%s) is not a plain DynamicCache of full-"
                               "attention layers; every turn re-encodes the whole context instead",
                               type(cache).__name__)
            return
        width = attention_mask.size(1)
        fed = [max(len(turn) - 1, 0) for turn in turns]
        indices = [torch.cat([attention_mask[row].nonzero().flatten(), torch.arange(width, width + n)])
                   for row, n in enumerate(fed)]
        per_row = [[] for _ in turns]
        for layer in layers:  # layer by layer, freeing the batch cache's layer once its rows are copied
            for row, index in enumerate(indices):
                index = index.to(layer.keys.device)
                per_row[row].append((layer.keys[row].index_select(1, index), layer.values[row].index_select(1, index)))
            layer.keys = layer.values = None
        for key, context, turn, n, kv in zip(keys, contexts, turns, fed, per_row):
            self.entries[key] = (list(context) + list(turn[:n]), kv)

    def clear(self) -> None:
        """Drop every kept cache (the rollout is over)."""
        self.entries.clear()


@contextmanager
def _null():
    yield None
