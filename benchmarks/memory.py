"""Peak memory and throughput of AEM LoRA training on the REAL Qwen2.5 architecture (random weights, nothing downloaded).

Run ``python benchmarks/memory.py --quick`` for a smoke check (about a minute on a 2-core CPU), or without ``--quick``
for the default measurement (a few minutes on CPU). Nothing is downloaded: the model is a ``Qwen2ForCausalLM`` built
from a hard-coded copy of the published Qwen2.5 configuration (``--model 1.5b`` or ``7b``) with random weights, and
the tokenizer is ``trl_aem.tiny``'s word-level tokenizer (Qwen2.5's chat template) padded with dummy words ``w0, w1,
...`` to exactly the model's vocabulary size, so the embedding and the LM head have their full width. The only files
written are TRL's ``output_dir`` in a temporary directory (removed at the end) and the ``--json`` path if given.

Sizes
-----
* With CUDA (``--device auto`` finds it, or ``--device cuda``): the FULL model (all 28 layers, full vocabulary), bf16
  weights, ``gradient_checkpointing=True``, realistic multi-turn lengths (12 turns x 64 generated tokens, 200-word
  observations, ``max_completion_length`` 4096).
* On CPU (the default where there is no GPU): hidden size, MLP width, attention and KV heads and the vocabulary stay
  those of the real model, but only ``--layers`` decoder layers are built (default 2 of 28; quick 1), in float32,
  with 4 turns x 32 generated tokens and 100-word observations (quick: 3 x 16, 48-word observations). Everything that
  is per-layer (weights, LoRA adapters, activations) scales with the layer count; embedding, LM head and logits do not.

Training
--------
``AEMGRPOTrainer(env=ToolLogEnv, peft_config=LoraConfig(r=64, lora_alpha=128, all seven Qwen2.5 projections),
args=AEMGRPOConfig(...))`` with AEM's default settings, one generation per optimizer step (``steps_per_generation``
1, no old-log-probability pass, ``beta`` 0 so no reference pass; entropies are recorded while generating). The
environment (:class:`ToolLogEnv`, defined below) is deterministic: every episode lasts exactly ``--turns`` turns and
every observation is exactly ``--obs-tokens`` words (one token each), like a tool returning a listing. EOS and the
other special tokens are removed from sampling with ``generation_kwargs={"suppress_tokens": [...]}`` (the trick of
``benchmarks/overhead.py``), so every turn generates exactly ``--tokens-per-turn`` tokens and the lengths are fixed;
the lengths actually reached are measured and printed. Seeds are fixed.

What is measured
----------------
* Step time: wall time of each optimizer step, from the ``on_step_begin`` to the ``on_step_end`` callback of TRL's
  own training loop (multi-turn generation, scoring, AEM, loss, backward, optimizer step). The first ``--warmup``
  steps are left out of every statistic.
* Tokens per second = (generated tokens + trained tokens) / step time, where *generated* = tokens sampled by the
  policy in the step (the action tokens of all turns of all episodes) and *trained* = non-padding tokens of the
  training forward/backward pass (prompt + all turns, observations included). Both parts are printed separately.
* Peak memory. CUDA: ``torch.cuda.max_memory_allocated()`` (tensors allocated by PyTorch), reset with
  ``torch.cuda.reset_peak_memory_stats()`` at the start of every measured step; also ``max_memory_reserved``.
  CPU: the process's peak resident set size (``VmHWM`` from ``/proc/self/status``), reset at the start of every
  measured step by writing ``5`` to ``/proc/self/clear_refs`` (Linux), i.e. the kernel's exact high-water mark of
  the whole process (Python, libraries, allocator caches included). Where that reset is not allowed, the lifetime
  peak ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is reported instead (labelled so). "Before training" is the
  memory right after the trainer is built (weights, LoRA adapters; on CPU also the Python/torch baseline, printed).
* Parameters: trainable (LoRA) and total, as built; the size of the weights in bytes.
* Sequence lengths: mean prompt length, mean completion length (all turns plus observations), mean generated tokens
  per episode, mean turns, and the longest prompt+completion.

Also printed: an analytic estimate for the FULL-size model in bf16 on a GPU (weights = parameters x 2 bytes; LoRA
parameters, their gradients and Adam's two states in fp32), labelled "estimate, not measured"; it does NOT include
activations, logits, the generation KV cache or the allocator's overhead.
"""

from __future__ import annotations

import os

import _offline  # noqa: E402,F401  (the offline environment, before transformers is imported)

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

import trl_aem  # noqa: E402
from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: E402

from _common import (benchmark_config_args, cpu_model, padded_word_tokenizer, parity_fraction,  # noqa: E402
                     write_json)

SEED = 1234
#: Real words of the task; the vocabulary is padded to the model's vocabulary size with dummy words ``w0, w1, ...``.
TASK_WORDS = ["list", "entries", "matching", "even", "odd", "results", "done"]
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Published configurations (Qwen/Qwen2.5-1.5B-Instruct and Qwen/Qwen2.5-7B-Instruct ``config.json``).
ARCHITECTURES = {
    "1.5b": dict(name="Qwen2.5-1.5B", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                 rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768),
    "7b": dict(name="Qwen2.5-7B", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
               rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768),
}

#: Run-size defaults per device; ``None`` for layers/vocab means "the real model's".
DEFAULTS = {
    "cuda": dict(layers=None, vocab_size=None, num_generations=8, batch_size=8, turns=12, tokens_per_turn=64,
                 obs_tokens=200, max_completion_length=4096, steps=3, warmup=1),
    "cpu": dict(layers=2, vocab_size=None, num_generations=2, batch_size=2, turns=4, tokens_per_turn=32,
                obs_tokens=100, max_completion_length=None, steps=2, warmup=1),
    "cpu-quick": dict(layers=1, vocab_size=32768, num_generations=2, batch_size=2, turns=3, tokens_per_turn=16,
                      obs_tokens=48, max_completion_length=None, steps=1, warmup=1),
    "cuda-quick": dict(layers=None, vocab_size=None, num_generations=4, batch_size=4, turns=4, tokens_per_turn=32,
                       obs_tokens=100, max_completion_length=1024, steps=1, warmup=1),
}
#: Chat-template tokens around one observation with the word tokenizer (<|im_end|> <|im_start|> user ... ).
OBS_OVERHEAD = 8


# ---------------------------------------------------------------------------------------------- environment
class ToolLogEnv(gymnasium.Env):
    """A deterministic tool-use-like text environment with long observations.

    ``reset(seed)`` and every ``step`` return a listing of exactly ``obs_tokens`` words (``"results : w17 w4 ..."``,
    drawn from the seed and the turn) that asks for entries of one parity; the reward of a step is the fraction of
    the action's words ``w<k>`` with that parity (a random policy gets spread around 0.5). The episode always
    terminates at turn ``turns``, whatever the agent says, so every trajectory has the same shape.
    """

    metadata = {"render_modes": []}

    def __init__(self, turns: int = 4, obs_tokens: int = 100, vocab_words: int = 1000):
        self.turns, self.obs_tokens, self.vocab_words = turns, obs_tokens, max(1, vocab_words)

    def _observation(self) -> str:
        want = self.targets[self.index]
        head = ["list", "entries", "matching", "even" if want == 0 else "odd", ":", "results", ":"]
        body = [f"w{self.rng.randrange(self.vocab_words)}" for _ in range(max(0, self.obs_tokens - len(head)))]
        return " ".join((head + body)[: self.obs_tokens])

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.rng = random.Random(seed)
        self.targets = [self.rng.randrange(2) for _ in range(self.turns)]
        self.index = 0
        return self._observation(), {}

    def step(self, action):
        reward = parity_fraction(action, self.targets[self.index])
        self.index += 1
        if self.index >= self.turns:
            return "done", reward, True, False, {"success": reward > 0.5}
        return self._observation(), reward, False, False, {}


# ---------------------------------------------------------------------------------------------- model and tokenizer
def qwen_config(arch: dict, layers: int, vocab_size: int, tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"], tie_word_embeddings=arch["tie_word_embeddings"],
        rms_norm_eps=arch["rms_norm_eps"], rope_theta=arch["rope_theta"],
        max_position_embeddings=arch["max_position_embeddings"], use_sliding_window=False, hidden_act="silu",
        attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def build_model(config: Qwen2Config, device: str, dtype: torch.dtype, tokenizer):
    """Random weights, built directly on ``device`` in ``dtype`` (no fp32 copy of a big model on the host)."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if device == "cuda":
            torch.cuda.manual_seed_all(SEED)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_params(arch: dict, layers: int, vocab: int) -> tuple[int, int]:
    """(total parameters, LoRA r=64 parameters) of a Qwen2 model, analytically."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    kv = arch["num_key_value_heads"] * (h // arch["num_attention_heads"])
    attention = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o (no bias)
    per_layer = attention + 3 * h * i + 2 * h  # MLP + two RMSNorms
    total = vocab * h * (1 if arch["tie_word_embeddings"] else 2) + layers * per_layer + h
    r = 64
    lora_per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    return total, layers * lora_per_layer


# ---------------------------------------------------------------------------------------------- memory probes
def rss_bytes(field_name: str = "VmRSS") -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB


class MemoryProbe:
    """Peak memory of one step: CUDA allocator peak, or the process's resident-set high-water mark on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.cpu_resettable = False
        if device == "cpu":
            self.cpu_resettable = self._clear_refs() and rss_bytes("VmHWM") is not None

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            return True
        except OSError:
            return False

    @property
    def method(self) -> str:
        if self.device == "cuda":
            return ("torch.cuda.max_memory_allocated() (PyTorch tensors), reset per measured step; "
                    "max_memory_reserved in brackets")
        if self.cpu_resettable:
            return "peak RSS of the process (VmHWM in /proc/self/status), reset per measured step via /proc/self/clear_refs"
        return "lifetime peak RSS of the process (resource.getrusage(RUSAGE_SELF).ru_maxrss); NOT reset per step"

    def current(self) -> int:
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return rss_bytes("VmRSS") or 0

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.cpu_resettable:
            self._clear_refs()

    def peak(self) -> tuple[int, int | None]:
        """(peak, reserved peak on CUDA else None)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        if self.cpu_resettable:
            return rss_bytes("VmHWM") or 0, None
        return ru_maxrss_bytes(), None


# ---------------------------------------------------------------------------------------------- measurement
class StepMeter(TrainerCallback):
    """Times every optimizer step and records its peak memory and token counts (warm-up steps flagged)."""

    def __init__(self, probe: MemoryProbe, warmup: int):
        self.probe, self.warmup = probe, warmup
        self.steps: list[dict] = []
        self.batch: dict | None = None
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        gc.collect()
        self.batch = None
        self.probe.reset()
        if self.probe.device == "cuda":
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.probe.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.start
        peak, reserved = self.probe.peak()
        record = {"step": len(self.steps) + 1, "warmup": len(self.steps) < self.warmup, "seconds": elapsed,
                  "peak_bytes": peak, "peak_reserved_bytes": reserved}
        record.update(self.batch or {})
        self.steps.append(record)
        print(f"[{time.strftime('%H:%M:%S')}] step {record['step']}{' (warm-up)' if record['warmup'] else ''}: "
              f"{elapsed:.1f} s, peak {gib(peak):.2f} GiB", flush=True)


def count_batch(meter: StepMeter, trainer) -> None:
    """Wrap the trainer's scoring step (on the instance) to count the tokens of every generated batch."""
    original = trainer._generate_and_score_completions

    def counted(inputs):
        output = original(inputs)
        prompt_mask, completion_mask = output["prompt_mask"], output["completion_mask"]
        action_mask = completion_mask * output["tool_mask"] if "tool_mask" in output else completion_mask
        rows = completion_mask.size(0)
        prompt_tokens = int(prompt_mask.sum().item())
        completion_tokens = int(completion_mask.sum().item())
        generated = int(action_mask.sum().item())
        batch = meter.batch or {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "generated_tokens": 0,
                                "max_sequence": 0, "turns": []}
        batch["rows"] += rows
        batch["prompt_tokens"] += prompt_tokens
        batch["completion_tokens"] += completion_tokens
        batch["generated_tokens"] += generated
        batch["trained_tokens"] = batch["prompt_tokens"] + batch["completion_tokens"]
        batch["max_sequence"] = max(batch["max_sequence"], int((prompt_mask.sum(1) + completion_mask.sum(1)).max()))
        batch["turns"] += [float(x.get("env_turns", 0)) for x in inputs]
        meter.batch = batch
        return output

    trainer._generate_and_score_completions = counted


def run(opts, arch: dict, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    baseline_rss = rss_bytes("VmRSS")
    tokenizer = padded_word_tokenizer(TASK_WORDS, opts.vocab_size)
    vocab = len(tokenizer)
    config = qwen_config(arch, opts.layers, vocab, tokenizer)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(config, device, dtype, tokenizer)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    completion_length = opts.max_completion_length or (
        opts.turns * opts.tokens_per_turn + (opts.turns - 1) * (opts.obs_tokens + OBS_OVERHEAD) + 16)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "answer the task with one word ."}],
                                  "seed": i} for i in range(256)])
    probe = MemoryProbe(device)
    turns, obs_tokens, dummy_words = opts.turns, opts.obs_tokens, max(1, vocab - 64)

    def env():
        return ToolLogEnv(turns=turns, obs_tokens=obs_tokens, vocab_words=dummy_words)

    with tempfile.TemporaryDirectory(prefix="aem-memory-") as tmp:
        args = AEMGRPOConfig(
            **benchmark_config_args(opts, tmp, tokenizer, SEED, completion_length, device),
            gradient_checkpointing=opts.gradient_checkpointing,
            env_max_turns=opts.turns,
            env_max_new_tokens_per_turn=opts.tokens_per_turn,
            env_num_workers=1,
            env_timeout=None,
        )
        lora = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=LORA_MODULES, task_type="CAUSAL_LM")
        trainer = AEMGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, env=env,
                                 peft_config=lora)
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        meter = StepMeter(probe, opts.warmup)
        trainer.add_callback(meter)
        count_batch(meter, trainer)
        params = list(trainer.model.parameters())
        total_params = sum(p.numel() for p in params)
        trainable = [p for p in params if p.requires_grad]
        trainable_params = sum(p.numel() for p in trainable)
        lora_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
        gc.collect()
        before = probe.current()
        before_peak = probe.peak()[0]
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        entropy_source = trainer.aem_entropy_source
        del trainer, model
        gc.collect()

    measured = [s for s in meter.steps if not s["warmup"]]
    if not measured:
        raise RuntimeError("no measured steps (raise --steps)")
    seconds = [s["seconds"] for s in measured]
    rows = sum(s["rows"] for s in measured)
    generated = sum(s["generated_tokens"] for s in measured)
    trained = sum(s["trained_tokens"] for s in measured)
    total_time = sum(seconds)
    turns_seen = [t for s in measured for t in s["turns"]]
    return {
        "model": arch["name"], "device": device, "dtype": str(dtype).replace("torch.", ""),
        "layers": opts.layers, "layers_full": arch["num_hidden_layers"], "vocab_size": vocab,
        "vocab_size_full": arch["vocab_size"], "hidden_size": arch["hidden_size"],
        "intermediate_size": arch["intermediate_size"], "heads": arch["num_attention_heads"],
        "kv_heads": arch["num_key_value_heads"], "tied_embeddings": arch["tie_word_embeddings"],
        "gradient_checkpointing": opts.gradient_checkpointing, "num_generations": opts.num_generations,
        "batch_size": opts.batch_size, "turns": opts.turns, "tokens_per_turn": opts.tokens_per_turn,
        "obs_tokens": opts.obs_tokens, "max_completion_length": completion_length,
        "warmup_steps": opts.warmup, "measured_steps": len(measured), "entropy_source": entropy_source,
        "total_params": total_params, "trainable_params": trainable_params, "lora_dtype": ",".join(lora_dtypes),
        "weight_bytes": weight_bytes, "memory_method": probe.method,
        "baseline_rss_bytes": baseline_rss if device == "cpu" else None,
        "memory_before_training_bytes": before, "memory_peak_before_training_bytes": before_peak,
        "peak_bytes": max(s["peak_bytes"] for s in measured),
        "peak_reserved_bytes": max((s["peak_reserved_bytes"] or 0) for s in measured) or None,
        "lifetime_ru_maxrss_bytes": ru_maxrss_bytes(),
        "step_seconds_median": statistics.median(seconds), "step_seconds_min": min(seconds),
        "step_seconds_max": max(seconds),
        "generated_tokens_per_step": generated / len(measured), "trained_tokens_per_step": trained / len(measured),
        "generated_tokens_per_s": generated / total_time, "trained_tokens_per_s": trained / total_time,
        "tokens_per_s": (generated + trained) / total_time,
        "mean_prompt_length": sum(s["prompt_tokens"] for s in measured) / rows,
        "mean_completion_length": sum(s["completion_tokens"] for s in measured) / rows,
        "mean_generated_per_episode": generated / rows,
        "mean_turns": statistics.fmean(turns_seen) if turns_seen else float("nan"),
        "max_sequence_length": max(s["max_sequence"] for s in measured),
        "wall_seconds": wall, "steps": meter.steps,
    }


# ---------------------------------------------------------------------------------------------- report
def gib(n: float | None) -> float:
    return float("nan") if n is None else n / 2**30


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} ({gib(torch.cuda.get_device_properties(0).total_memory):.0f} GiB)"
    name = cpu_model()
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            total = int(handle.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        total = None
    ram = f", {gib(total):.0f} GiB RAM" if total else ""
    return f"CPU {name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}{ram}"


def estimate(arch: dict) -> dict:
    total, lora = count_params(arch, arch["num_hidden_layers"], arch["vocab_size"])
    weights = 2 * total
    lora_bytes = 4 * lora
    grads = 4 * lora
    adam = 8 * lora
    return {"model": arch["name"], "total_params": total, "lora_params": lora, "weights_bf16_bytes": weights,
            "lora_fp32_bytes": lora_bytes, "lora_grad_fp32_bytes": grads, "adam_fp32_bytes": adam,
            "total_bytes": weights + lora_bytes + grads + adam}


def report(r: dict, est: dict) -> str:
    lines = []
    add = lines.append
    add(f"AEM memory benchmark: {r['model']} architecture, random weights (nothing downloaded)")
    add(f"versions: trl_aem {trl_aem.__version__}, trl {trl.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    add(f"hardware: {r['hardware']}")
    scaled = r["layers"] != r["layers_full"] or r["vocab_size"] != r["vocab_size_full"]
    add(f"model: hidden {r['hidden_size']}, intermediate {r['intermediate_size']}, {r['heads']} heads "
        f"({r['kv_heads']} KV), {r['layers']} of {r['layers_full']} layers, vocab {r['vocab_size']} "
        f"(full {r['vocab_size_full']}), {'tied' if r['tied_embeddings'] else 'untied'} embeddings, {r['dtype']}, "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}"
        + ("  [SCALED DOWN: not the full model]" if scaled else "  [full size]"))
    add(f"training: AEMGRPOTrainer(env=ToolLogEnv), LoRA r=64 alpha=128 on q/k/v/o/gate/up/down_proj "
        f"(adapter dtype {r['lora_dtype']}), {r['batch_size']} episodes per step in groups of {r['num_generations']}, "
        f"{r['turns']} turns x {r['tokens_per_turn']} generated tokens, {r['obs_tokens']}-word observations, "
        f"max_completion_length {r['max_completion_length']}, AEM entropy source '{r['entropy_source']}'")
    add(f"steps: {r['warmup_steps']} warm-up (excluded) + {r['measured_steps']} measured; run wall time "
        f"{r['wall_seconds']:.0f} s")
    add(f"memory: {r['memory_method']}")
    add("")
    rows = [
        ("parameters, total", f"{r['total_params'] / 1e6:,.1f} M"),
        ("parameters, trainable (LoRA)", f"{r['trainable_params'] / 1e6:,.2f} M "
                                         f"({100 * r['trainable_params'] / r['total_params']:.2f}%)"),
        ("model weights (params x bytes)", f"{gib(r['weight_bytes']):.2f} GiB"),
    ]
    if r["baseline_rss_bytes"] is not None:
        rows.append(("RSS before building the model", f"{gib(r['baseline_rss_bytes']):.2f} GiB"))
    rows += [
        ("memory before training", f"{gib(r['memory_before_training_bytes']):.2f} GiB"),
        ("peak memory during measured steps", f"{gib(r['peak_bytes']):.2f} GiB"
         + (f" [reserved {gib(r['peak_reserved_bytes']):.2f} GiB]" if r["peak_reserved_bytes"] else "")),
    ]
    if r["device"] == "cpu":
        rows.append(("lifetime peak RSS (ru_maxrss)", f"{gib(r['lifetime_ru_maxrss_bytes']):.2f} GiB"))
    rows += [
        ("step time, median [min-max]", f"{r['step_seconds_median']:.1f} s "
                                        f"[{r['step_seconds_min']:.1f}-{r['step_seconds_max']:.1f}]"),
        ("tokens/s (generated + trained)", f"{r['tokens_per_s']:,.1f}"),
        ("  generated tokens/s", f"{r['generated_tokens_per_s']:,.1f} ({r['generated_tokens_per_step']:,.0f} per step)"),
        ("  trained tokens/s", f"{r['trained_tokens_per_s']:,.1f} ({r['trained_tokens_per_step']:,.0f} per step)"),
        ("mean prompt length", f"{r['mean_prompt_length']:.1f} tokens"),
        ("mean completion length", f"{r['mean_completion_length']:.1f} tokens (all turns + observations)"),
        ("mean generated per episode", f"{r['mean_generated_per_episode']:.1f} tokens in {r['mean_turns']:.1f} turns"),
        ("longest prompt + completion", f"{r['max_sequence_length']} tokens"),
    ]
    width = max(len(k) for k, _ in rows)
    add(f"{'quantity':<{width}}  value")
    add("-" * (width + 40))
    for key, value in rows:
        add(f"{key:<{width}}  {value}")
    add("")
    add("tokens/s = (generated + trained tokens) / step time, summed over the measured steps; generated = tokens "
        "sampled by the policy (all turns' actions); trained = non-padding tokens of the training forward/backward "
        "(prompt + actions + observations). Step time = TRL's on_step_begin -> on_step_end (generation, scoring, AEM, "
        "loss, backward, optimizer step).")
    if r["device"] == "cpu":
        add("CPU peak memory is the whole process's resident set (Python, libraries, allocator caches included), in "
            f"{r['dtype']}; it is not what a GPU run of the full model would allocate.")
    add("")
    add(f"ESTIMATE, NOT MEASURED: full-size {est['model']} (28 layers, vocab {ARCHITECTURES_BY_NAME[est['model']]}) "
        "on a GPU in bf16 with this LoRA:")
    add(f"  weights bf16: {est['total_params'] / 1e9:.3f} B params x 2 bytes = {gib(est['weights_bf16_bytes']):.2f} GiB")
    add(f"  LoRA params fp32: {est['lora_params'] / 1e6:.2f} M x 4 bytes = {gib(est['lora_fp32_bytes']):.3f} GiB; "
        f"their gradients fp32 {gib(est['lora_grad_fp32_bytes']):.3f} GiB; Adam states (2 x fp32) "
        f"{gib(est['adam_fp32_bytes']):.3f} GiB")
    add(f"  total {gib(est['total_bytes']):.2f} GiB, NOT including activations, logits, the generation KV cache or "
        "allocator overhead (these grow with batch x sequence length and come on top; benchmarks/memory_plan.py traces "
        "them at full size).")
    return "\n".join(lines)


ARCHITECTURES_BY_NAME = {a["name"]: a["vocab_size"] for a in ARCHITECTURES.values()}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run, a smoke check (about a minute on CPU)")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="1.5b", help="architecture (default 1.5b)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA if available (full size, bf16), else CPU (scaled down, float32)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: CUDA 28 = full; CPU 2; quick CPU 1)")
    parser.add_argument("--vocab-size", type=int,
                        help="vocabulary incl. dummy words (default: the model's, 151936 / 152064; quick CPU 32768)")
    parser.add_argument("--num-generations", type=int, help="episodes per group (default: CUDA 8, CPU 2)")
    parser.add_argument("--batch-size", type=int, help="per_device_train_batch_size = episodes per step "
                                                       "(default: CUDA 8, CPU 2)")
    parser.add_argument("--turns", type=int, help="turns per episode (default: CUDA 12, CPU 4; quick CPU 3)")
    parser.add_argument("--tokens-per-turn", type=int, help="generated tokens per turn (default: CUDA 64, CPU 32; "
                                                            "quick CPU 16)")
    parser.add_argument("--obs-tokens", type=int, help="words (= tokens) per observation (default: CUDA 200, CPU 100; "
                                                       "quick CPU 48)")
    parser.add_argument("--max-completion-length", type=int,
                        help="default: CUDA 4096; CPU just enough for all turns and observations")
    parser.add_argument("--steps", type=int, help="measured steps (default: CUDA 3, CPU 2; quick 1)")
    parser.add_argument("--warmup", type=int, help="warm-up steps, excluded (default 1)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="gradient checkpointing (TRL's GRPOConfig default; default on)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--json", metavar="PATH", help="write the results (and per-step records) to this JSON file")
    opts = parser.parse_args(argv)
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    arch = ARCHITECTURES[opts.model]
    defaults = DEFAULTS[device + ("-quick" if opts.quick else "")]
    for key, value in defaults.items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    opts.layers = opts.layers or arch["num_hidden_layers"]
    opts.vocab_size = opts.vocab_size or arch["vocab_size"]
    for key in ("layers", "num_generations", "batch_size", "turns", "tokens_per_turn", "steps"):
        if getattr(opts, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if opts.warmup < 0 or opts.obs_tokens < 1 or opts.vocab_size < 256:
        parser.error("--warmup must be >= 0, --obs-tokens >= 1, --vocab-size >= 256")
    if opts.batch_size % opts.num_generations:
        parser.error("--batch-size must be a multiple of --num-generations")
    return opts, arch, device


def main(argv=None) -> int:
    opts, arch, device = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"[{time.strftime('%H:%M:%S')}] {arch['name']} on {device}: {opts.layers} layers, vocab {opts.vocab_size}, "
          f"{opts.warmup} + {opts.steps} steps ...", flush=True)
    result = run(opts, arch, device)
    result["hardware"] = hardware(device)
    result["versions"] = {"trl_aem": trl_aem.__version__, "trl": trl.__version__,
                          "transformers": transformers.__version__, "peft": peft.__version__,
                          "torch": torch.__version__, "python": platform.python_version()}
    est = estimate(arch)
    # Cross-check of the analytic count against the model actually built (same formula at the built size).
    built_total, built_lora = count_params(arch, opts.layers, result["vocab_size"])
    result["analytic_params_check"] = {"total": built_total, "lora": built_lora,
                                       "matches": (built_total == result["total_params"] - result["trainable_params"]
                                                   and built_lora == result["trainable_params"])}
    result["estimate_full_bf16_not_measured"] = est
    print()
    print(report(result, est))
    if not result["analytic_params_check"]["matches"]:
        print(f"note: the analytic parameter count ({built_total} + LoRA {built_lora}) does not match the built model "
              f"({result['total_params'] - result['trainable_params']} + LoRA {result['trainable_params']})")
    if opts.json:
        write_json(opts.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
