"""AEM's cost on top of its base method, measured on CPU as a ratio from ONE interleaved run.

Run ``python benchmarks/overhead.py --quick`` for a smoke check (a couple of minutes), or without ``--quick`` for
the real measurement (about 10-15 minutes on a quiet 2-core CPU). Nothing is downloaded: the tokenizer and the
randomly initialised Qwen2 model are built in code (``trl_aem.tiny``), and the only files written are TRL's
``output_dir`` in a temporary directory (removed at the end) and the ``--csv`` / ``--plot`` paths if given.

What is compared (same seed, same configuration, same initial weights in both arms):

* ``single``: ``trl.GRPOTrainer`` + ``trl.GRPOConfig`` (arm "GRPO") against ``trl_aem.AEMGRPOTrainer`` +
  ``AEMGRPOConfig`` (arm "AEM") on one-turn prompts with a reward that has spread.
* ``multi``: ``AEMGRPOTrainer(env=...)`` with ``use_aem=False`` (exactly GRPO; arm "GRPO") against
  ``use_aem=True`` (arm "AEM") on :class:`ParityEnv`, a small deterministic text environment defined below whose
  episodes always last exactly ``--turns`` turns.

Equal work in both arms: every special token (EOS, pad, ``<|im_start|>``) is removed from sampling with
``generation_kwargs={"suppress_tokens": [...]}``, so every completion (every turn, in multi-turn mode) has exactly
its maximum length in both arms and the ratio measures AEM, not different sampled lengths. (``min_new_tokens``
would do for single-turn, but ``trl_aem``'s multi-turn generator resets it per turn, while ``suppress_tokens``
survives.) The mean completion length of each arm is printed so this can be checked.

How steps are interleaved and timed
-----------------------------------
Both trainers are built once. Each then runs its ordinary ``trainer.train()`` (``max_steps = warm-up + steps``)
in its own Python thread, so the real TRL/transformers training loop runs unchanged: generation, scoring,
loss, backward, gradient clipping, optimizer and scheduler step. A :class:`transformers.TrainerCallback` on
each trainer holds a *baton*: at ``on_step_begin`` of every step but its first, an arm hands the baton on and
waits until the schedule gives it back; it then starts its clock. ``on_step_end`` (called right after the
optimizer step) stops the clock. The schedule is ``A B B A A B B A ...`` (each round runs one step of each arm,
and which arm goes first alternates between rounds, so neither arm always runs right after the other), and
exactly one thread runs at any time: the waiting thread is blocked on a condition variable, so the arms never
compete for the CPU. Work between steps (logging, fetching the next prompts, a ``gc.collect()``) happens while
the arm holds the baton but outside its clock. Each thread also runs its trainer's set-up (optimizer, data
loader) while holding the baton, and the first ``--warmup`` steps of each arm are left out of the statistics.
The torch, Python and NumPy random states are swapped per arm at every hand-over, so each arm sees the same
random stream it would see if it ran alone (its first step samples exactly the completions the other's does).
An arm whose ``train()`` has returned keeps its thread blocked until the other arm is done too: a thread that
exits (tearing down its OpenMP pool) was seen to slow the other arm's next step down several-fold. The very first
step of a mode (always the GRPO arm's) is several times slower than the others (one-off process warm-up); the
``--warmup`` steps take it out. ``--aa`` runs an A/A control (both arms the base method) to see the benchmark's
own bias and noise on the machine at hand.

Driving ``trainer.training_step`` by hand would also interleave, but would have to re-implement the optimizer,
scheduler and clipping part of the loop; calling ``train()`` repeatedly would rebuild the optimizer and data
loader every time. The thread-and-baton approach times exactly what a user's ``train()`` runs.

Reported: the median step time of each arm with its interquartile range, the ratio of the medians, the median
(and IQR) of the per-round paired ratios AEM/GRPO (robust to slow drifts of the machine), and AEM's own time,
measured directly by wrapping AEM's additions on the AEM trainer instance with timers: the entropy-recording
forward hook (``GenerationEntropyRecorder.__call__`` and ``.entropies``), ``_aem_collect_token_entropy`` (which
includes an extra entropy pass if one is ever needed), ``_aem_modulate`` and, in multi-turn mode,
``_env_span_ids``. AEM's own time as a fraction of the AEM step time is the cleanest estimate of its overhead;
the step-time ratio also sees AEM's indirect costs (e.g. TRL's loss with ``(B, T)`` instead of ``(B,)``
advantages) but is noisier.
"""

from __future__ import annotations

import os

import _offline  # noqa: E402,F401  (the offline environment, before transformers is imported)

import argparse  # noqa: E402
import csv  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

import trl_aem  # noqa: E402
from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: E402
from trl_aem import generation as aem_generation  # noqa: E402
from trl_aem.tiny import build_tiny_qwen2  # noqa: E402

from _common import benchmark_config_args, cpu_model, padded_word_tokenizer, parity_fraction  # noqa: E402

ARMS = ("GRPO", "AEM")
SEED = 1234
#: Real words of the task; the vocabulary is padded to --vocab-size with dummy words ``w0, w1, ...``.
TASK_WORDS = ["say", "even", "odd", "words", "done"]
PARITY = {"even": 0, "odd": 1}

FULL = dict(hidden_size=512, layers=8, heads=8, kv_heads=2, intermediate_size=1408, vocab_size=32000,
            completion_length=64, turns=4, tokens_per_turn=16, steps=10, warmup=2)
QUICK = dict(hidden_size=128, layers=2, heads=4, kv_heads=2, intermediate_size=352, vocab_size=4096,
             completion_length=16, turns=3, tokens_per_turn=6, steps=3, warmup=1)


# ---------------------------------------------------------------------------------------------- task and environment
def parity_reward(completions, target, **kwargs) -> list[float]:
    """Single-turn reward: the fraction of words of the asked parity (a random policy gets spread around 0.5)."""
    return [parity_fraction(c[0]["content"], PARITY[t]) for c, t in zip(completions, target)]


class ParityEnv(gymnasium.Env):
    """'Say words of the asked parity', one request per turn, for exactly ``turns`` turns (deterministic).

    The observation is ``"say even"`` or ``"say odd"`` (drawn from the reset seed); every step's reward is the
    fraction of the action's words ``w<k>`` whose ``k`` has that parity. The episode always terminates at turn
    ``turns``, whatever the agent says, so both arms play trajectories of identical shape.
    """

    metadata = {"render_modes": []}

    def __init__(self, turns: int = 4):
        self.turns = turns

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        rng = random.Random(seed)
        self.targets = [rng.choice(("even", "odd")) for _ in range(self.turns)]
        self.index = 0
        return f"say {self.targets[0]}", {}

    def step(self, action):
        reward = parity_fraction(action, PARITY[self.targets[self.index]])
        self.index += 1
        if self.index >= self.turns:
            return "done", reward, True, False, {"success": reward > 0.5}
        return f"say {self.targets[self.index]}", reward, False, False, {}


def build_model(tokenizer, sizes: dict):
    return build_tiny_qwen2(
        tokenizer, hidden_size=sizes["hidden_size"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], num_key_value_heads=sizes["kv_heads"],
        intermediate_size=sizes["intermediate_size"], seed=SEED,
    )


# ---------------------------------------------------------------------------------------------- baton and timers
class Aborted(RuntimeError):
    """The other arm failed; stop this one too."""


class Baton:
    """Lets exactly one arm run at a time, in the order of ``schedule`` (one entry = one training step)."""

    def __init__(self, schedule: list[str]):
        self.schedule = schedule
        self.pos = 0
        self.holder: str | None = None
        self.done: set[str] = set()
        self.aborted = False
        self.cond = threading.Condition()
        torch.manual_seed(SEED)
        random.seed(SEED)
        np.random.seed(SEED)
        start = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        self.rng_states = {arm: start for arm in ARMS}

    def _turn_of(self, arm: str) -> bool:
        while self.pos < len(self.schedule) and self.schedule[self.pos] in self.done:
            self.pos += 1
        return self.pos >= len(self.schedule) or self.schedule[self.pos] == arm

    def acquire(self, arm: str) -> None:
        with self.cond:
            while not self.aborted and not self._turn_of(arm):
                self.cond.wait()
            if self.aborted:
                raise Aborted("the other arm failed")
            self.holder = arm
        torch_state, py_state, np_state = self.rng_states[arm]
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)

    def release(self, arm: str, finished: bool = False) -> None:
        with self.cond:
            if self.holder == arm:
                self.rng_states[arm] = (torch.get_rng_state(), random.getstate(), np.random.get_state())
                self.holder = None
                self.pos += 1
            if finished:
                self.done.add(arm)
            self.cond.notify_all()

    def wait_all_done(self) -> None:
        with self.cond:
            while not self.aborted and len(self.done) < len(ARMS):
                self.cond.wait()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


@dataclass
class ArmRecord:
    """Per-step measurements of one arm."""

    step_times: list[float] = field(default_factory=list)
    aem_times: list[dict[str, float]] = field(default_factory=list)
    lengths: list[float] = field(default_factory=list)
    threads: int = 0


class Clock:
    """Seconds spent in AEM's own code, by component, for the arm that holds the baton."""

    def __init__(self, baton: Baton):
        self.baton = baton
        self.totals: dict[str, dict[str, float]] = {arm: {} for arm in ARMS}

    def add(self, component: str, seconds: float, arm: str | None = None) -> None:
        arm = arm or self.baton.holder
        if arm is not None:
            self.totals[arm][component] = self.totals[arm].get(component, 0.0) + seconds

    def take(self, arm: str) -> dict[str, float]:
        values, self.totals[arm] = self.totals[arm], {}
        return values


def time_instance_method(trainer, name: str, clock: Clock, arm: str, component: str | None = None) -> None:
    """Replace ``trainer.<name>`` (on the instance only) by a wrapper adding its run time to ``clock``."""
    original = getattr(trainer, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            clock.add(component or name, time.perf_counter() - start, arm)

    setattr(trainer, name, timed)


def time_entropy_recorder(clock: Clock):
    """Time ``GenerationEntropyRecorder`` (the per-decoding-step forward hook and ``entropies()``). Returns an undo."""
    cls = aem_generation.GenerationEntropyRecorder
    original_call, original_entropies = cls.__call__, cls.entropies

    def timed_call(self, module, args, kwargs, output):
        start = time.perf_counter()
        try:
            return original_call(self, module, args, kwargs, output)
        finally:
            clock.add("entropy_hook", time.perf_counter() - start)

    def timed_entropies(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_entropies(self, *args, **kwargs)
        finally:
            clock.add("entropy_hook", time.perf_counter() - start)

    cls.__call__, cls.entropies = timed_call, timed_entropies

    def undo():
        cls.__call__, cls.entropies = original_call, original_entropies

    return undo


class StepTimer(TrainerCallback):
    """Hands the baton on between steps and times each optimizer step (on_step_begin -> on_step_end)."""

    def __init__(self, arm: str, baton: Baton, clock: Clock, record: ArmRecord, trainer):
        self.arm, self.baton, self.clock, self.record, self.trainer = arm, baton, clock, record, trainer
        self.first = True
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.first:
            self.baton.release(self.arm)
            self.baton.acquire(self.arm)
        self.first = False
        gc.collect()
        self.record.threads = torch.get_num_threads()
        self.clock.take(self.arm)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.start
        self.record.step_times.append(elapsed)
        self.record.aem_times.append(self.clock.take(self.arm))
        lengths = self.trainer._metrics["train"].get("completions/mean_length") or [float("nan")]
        self.record.lengths.append(float(lengths[-1]))


# ---------------------------------------------------------------------------------------------- trainers
def build_single(opts, sizes, tokenizer, output_dir: str) -> dict:
    rows = [{"prompt": [{"role": "user", "content": f"say {t} words ."}], "target": t}
            for t in ("even", "odd") * 32]
    dataset = Dataset.from_list(rows)
    args = benchmark_config_args(opts, output_dir, tokenizer, SEED, sizes["completion_length"])
    grpo = trl.GRPOTrainer(model=build_model(tokenizer, sizes), reward_funcs=parity_reward,
                           args=trl.GRPOConfig(**args), train_dataset=dataset, processing_class=tokenizer)
    aem = AEMGRPOTrainer(model=build_model(tokenizer, sizes), reward_funcs=parity_reward,
                         args=AEMGRPOConfig(**args, use_aem=not opts.aa, aem_min_entropy_range=0.0),
                         train_dataset=dataset, processing_class=tokenizer)
    return {"GRPO": grpo, "AEM": aem}


def build_multi(opts, sizes, tokenizer, output_dir: str) -> dict:
    turns, per_turn = sizes["turns"], sizes["tokens_per_turn"]
    # Room for every turn and every observation (about 10 tokens each with the chat template), never a limit.
    completion_length = turns * (per_turn + 16)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "answer the task ."}], "seed": i}
                                 for i in range(64)])
    args = benchmark_config_args(opts, output_dir, tokenizer, SEED, completion_length)
    args.update(env_max_turns=turns, env_max_new_tokens_per_turn=per_turn, env_num_workers=1, env_timeout=None,
                aem_min_entropy_range=0.0)

    def env():
        return ParityEnv(turns=turns)

    return {
        arm: AEMGRPOTrainer(model=build_model(tokenizer, sizes),
                            args=AEMGRPOConfig(**args, use_aem=(arm == "AEM" and not opts.aa)),
                            train_dataset=dataset, processing_class=tokenizer, env=env)
        for arm in ARMS
    }


def run_mode(mode: str, opts, sizes, tokenizer) -> dict:
    """Build both arms of ``mode``, run them interleaved, return their records."""
    with tempfile.TemporaryDirectory(prefix="aem-overhead-") as tmp:
        trainers = (build_single if mode == "single" else build_multi)(opts, sizes, tokenizer, tmp)
        for trainer in trainers.values():
            for cb in (PrinterCallback, ProgressCallback):
                trainer.remove_callback(cb)
        params = sum(p.numel() for p in trainers["AEM"].model.parameters())
        source = trainers["AEM"].aem_entropy_source if trainers["AEM"].args.use_aem else "none (use_aem=False)"

        total = opts.warmup + opts.steps
        schedule = []
        for r in range(total):
            schedule += ["GRPO", "AEM"] if r % 2 == 0 else ["AEM", "GRPO"]
        baton = Baton(schedule)
        clock = Clock(baton)
        records = {arm: ArmRecord() for arm in ARMS}
        aem = trainers["AEM"]
        for name, component in (("_aem_collect_token_entropy", "collect_entropy"), ("_aem_modulate", "modulate"),
                                ("_env_span_ids", "span_ids")):
            time_instance_method(aem, name, clock, "AEM", component)
        undo = time_entropy_recorder(clock)
        for arm, trainer in trainers.items():
            trainer.add_callback(StepTimer(arm, baton, clock, records[arm], trainer))

        errors: dict[str, BaseException] = {}
        num_threads = torch.get_num_threads()

        def body(arm: str) -> None:
            torch.set_num_threads(num_threads)
            try:
                baton.acquire(arm)
                trainers[arm].train()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors[arm] = exc
                baton.abort()
            finally:
                baton.release(arm, finished=True)
                baton.wait_all_done()  # an exiting thread slows the other arm's next step down; exit together

        threads = [threading.Thread(target=body, args=(arm,), name=f"arm-{arm}") for arm in ARMS]
        started = time.perf_counter()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            undo()
        wall = time.perf_counter() - started
        real = {arm: exc for arm, exc in errors.items() if not isinstance(exc, Aborted)}
        if real:
            arm, exc = next(iter(real.items()))
            raise RuntimeError(f"{mode}: the {arm} arm failed: {exc!r}") from exc
        del trainers
        gc.collect()
    return {"mode": mode, "params": params, "records": records, "wall": wall, "entropy_source": source}


# ---------------------------------------------------------------------------------------------- report
def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(result: dict, warmup: int) -> dict:
    grpo, aem = result["records"]["GRPO"], result["records"]["AEM"]
    g, a = grpo.step_times[warmup:], aem.step_times[warmup:]
    n = min(len(g), len(a))
    g, a = g[:n], a[:n]
    if n == 0:
        raise RuntimeError(f"{result['mode']}: no measured steps (raise --steps)")
    own = [sum(t.values()) for t in aem.aem_times[warmup:warmup + n]]
    parts: dict[str, float] = {}
    for t in aem.aem_times[warmup:warmup + n]:
        for key, value in t.items():
            parts[key] = parts.get(key, 0.0) + value
    paired = [x / y for x, y in zip(a, g)]
    return {
        "mode": result["mode"], "params": result["params"], "n": n, "wall": result["wall"],
        "grpo": quartiles(g), "aem": quartiles(a), "ratio": statistics.median(a) / statistics.median(g),
        "paired": quartiles(paired),
        "own_fraction": sum(own) / sum(a), "own_step_median": statistics.median(o / s for o, s in zip(own, a)),
        "own_seconds": statistics.median(own),
        "parts": {k: v / sum(a) for k, v in sorted(parts.items())},
        "len_grpo": statistics.fmean(grpo.lengths), "len_aem": statistics.fmean(aem.lengths),
        "threads": aem.threads, "entropy_source": result["entropy_source"],
    }


def print_report(summaries: list[dict], opts, sizes) -> None:
    print()
    print(f"AEM overhead benchmark: trl_aem {trl_aem.__version__}, trl {trl.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    threads = summaries[0]["threads"] if summaries else torch.get_num_threads()
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {threads}")
    print(f"model: Qwen2, hidden {sizes['hidden_size']}, {sizes['layers']} layers, {sizes['heads']} heads "
          f"({sizes['kv_heads']} KV), intermediate {sizes['intermediate_size']}, vocab {sizes['vocab_size']}, "
          f"float32, tied embeddings")
    print(f"batch: {opts.batch_size} completions per step, {opts.num_generations} per group; single-turn "
          f"{sizes['completion_length']} tokens per completion; multi-turn {sizes['turns']} turns x "
          f"{sizes['tokens_per_turn']} tokens; warm-up {opts.warmup} steps per arm (excluded), order ABBA")
    if opts.aa:
        print("A/A CONTROL RUN (--aa): the 'AEM' arm runs the base method too; the ratio should be 1.0")
    print()
    header = (f"{'mode':<7}{'params':>9}{'steps':>7}{'GRPO median [IQR] s':>25}{'AEM median [IQR] s':>25}"
              f"{'ratio':>8}{'paired ratio [IQR]':>24}{'AEM own':>9}")
    print(header)
    print("-" * len(header))
    for s in summaries:
        g, a, p = s["grpo"], s["aem"], s["paired"]
        print(f"{s['mode']:<7}{s['params'] / 1e6:>8.1f}M{s['n']:>7}"
              f"{f'{g[1]:.3f} [{g[0]:.3f}-{g[2]:.3f}]':>25}{f'{a[1]:.3f} [{a[0]:.3f}-{a[2]:.3f}]':>25}"
              f"{s['ratio']:>8.3f}{f'{p[1]:.3f} [{p[0]:.3f}-{p[2]:.3f}]':>24}{100 * s['own_fraction']:>8.2f}%")
    print()
    for s in summaries:
        parts = ", ".join(f"{k} {100 * v:.2f}%" for k, v in s["parts"].items()) or "none recorded"
        print(f"{s['mode']}: AEM's own time {100 * s['own_fraction']:.2f}% of AEM step time (median per step "
              f"{100 * s['own_step_median']:.2f}%, {1000 * s['own_seconds']:.1f} ms/step): {parts}; "
              f"entropy source '{s['entropy_source']}'; mean generated tokens per completion (TRL's "
              f"completions/mean_length: model tokens only, observations excluded) GRPO {s['len_grpo']:.1f}, "
              f"AEM {s['len_aem']:.1f}; wall {s['wall']:.0f} s")
    print("ratio = median(AEM) / median(GRPO); paired ratio = AEM/GRPO step of the same round. "
          "'AEM own' = time inside AEM's hook, _aem_collect_token_entropy, _aem_modulate, _env_span_ids.")


def write_csv(path: str, results: list[dict], warmup: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mode", "arm", "step", "warmup", "step_time_s", "aem_own_time_s", "mean_completion_length"])
        for result in results:
            for arm in ARMS:
                record = result["records"][arm]
                for i, seconds in enumerate(record.step_times):
                    own = sum(record.aem_times[i].values()) if i < len(record.aem_times) else 0.0
                    length = record.lengths[i] if i < len(record.lengths) else float("nan")
                    writer.writerow([result["mode"], arm, i + 1, int(i < warmup), f"{seconds:.6f}", f"{own:.6f}",
                                     f"{length:.2f}"])
    print(f"per-step times written to {path}")


def write_plot(path: str, results: list[dict], warmup: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path} skipped: matplotlib is not importable")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results):
        for arm, marker in zip(ARMS, ("o", "s")):
            times = result["records"][arm].step_times
            ax.plot(range(1, len(times) + 1), times, marker=marker, label=arm)
        if warmup:
            ax.axvspan(0.5, warmup + 0.5, color="grey", alpha=0.2, label="warm-up (off scale if higher)")
        measured = [t for arm in ARMS for t in result["records"][arm].step_times[warmup:]]
        if measured:
            ax.set_ylim(0, 1.25 * max(measured))
        ax.set_title(f"{result['mode']}-turn ({result['params'] / 1e6:.1f}M parameters)")
        ax.set_xlabel("step")
        ax.set_ylabel("step time (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, few steps (a smoke check, < 2 minutes)")
    parser.add_argument("--mode", choices=("single", "multi", "both"), default="both")
    parser.add_argument("--steps", type=int, help="measured steps per arm and mode (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per arm, excluded (default 2; quick 1)")
    parser.add_argument("--hidden-size", type=int, help="default 512 (quick 128)")
    parser.add_argument("--layers", type=int, help="default 8 (quick 2)")
    parser.add_argument("--heads", type=int, help="attention heads (default 8; quick 4)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default 2)")
    parser.add_argument("--intermediate-size", type=int, help="MLP width (default 1408; quick 352)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary incl. dummy words (default 32000; quick 4096)")
    parser.add_argument("--completion-length", type=int,
                        help="single-turn tokens per completion (default 64; quick 16)")
    parser.add_argument("--turns", type=int, help="multi-turn: turns per episode (default 4; quick 3)")
    parser.add_argument("--tokens-per-turn", type=int, help="multi-turn: tokens per turn (default 16; quick 6)")
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (default 8)")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--aa", action="store_true",
                        help="A/A control: the 'AEM' arm runs with use_aem=False too, so the ratio shows the "
                             "benchmark's own bias and noise (expect 1.0)")
    parser.add_argument("--csv", metavar="PATH", help="write per-step times to this CSV file")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of step times per arm (needs matplotlib)")
    opts = parser.parse_args(argv)
    base = QUICK if opts.quick else FULL
    sizes = {key: getattr(opts, key) if getattr(opts, key, None) is not None else value for key, value in base.items()}
    opts.steps, opts.warmup = sizes.pop("steps"), sizes.pop("warmup")
    if opts.steps < 1 or opts.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if opts.batch_size % opts.num_generations:
        parser.error("--batch-size must be a multiple of --num-generations")
    return opts, sizes


def main(argv=None) -> int:
    opts, sizes = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(SEED)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient_checkpointing renames
    tokenizer = padded_word_tokenizer(TASK_WORDS, sizes["vocab_size"])
    sizes["vocab_size"] = len(tokenizer)
    modes = ["single", "multi"] if opts.mode == "both" else [opts.mode]
    results = []
    for mode in modes:
        print(f"[{time.strftime('%H:%M:%S')}] {mode}: {opts.warmup} + {opts.steps} steps per arm ...", flush=True)
        result = run_mode(mode, opts, sizes, tokenizer)
        results.append(result)
    summaries = [summarize(r, opts.warmup) for r in results]
    print_report(summaries, opts, sizes)
    if opts.csv:
        write_csv(opts.csv, results, opts.warmup)
    if opts.plot:
        write_plot(opts.plot, results, opts.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
