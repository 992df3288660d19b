"""Plan a recipe's GPU memory without a GPU: trace its two memory-heavy phases at FULL size with fake tensors.

    python benchmarks/memory_plan.py --config examples/recipes/qwen2.5-7b-household-lora.yaml
    python benchmarks/memory_plan.py --model 1.5b --batch-size 8 --generation-batch-size 128 --sequence-length 4608
    python benchmarks/memory_plan.py --validate      # the tracer on fake vs real tensors, scaled-down model, CPU

Nothing is downloaded and no real memory is used for the big tensors: the Qwen2.5 model (the published 1.5B or 7B
configuration, as in ``benchmarks/memory.py``) is built on the ``meta`` device, wrapped with the recipe's LoRA by
``peft``, and its weights are then replaced by ``FakeTensor`` s (PyTorch's shape-and-dtype-only tensors). The phases
then run through the real code: transformers' Qwen2 forward, peft's LoRA layers, gradient checkpointing, and TRL's
own ``GRPOTrainer.compute_loss`` (with TRL's fused LM head), taken from an ``AEMGRPOTrainer`` built on a tiny real
model with the recipe's settings. A ``TorchDispatchMode`` (:class:`PeakMemory`) records every tensor storage an
operation creates, rounded up to 512 bytes as PyTorch's CUDA allocator does, and frees it when the storage dies;
its peak is the tensor memory the phase needs.

Phases traced
-------------
* generation: one forward of ``chunk x sequence length`` tokens with the KV cache on, where chunk is
  ``env_generation_chunk_size`` (default: the whole generation batch) -- the prefill of the last, longest turn: the
  environment rollout re-encodes every episode's whole context each turn, one ``generate`` call per chunk of
  unfinished episodes -- then one decoding step on that cache. No gradients.
* training: two gradient-accumulation micro-steps (``compute_loss`` + ``backward`` on ``per_device_train_batch_size``
  rows of ``sequence length`` tokens; the second one holds the LoRA gradients of the first), under bf16 autocast as
  ``bf16: true`` runs on a GPU.
* optimizer state: Adam's two fp32 states per LoRA parameter (``torch.optim.AdamW``), counted, not traced.

With ``env_context: window`` (the step-wise setting) the sequence is one turn's: ``env_max_prompt_length`` prompt
tokens (required in a window recipe) plus ``max_completion_length`` (the turn's budget); the generation phase is the
same prefill of a chunk of such prompts, and the training phase traces ``env_rows_per_forward`` rows (the loss runs
its parts of that many rows, each with its backward pass, so two parts trace like two micro-steps).

What it is and is not
---------------------
It is the tensor memory PyTorch would allocate (what ``torch.cuda.max_memory_allocated`` reports), derived from the
real code path and the real shapes: LoRA dropout active during generation (the trainer generates in training mode,
as TRL does) and one padded row per batch (so the 4D attention mask is built, as for real, padded batches). It is NOT a GPU measurement: the CUDA context (about 0.5-1 GiB), cuBLAS/attention
workspaces and the caching allocator's fragmentation (``max_memory_reserved`` is typically 5-20% above allocated)
come on top; CUDA attention and Triton kernels are replaced by their CPU counterparts for the trace (the CPU flash
attention, TRL's chunked LM head), whose outputs have the same sizes. ``--validate`` checks the tracer itself: the
same phases on a scaled-down model with real tensors and with fake tensors must give the same peak (it checks the
fake-tensor substitution, not that the accounting misses nothing). ``env_reuse_kv_cache`` is not traced (a note
gives the whole batch's KV cache size instead).
"""

from __future__ import annotations

import os

import _offline  # noqa: E402,F401  (the offline environment, before transformers is imported)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
import weakref  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: E402

from memory import ARCHITECTURES, LORA_MODULES, TASK_WORDS, ToolLogEnv, build_model, qwen_config  # noqa: E402
from _common import padded_word_tokenizer, write_json  # noqa: E402

#: PyTorch's CUDA caching allocator hands out multiples of 512 bytes (c10/cuda/CUDACachingAllocator.cpp).
ALLOCATION_BLOCK = 512
#: Padding tokens in one row of every traced batch (any padding makes transformers build the 4D attention mask).
PADDING = 8
GIB = 2**30


# ---------------------------------------------------------------------------------------------- the tracer
class PeakMemory(TorchDispatchMode):
    """Live tensor-storage bytes of everything created inside the mode (plus what :meth:`track` is given), and
    their peak. Works the same on real tensors and on ``FakeTensor`` s, whose storages have sizes but no data."""

    def __init__(self):
        super().__init__()
        self._live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        self.symbolic = 0  # storages whose size depends on data (fake mode): not counted

    def track(self, tensor) -> None:
        """Count ``tensor``'s storage (once) until it is freed."""
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self._live:
            return
        nbytes = storage.nbytes()
        if not isinstance(nbytes, int):  # e.g. x[mask] of a fake tensor: a 1-D metric, a few bytes on a real run
            self.symbolic += 1
            nbytes = 0
        size = -(-nbytes // ALLOCATION_BLOCK) * ALLOCATION_BLOCK
        self._live[storage] = (size, weakref.ref(storage, lambda _ref, size=size: self._free(size)))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out


@contextlib.contextmanager
def fake_scalars():
    """Fake tensors have no values: their ``.item()`` returns 0.0 and their truth value is False. TRL's metrics read
    values after the loss (``.item()``, ``if torch.isnan(x).all()``); they decide nothing about memory. Real tensors
    are unaffected."""
    item, truth = torch.Tensor.item, torch.Tensor.__bool__

    def fake_item(self):
        return 0.0 if isinstance(self, FakeTensor) else item(self)

    def fake_bool(self):
        return False if isinstance(self, FakeTensor) else truth(self)

    torch.Tensor.item, torch.Tensor.__bool__ = fake_item, fake_bool
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.__bool__ = item, truth


# ---------------------------------------------------------------------------------------------- model
def to_fake(model: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Replace every meta parameter/buffer by a fake CPU tensor of the same shape, dtype and ``requires_grad``;
    a parameter shared by several modules (tied embeddings) stays one shared tensor."""
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in replaced:
                    with mode:
                        fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                    replaced[id(param)] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
                module._parameters[name] = replaced[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                with mode:
                    module._buffers[name] = torch.ones(buffer.shape, dtype=buffer.dtype, device="cpu")


def plan_model(config, lora: LoraConfig, trainer: AEMGRPOTrainer, fake: FakeTensorMode | None, tokenizer):
    """The LoRA-wrapped Qwen2 model prepared as the trainer prepares its own: fake (meta-built) or real weights."""
    if fake is not None:
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    else:
        model = build_model(config, "cpu", torch.bfloat16, tokenizer)
    model = get_peft_model(model, lora)
    if fake is not None:
        to_fake(model, fake)
    # What GRPOTrainer.__init__ and Trainer.train do to the model (the fused head is checked against the tiny
    # trainer's model below; checkpointing is enabled by Trainer.train, which the tiny trainer never runs).
    if trainer.args.activation_checkpointing:
        kwargs = dict(trainer.args.activation_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                              every_n_layers=every_n_layers, offload=offload)
        model.enable_input_require_grads()
    add_fused_lm_head(model.get_base_model(), temperature=trainer.temperature,
                      cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32, outputs=("log_probs", "entropy"))
    check_prepared_like(model, trainer.model)
    return model


def check_prepared_like(model, reference) -> None:
    """Fail loudly if TRL prepares its model differently from :func:`plan_model` (TRL's internals moved)."""
    ours, theirs = model.get_base_model(), reference.get_base_model()
    problems = []
    def patched(module):  # TRL's fused LM head replaces the instance's forward by another function
        return getattr(module.forward, "__func__", None) is not type(module).forward

    if patched(ours) != patched(theirs):
        problems.append(f"fused LM head patch (traced model: {patched(ours)}, TRL's: {patched(theirs)})")
    ours_dtypes = {str(p.dtype) for p in model.parameters() if p.requires_grad}
    theirs_dtypes = {str(p.dtype) for p in reference.parameters() if p.requires_grad}
    if ours_dtypes != theirs_dtypes:
        problems.append(f"adapter dtype {ours_dtypes} vs {theirs_dtypes}")
    if problems:
        raise RuntimeError("the traced model is not prepared like GRPOTrainer prepares its model: " + ", ".join(problems)
                           + f" (trl {__import__('trl').__version__}); update benchmarks/memory_plan.py:plan_model")


def tiny_trainer(settings: dict, tokenizer, lora: LoraConfig, output_dir: str) -> AEMGRPOTrainer:
    """An AEMGRPOTrainer with the recipe's loss settings on a one-layer model: the source of ``compute_loss``."""
    arch = ARCHITECTURES["1.5b"]
    small = dict(arch, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = build_model(qwen_config(small, 1, len(tokenizer), tokenizer), "cpu", torch.float32, tokenizer)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "list entries ."}], "seed": i}
                                 for i in range(16)])
    loss_keys = ("loss_type", "beta", "epsilon", "epsilon_high", "importance_sampling_level", "temperature",
                 "gradient_checkpointing", "top_entropy_quantile", "aem_lambda", "aem_min_entropy_range")
    args = AEMGRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=2, num_generations=2, max_completion_length=32,
        bf16=False, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        **{k: settings[k] for k in loss_keys if k in settings})
    return AEMGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          env=lambda: ToolLogEnv(turns=1, obs_tokens=4), peft_config=lora)


# ---------------------------------------------------------------------------------------------- phases
def tracked(model) -> PeakMemory:
    """A tracer already counting the model's parameters and buffers (and existing gradients)."""
    tracer = PeakMemory()
    for tensor in list(model.parameters()) + list(model.buffers()):
        tracer.track(tensor)
        if tensor.grad is not None:
            tracer.track(tensor.grad)
    return tracer


def trace_generation(model, batch: int, length: int, fake: FakeTensorMode | None) -> dict:
    """Prefill of ``batch x length`` tokens with the KV cache, then one decoding step; peak and resident bytes.
    In training mode, as the trainer generates (LoRA dropout active), with one left-padded row (real batches are
    padded, so transformers builds the 4D attention mask)."""
    model.train()
    tracer = tracked(model)
    resident = tracer.current
    with (fake or contextlib.nullcontext()), torch.no_grad(), tracer:
        ids = torch.ones(batch, length, dtype=torch.long)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :PADDING] = 0
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        # transformers renamed past_key_values to cache during 5.x
        cache_arg = "cache" if "cache" in inspect.signature(type(model.get_base_model()).forward).parameters \
            else "past_key_values"
        cache = getattr(out, cache_arg)
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1),
              use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache_bytes = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
        del out, cache
    return {"peak_bytes": tracer.peak, "resident_bytes": resident, "kv_cache_bytes": cache_bytes,
            "uncounted_symbolic_storages": tracer.symbolic}


def trace_training(model, trainer: AEMGRPOTrainer, batch: int, prompt: int, completion: int,
                   fake: FakeTensorMode | None, micro_steps: int = 2) -> dict:
    """``micro_steps`` x (TRL's compute_loss + backward) on ``batch`` rows under bf16 autocast; peak bytes."""
    model.train()
    # set by Trainer's training loop, read by TRL's loss normalisation
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    for param in model.parameters():
        param.grad = None
    tracer = tracked(model)
    resident = tracer.current
    with (fake or contextlib.nullcontext()), fake_scalars(), tracer:
        inputs = {
            "prompt_ids": torch.ones(batch, prompt, dtype=torch.long),
            "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
            "completion_ids": torch.ones(batch, completion, dtype=torch.long),
            "completion_mask": torch.ones(batch, completion, dtype=torch.long),  # padded below
            "tool_mask": torch.ones(batch, completion, dtype=torch.long),
            "advantages": torch.ones(batch, completion),
            "old_per_token_logps": None,
            "importance_sampling_ratio": None,
            "num_items_in_batch": torch.tensor(batch * completion),
        }
        inputs["prompt_mask"][0, :PADDING] = 0  # TRL left-pads prompts and right-pads completions
        inputs["completion_mask"][-1, -PADDING:] = 0
        for _ in range(micro_steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
            del loss
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    for param in model.parameters():
        param.grad = None
    return {"peak_bytes": tracer.peak, "resident_bytes": resident, "lora_grad_bytes": grads,
            "uncounted_symbolic_storages": tracer.symbolic}


# ---------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Plan:
    """What to trace: architecture, LoRA, batch sizes and lengths (from a recipe or the command line)."""

    model: str = "1.5b"
    arch_overrides: dict = dataclasses.field(default_factory=dict)  # e.g. a smaller hidden size (validation)
    layers: int | None = None
    vocab_size: int | None = None
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05  # TRL's ModelConfig default and the recipes' value
    lora_target_modules: tuple = tuple(LORA_MODULES)
    batch_size: int = 8
    generation_batch_size: int = 128
    generation_chunk_size: int | None = None  # env_generation_chunk_size: most episodes per generate call
    reuse_kv_cache: bool = False  # env_reuse_kv_cache: NOT traced; reported as the whole batch's KV cache size
    prompt_length: int = 512
    completion_length: int = 4096
    context: str = "full"  # env_context; "window": one row per turn, prompt_length = env_max_prompt_length
    training_rows: int | None = None  # rows per forward pass of the loss (window: env_rows_per_forward); None = batch
    settings: dict = dataclasses.field(default_factory=dict)
    source: str = "command line"


def plan_from_recipe(path: str, prompt_length: int) -> Plan:
    """Read a recipe YAML (the keys ``trl-aem train --config`` takes) into a :class:`Plan`."""
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle) or {}
    name = str(recipe.get("model_name_or_path", "")).lower()
    model = "7b" if "7b" in name else "1.5b" if "1.5b" in name else None
    if model is None:
        raise SystemExit(f"{path}: model_name_or_path {recipe.get('model_name_or_path')!r} is not a Qwen2.5 1.5B/7B "
                         "model; pass --model and the sizes on the command line instead")
    defaults = {f.name: f.default for f in dataclasses.fields(AEMGRPOConfig)}
    batch = int(recipe.get("per_device_train_batch_size", defaults["per_device_train_batch_size"]))
    accumulation = int(recipe.get("gradient_accumulation_steps", defaults["gradient_accumulation_steps"]))
    steps_per_generation = recipe.get("steps_per_generation") or accumulation
    generation_batch = int(recipe.get("generation_batch_size") or batch * steps_per_generation)
    chunk = recipe.get("env_generation_chunk_size")
    context = recipe.get("env_context", "full")
    training_rows = None
    if context == "window":
        # every turn is a fresh prompt of at most env_max_prompt_length tokens and one row of the loss; a micro-batch
        # holds per_device_train_batch_size episodes x their turns, env_rows_per_forward of them per forward pass
        if not recipe.get("env_max_prompt_length"):
            raise SystemExit(f"{path}: a window recipe needs env_max_prompt_length (the prompt length to trace)")
        prompt_length = int(recipe["env_max_prompt_length"])
        turns = int(recipe.get("env_max_turns", defaults["env_max_turns"]))
        rows = recipe.get("env_rows_per_forward")
        training_rows = min(int(rows), batch * turns) if rows else batch * turns
    return Plan(model=model, context=context, training_rows=training_rows, lora_r=int(recipe.get("lora_r", 64)), lora_alpha=int(recipe.get("lora_alpha", 128)),
                lora_dropout=float(recipe.get("lora_dropout", 0.05)),
                lora_target_modules=tuple(recipe.get("lora_target_modules") or LORA_MODULES), batch_size=batch,
                generation_batch_size=generation_batch, prompt_length=prompt_length,
                generation_chunk_size=int(chunk) if chunk else None,
                reuse_kv_cache=bool(recipe.get("env_reuse_kv_cache", False)),
                completion_length=int(recipe.get("max_completion_length", defaults["max_completion_length"])),
                settings=recipe, source=path)


def run_plan(plan: Plan, fake: bool = True, chunk_sizes=(), batch_sizes=()) -> dict:
    """Trace both phases for ``plan``; returns bytes per phase and the peak (see the module docstring). Also traces
    the generation phase for every ``chunk_sizes`` and the training phase for every ``batch_sizes`` (a sweep, with
    the same model: each value's peak including Adam's states)."""
    arch = dict(ARCHITECTURES[plan.model], **plan.arch_overrides)
    layers = plan.layers or arch["num_hidden_layers"]
    vocab = plan.vocab_size or arch["vocab_size"]
    tokenizer = padded_word_tokenizer(TASK_WORDS, vocab)
    config = qwen_config(arch, layers, len(tokenizer), tokenizer)
    lora = LoraConfig(r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                      target_modules=list(plan.lora_target_modules), task_type="CAUSAL_LM")
    # A shape environment lets data-dependent shapes (boolean-mask indexing in TRL's metrics) stay symbolic.
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()) if fake else None
    sequence = plan.prompt_length + plan.completion_length
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aem-memory-plan-") as tmp:
        settings = dict(plan.settings)
        settings.setdefault("gradient_checkpointing", True)
        trainer = tiny_trainer(settings, tokenizer, lora, tmp)
        model = plan_model(config, lora, trainer, mode, tokenizer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        lora_params = sum(p.numel() for p in trainable)
        adam_bytes = sum(2 * p.numel() * p.element_size() for p in trainable)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        generate_batch = min(plan.generation_batch_size, plan.generation_chunk_size or plan.generation_batch_size)
        generation = trace_generation(model, generate_batch, sequence, mode)
        training_rows = plan.training_rows or plan.batch_size
        training = trace_training(model, trainer, training_rows, plan.prompt_length, plan.completion_length, mode)
        sweep = {
            "generation_chunk_size": {c: trace_generation(model, c, sequence, mode)["peak_bytes"] + adam_bytes
                                      for c in chunk_sizes},
            ("env_rows_per_forward" if plan.context == "window" else "per_device_train_batch_size"): {
                b: trace_training(model, trainer, b, plan.prompt_length, plan.completion_length, mode)["peak_bytes"]
                + adam_bytes for b in batch_sizes},
        }
        del trainer, model
    phases = {"generation": generation["peak_bytes"] + adam_bytes, "training": training["peak_bytes"] + adam_bytes}
    # KV bytes per token (from the traced cache: prefill + one decoding step) x every episode of the batch
    kv_per_token = generation["kv_cache_bytes"] / (generate_batch * (sequence + 1))
    whole_batch_kv = kv_per_token * plan.generation_batch_size * sequence
    return {
        "model": arch["name"], "layers": layers, "vocab_size": len(tokenizer), "fake": fake, "source": plan.source,
        "batch_size": plan.batch_size, "generation_batch_size": plan.generation_batch_size,
        "context": plan.context, "training_rows": training_rows,
        "generation_chunk_size": plan.generation_chunk_size, "generate_call_batch": generate_batch,
        "prompt_length": plan.prompt_length, "completion_length": plan.completion_length, "sequence_length": sequence,
        "lora_r": plan.lora_r, "lora_params": lora_params, "weight_bytes": weight_bytes, "adam_bytes": adam_bytes,
        "generation": generation, "training": training, "phase_peak_bytes": phases,
        "peak_bytes": max(phases.values()), "peak_phase": max(phases, key=phases.get), "sweep": sweep,
        "reuse_kv_cache": plan.reuse_kv_cache, "whole_batch_kv_cache_bytes": whole_batch_kv,
        "trace_seconds": time.perf_counter() - started,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": __import__("trl").__version__, "peft": __import__("peft").__version__},
    }


def report(result: dict) -> str:
    """A table of the traced bytes (GiB)."""
    g, t = result["generation"], result["training"]
    rows = [
        ("weights (bf16) + LoRA (fp32)", result["weight_bytes"]),
        ("Adam states (2 x fp32 per LoRA parameter)", result["adam_bytes"]),
        (f"generation: KV cache ({result['generate_call_batch']} x {result['sequence_length']} tokens per call)",
         g["kv_cache_bytes"]),
        ("generation: peak (prefill + 1 decoding step)", g["peak_bytes"]),
        ("training: LoRA gradients", t["lora_grad_bytes"]),
        (f"training: peak ({result.get('training_rows') or result['batch_size']} rows x {result['sequence_length']} "
         f"tokens, 2 {'loss parts' if result.get('context') == 'window' else 'micro-steps'})", t["peak_bytes"]),
        ("PEAK (+ Adam states), phase: " + result["peak_phase"], result["peak_bytes"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'fake' if result['fake'] else 'REAL'}-tensor trace of {result['model']} ({result['layers']} layers, "
             f"vocab {result['vocab_size']}), LoRA r={result['lora_r']} ({result['lora_params'] / 1e6:.1f} M params), "
             f"from {result['source']}; traced in {result['trace_seconds']:.0f} s",
             f"{'tensor memory':<{width}}  GiB", "-" * (width + 10)]
    lines += [f"{k:<{width}}  {v / GIB:8.2f}" for k, v in rows]
    if result.get("context") == "window":
        lines.append(f"env_context=window: one row per turn; prompts of at most {result['prompt_length']} tokens "
                     f"(env_max_prompt_length), {result['completion_length']} per turn; the loss runs "
                     f"{result['training_rows']} rows per forward pass (env_rows_per_forward).")
    if result["reuse_kv_cache"]:
        lines.append(f"NOTE: env_reuse_kv_cache is on, which this trace does NOT model: the KV caches of all "
                     f"unfinished episodes stay between turns, up to {result['whole_batch_kv_cache_bytes'] / GIB:.2f} GiB "
                     f"for the whole generation batch at full length, plus one chunk's copies, while each turn's "
                     f"prefill shrinks to the new tokens. Measure it (benchmarks/kv_reuse.py shows the trade-off).")
    for knob, peaks in result["sweep"].items():
        if peaks:
            phase = "generation" if knob.startswith("generation") else "training"
            lines.append(f"{phase} peak (+ Adam states) by {knob}: "
                         + ", ".join(f"{k}: {v / GIB:.2f} GiB" for k, v in peaks.items()))
    lines.append("Tensor memory as torch.cuda.max_memory_allocated would count it; add the CUDA context (~0.5-1 GiB) "
                 "and allocator overhead (max_memory_reserved, typically 5-20% more). Traced, not measured on a GPU.")
    return "\n".join(lines)


#: Scaled-down Qwen2 for :func:`validate` (real bf16 matmuls on a CPU are slow at full width).
VALIDATION_ARCH = dict(name="Qwen2.5-1.5B scaled down", hidden_size=256, intermediate_size=1024,
                       num_attention_heads=4, num_key_value_heads=2)


def validate(layers: int = 2, vocab: int = 8192, batch: int = 2, generation_batch: int = 4, prompt: int = 32,
             completion: int = 160) -> dict:
    """The same phases on a scaled-down Qwen2 with real and with fake tensors; their peaks must agree."""
    plan = Plan(model="1.5b", arch_overrides=VALIDATION_ARCH, layers=layers, vocab_size=vocab, batch_size=batch,
                generation_batch_size=generation_batch, prompt_length=prompt, completion_length=completion,
                source="validation")
    real, fake = run_plan(plan, fake=False), run_plan(plan, fake=True)
    out = {}
    for key in ("generation", "training"):
        out[key] = {"real_peak_bytes": real[key]["peak_bytes"], "fake_peak_bytes": fake[key]["peak_bytes"],
                    "ratio": fake[key]["peak_bytes"] / real[key]["peak_bytes"]}
    out["real"], out["fake"] = real, fake
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a recipe YAML (examples/recipes/qwen2.5-*.yaml)")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="1.5b")
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (default 8)")
    parser.add_argument("--generation-batch-size", type=int, default=128,
                        help="episodes generated together in one turn (default 128 = 8 x 16 accumulation steps)")
    parser.add_argument("--generation-chunk-size", type=int,
                        help="env_generation_chunk_size: most episodes per generate call (default: all at once)")
    parser.add_argument("--lora-dropout", type=float, default=0.05,
                        help="LoRA dropout (default 0.05, TRL's and the recipes'; benchmarks/memory.py uses 0)")
    parser.add_argument("--prompt-length", type=int, default=512,
                        help="prompt tokens (system prompt + first observation; default 512)")
    parser.add_argument("--sequence-length", type=int,
                        help="prompt + completion tokens; default prompt-length + max_completion_length (4096)")
    parser.add_argument("--sweep-chunks", type=lambda v: [int(x) for x in v.split(",")], default=[],
                        metavar="N,N,...", help="also trace generation at these env_generation_chunk_size values")
    parser.add_argument("--sweep-batches", type=lambda v: [int(x) for x in v.split(",")], default=[],
                        metavar="N,N,...", help="also trace training at these per_device_train_batch_size values")
    parser.add_argument("--validate", action="store_true", help="check the tracer: real vs fake, scaled down")
    parser.add_argument("--json", metavar="PATH", help="write the result to this JSON file")
    opts = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if opts.validate:
        result = validate()
        for key in ("generation", "training"):
            r = result[key]
            print(f"{key}: real {r['real_peak_bytes'] / 2**20:.2f} MiB, fake {r['fake_peak_bytes'] / 2**20:.2f} MiB, "
                  f"fake/real {r['ratio']:.4f}")
    else:
        if opts.config:
            plan = plan_from_recipe(opts.config, opts.prompt_length)
            if opts.generation_chunk_size:
                plan.generation_chunk_size = opts.generation_chunk_size
        else:
            completion = (opts.sequence_length - opts.prompt_length) if opts.sequence_length else 4096
            plan = Plan(model=opts.model, batch_size=opts.batch_size, generation_batch_size=opts.generation_batch_size,
                        generation_chunk_size=opts.generation_chunk_size, prompt_length=opts.prompt_length,
                        completion_length=completion, lora_dropout=opts.lora_dropout)
        for name in ("batch_size", "generation_batch_size", "prompt_length", "completion_length"):
            if getattr(plan, name) < 1:
                parser.error(f"{name} must be >= 1, got {getattr(plan, name)}")
        if min(opts.sweep_chunks + opts.sweep_batches + [1]) < 1:
            parser.error("--sweep-chunks and --sweep-batches take integers >= 1")
        result = run_plan(plan, chunk_sizes=opts.sweep_chunks, batch_sizes=opts.sweep_batches)
        print(report(result))
    if opts.json:
        write_json(opts.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
