"""Pieces the benchmark scripts share: the word-parity task, the padded word tokenizer, the special tokens to suppress
so every completion has a fixed length, the CPU's name, CSV writing, the exact permutation tests and a per-step clock.
Imported by the scripts in this folder."""

from __future__ import annotations

import concurrent.futures
import csv
import itertools
import json
import os
import platform
import statistics

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


def benchmark_config_args(opts, output_dir: str, tokenizer, seed: int, completion_length: int,
                          device: str = "cpu") -> dict:
    """GRPOConfig keyword arguments both benchmarks time with: ``opts.warmup + opts.steps`` silent steps of
    ``opts.batch_size`` completions (``opts.num_generations`` per group) of fixed length (special tokens suppressed),
    no logging, saving or tracking; bf16 on CUDA, float32 on the CPU."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=opts.batch_size,
        num_generations=opts.num_generations,
        max_completion_length=completion_length,
        max_steps=opts.warmup + opts.steps,
        learning_rate=1e-5,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        generation_kwargs={"suppress_tokens": special_token_ids(tokenizer)},
    )


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


def cpu_label() -> str:
    """The CPU's model name and this machine's core count, as the learning benchmarks record it."""
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def write_csv(path: str, rows: list[dict]) -> None:
    """Write dict rows to ``path``; the columns are the union of their keys, in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def permutation_p_value(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation test of equal means (all relabelings of the pooled values; Fisher-Pitman)."""
    pooled = list(a) + list(b)
    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    count = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(a)):
        picked = set(chosen)
        first = [pooled[i] for i in chosen]
        second = [pooled[i] for i in range(len(pooled)) if i not in picked]
        total += 1
        count += abs(statistics.fmean(first) - statistics.fmean(second)) >= observed - 1e-12
    return count / total


def paired_sign_flip_p_value(a: list[float], b: list[float]) -> float:
    """Exact two-sided paired permutation test: all 2^n sign flips of the per-pair differences ``a[i] - b[i]``."""
    diffs = [x - y for x, y in zip(a, b)]
    observed = abs(statistics.fmean(diffs))
    count = total = 0
    for signs in itertools.product((1, -1), repeat=len(diffs)):
        total += 1
        count += abs(statistics.fmean(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12
    return count / total


def write_json(path: str, data) -> None:
    """Write ``data`` as indented JSON to ``path``, creating its folder; print where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
    print(f"written to {path}")


def add_size_options(parser, defaults: dict, quick: dict) -> None:
    """``--quick``, one integer option per size in ``defaults`` (``--hidden-size`` ...), ``--threads`` and ``--json``."""
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    for key, value in defaults.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, help=f"default {value} (quick {quick[key]})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--json", metavar="PATH", help="write the results to this JSON file")


def resolve_sizes(parser, opts, defaults: dict, quick: dict, minimum: dict | None = None) -> None:
    """Fill the sizes left unset from ``quick`` or ``defaults``, check each against its minimum (1 unless given in
    ``minimum``), and apply ``--threads``."""
    import torch

    for key, value in (quick if opts.quick else defaults).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
        least = (minimum or {}).get(key, 1)
        if getattr(opts, key) < least:
            parser.error(f"--{key.replace('_', '-')} must be >= {least}")
    if opts.threads:
        torch.set_num_threads(opts.threads)


def step_clock():
    """A ``TrainerCallback`` whose ``times`` maps each optimizer step number to its wall time in seconds (generation,
    scoring, loss, backward and the optimizer step), for the learning benchmarks' per-step logs."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time of every optimizer step."""

        def __init__(self):
            self.times: dict[int, float] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            """Start the step's clock."""
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            """Stop it (right after the optimizer step) and record the time under the step number."""
            self.times[state.global_step] = time.perf_counter() - self.start

    return StepClock()


def train_and_log(model, tokenizer, config, env_id: str, num_rows: int, columns: dict, identity: dict):
    """Train ``AEMGRPOTrainer`` on ``env_id`` for ``num_rows`` dataset rows with a :func:`step_clock`; return the
    trainer, one row per step that generated (``identity``, ``columns`` ``{csv column: logged key}`` taken from the
    logs, and ``step_time_s``; with ``num_iterations > 1`` only generating steps log env metrics) and the total time."""
    from trl_aem import AEMGRPOTrainer, make_env_dataset

    clock = step_clock()
    trainer = AEMGRPOTrainer(model=model, args=config, processing_class=tokenizer, env=env_id,
                             train_dataset=make_env_dataset(num_rows), callbacks=[clock])
    trainer.train()
    rows = []
    for entry in trainer.state.log_history:
        if "env/success_rate" not in entry:
            continue
        row = {**identity, "step": entry["step"]}
        row.update({column: entry.get(key, float("nan")) for column, key in columns.items()})
        row["step_time_s"] = clock.times.get(entry["step"], float("nan"))
        rows.append(row)
    return trainer, rows, sum(clock.times.values())


class InlineExecutor(concurrent.futures.Executor):
    """An executor that runs each submitted call at once, in this process, and returns its finished future: what
    ``--workers 1`` uses instead of a pool, so a small run does not pay a second interpreter's imports."""

    def submit(self, fn, /, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` now; the returned future holds its result or its exception."""
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a pool would
            future.set_exception(exc)
        return future


def job_pool(workers: int) -> concurrent.futures.Executor:
    """The executor of the learning benchmarks' jobs: ``workers`` spawned processes (each job imports torch afresh
    and sets its own thread count), or :class:`InlineExecutor` for ``workers <= 1``."""
    if workers <= 1:
        return InlineExecutor()
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
