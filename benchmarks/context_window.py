"""Full context against a bounded window (``env_context="full"`` vs ``"window"``): one real AEM training step of
``AEMGRPOTrainer(env=...)`` for episodes of 10, 30 and 50 turns with long observations.

    python benchmarks/context_window.py                                  # default run (tens of minutes, 2-core CPU)
    python benchmarks/context_window.py --quick                          # smoke run
    python benchmarks/context_window.py --json benchmarks/results/context_window.json --plot benchmarks/results/context_window.png

What runs: for every number of turns and both modes (full, and window with ``env_history_turns`` = ``--history``,
chat format, so that every answer steps the environment), one training step (``max_steps=1``: the rollout of ``--episodes`` episodes, scoring, AEM, the loss,
backward and the optimizer step) of a Qwen2 built in code (random weights, nothing downloaded) on
``benchmarks/memory.py``'s ToolLogEnv: every episode lasts exactly the given number of turns, every observation is
``--obs-tokens`` words, every turn generates exactly ``--tokens-per-turn`` tokens (end-of-turn tokens suppressed),
so both modes play the same shape of episode. Window mode bounds each forward pass to ``--rows-per-forward`` rows.

Measured, for each (turns, mode), in one process and one run:

* tokens through the model in the rollout (every generate forward: batch x width, prefills and decoding steps) and
  in the training step's loss (its forward over the training rows, batch x width, padding included);
* peak tensor memory of the whole step (``benchmarks/memory_plan.py``'s ``PeakMemory``: every tensor storage alive,
  weights, gradients and Adam's states included; a separate, untimed step);
* wall time of the step (``--repeats`` steps, modes alternating; median).
"""

from __future__ import annotations

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _offline  # noqa: F401  (the offline environment, before transformers is imported)
import torch  # noqa: E402
import transformers  # noqa: E402
from _common import (  # noqa: E402
    add_size_options,
    cpu_model,
    padded_word_tokenizer,
    resolve_sizes,
    special_token_ids,
    write_json,
)
from datasets import Dataset  # noqa: E402
from kv_reuse import build  # noqa: E402
from memory import TASK_WORDS, ToolLogEnv  # noqa: E402
from memory_plan import tracked  # noqa: E402

import trl_aem  # noqa: E402
from trl_aem import AEMGRPOConfig, AEMGRPOTrainer  # noqa: E402

DEFAULTS = dict(hidden_size=128, layers=2, heads=2, kv_heads=1, vocab_size=2048, episodes=4, num_generations=4,
                tokens_per_turn=8, obs_tokens=40, history=2, rows_per_forward=16, repeats=1)
QUICK = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, vocab_size=512, episodes=4, num_generations=4,
             tokens_per_turn=4, obs_tokens=20, history=2, rows_per_forward=8, repeats=1)
TURNS, QUICK_TURNS = (10, 30, 50), (3, 6)
PROMPT = [{"role": "user", "content": "list entries matching even ."}]


class Counting:
    """Counts batch x width of every forward of the model, split into rollout (no grad) and loss (grad) passes."""

    def __init__(self, model):
        self.rollout = self.loss = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            if torch.is_grad_enabled():
                self.loss += ids.numel()
            elif module.training is not None:
                self.rollout += ids.numel()


def one_step(opts, tokenizer, turns: int, mode: str, trace: bool = False) -> dict:
    """One training step in ``mode``; returns its tokens, seconds and (with ``trace``) peak tensor bytes."""
    _, model = build(opts)  # the same seeded Qwen2 for every setting (kv_reuse.py's)
    words = max(1, len(tokenizer) - 64)
    # full: the whole trajectory is one completion; window: one turn per row
    full_length = turns * (opts.tokens_per_turn + opts.obs_tokens + 16)
    window = mode == "window"
    args = AEMGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="context_window_"), per_device_train_batch_size=opts.episodes,
        num_generations=opts.num_generations, max_completion_length=opts.tokens_per_turn if window else full_length,
        max_steps=1, learning_rate=1e-5, bf16=False, use_cpu=True, report_to="none", logging_steps=1,
        save_strategy="no", seed=0, disable_tqdm=True, aem_plots=False, dataloader_num_workers=0,
        generation_kwargs={"suppress_tokens": special_token_ids(tokenizer)}, env_max_turns=turns,
        env_max_new_tokens_per_turn=opts.tokens_per_turn, env_num_workers=1, env_timeout=None,
        env_context=mode, env_history_turns=opts.history, env_prompt_format="chat",
        env_rows_per_forward=opts.rows_per_forward if window else None, loss_type="dapo",
    )
    dataset = Dataset.from_list([{"prompt": PROMPT, "seed": 1000 + i} for i in range(opts.episodes)])
    trainer = AEMGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             env=lambda: ToolLogEnv(turns=turns, obs_tokens=opts.obs_tokens, vocab_words=words))
    counter = Counting(model)
    tracer = tracked(model) if trace else None
    start = time.perf_counter()
    if tracer is not None:
        with tracer:
            trainer.train()
    else:
        trainer.train()
    seconds = time.perf_counter() - start
    counter.handle.remove()
    log = next(entry for entry in trainer.state.log_history if "env/turns_mean" in entry)
    assert log["env/turns_mean"] == turns, log  # every episode played every turn
    return {"seconds": seconds, "rollout_tokens": counter.rollout, "loss_tokens": counter.loss,
            "rows": int(round(log.get("env/segments_per_episode", 1.0) * opts.episodes)),
            "peak_tensor_bytes": tracer.peak if tracer is not None else None}


def plot(result: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for ax, (key, title, scale) in zip(axes, (("peak_tensor_bytes", "peak tensor memory (MiB)", 2 ** -20),
                                              ("rollout_tokens", "tokens through the model, rollout", 1.0),
                                              ("median_seconds", "step time (s)", 1.0))):
        for mode in ("full", "window"):
            turns = [int(t) for t in result["runs"]]
            ax.plot(turns, [result["runs"][str(t)][mode][key] * scale for t in turns], marker="o", label=mode)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("turns per episode")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.16, top=0.9, wspace=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_options(parser, DEFAULTS, QUICK)
    parser.add_argument("--turns", type=int, nargs="+", help=f"default {TURNS} (quick {QUICK_TURNS})")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of memory, tokens and time against turns")
    opts = parser.parse_args(argv)
    resolve_sizes(parser, opts, DEFAULTS, QUICK, minimum={"history": 0})
    opts.turns = opts.turns or list(QUICK_TURNS if opts.quick else TURNS)
    transformers.logging.set_verbosity_error()
    tokenizer = padded_word_tokenizer(TASK_WORDS, opts.vocab_size)
    print(f"Qwen2 hidden {opts.hidden_size}, {opts.layers} layers, vocab {len(tokenizer)}; {opts.episodes} episodes "
          f"(G={opts.num_generations}) x turns {opts.turns} x {opts.tokens_per_turn} tokens, {opts.obs_tokens}-word "
          f"observations; window k={opts.history}, rows per forward {opts.rows_per_forward}; {cpu_model()}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    runs = {}
    for turns in opts.turns:
        runs[str(turns)] = {}
        times = {"full": [], "window": []}
        measured = {}
        for repeat in range(opts.repeats):
            for mode in ("full", "window"):
                measured[mode] = one_step(opts, tokenizer, turns, mode)
                times[mode].append(measured[mode]["seconds"])
                print(f"  {turns} turns, {mode:<6} repeat {repeat + 1}: {measured[mode]['seconds']:.1f} s", flush=True)
        for mode in ("full", "window"):
            traced = one_step(opts, tokenizer, turns, mode, trace=True)
            runs[str(turns)][mode] = {**measured[mode], "seconds": times[mode],
                                      "median_seconds": statistics.median(times[mode]),
                                      "peak_tensor_bytes": traced["peak_tensor_bytes"]}
    result = {"settings": {**{k: getattr(opts, k) for k in DEFAULTS}, "turns": opts.turns},
              "hardware": f"{cpu_model()}, {os.cpu_count()} CPUs", "torch_threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl_aem": getattr(trl_aem, "__version__", "dev"), "python": platform.python_version()},
              "runs": runs}
    print()
    print(f"{'turns':>5}  {'mode':<6}  {'rows':>5}  {'rollout tokens':>14}  {'loss tokens':>11}  {'peak MiB':>9}  "
          f"{'step s':>7}")
    for turns, modes in runs.items():
        for mode, run in modes.items():
            print(f"{turns:>5}  {mode:<6}  {run['rows']:>5}  {run['rollout_tokens']:>14,}  {run['loss_tokens']:>11,}  "
                  f"{run['peak_tensor_bytes'] / 2**20:>9.1f}  {run['median_seconds']:>7.1f}")
    if opts.json:
        write_json(opts.json, result)
    if opts.plot:
        plot(result, opts.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
