"""Multi-turn rollouts with and without ``env_reuse_kv_cache``: time, tokens encoded, peak tensor memory, and a check
that greedy trajectories are the same.

    python benchmarks/kv_reuse.py                                  # default run (a few minutes on a 2-core CPU)
    python benchmarks/kv_reuse.py --quick                          # smoke run
    python benchmarks/kv_reuse.py --json benchmarks/results/kv_reuse.json

What runs: :class:`trl_aem.EnvRunner` (the rollout loop ``AEMGRPOTrainer(env=...)`` uses) over ``--episodes``
episodes of ``benchmarks/memory.py``'s ToolLogEnv (every episode lasts ``--turns`` turns, every observation is
``--obs-tokens`` words), a Qwen2 built in code (random weights, nothing downloaded), sampling with EOS suppressed so
every turn generates exactly ``--tokens-per-turn`` tokens. Generation goes through
``trl_aem.generation.make_hf_generate_fn`` with ``reuse_kv_cache`` off (every turn re-encodes each episode's whole
context) and on (each turn encodes only what was added since the episode's previous turn).

Measured, for each mode:

* wall time of a whole rollout, ``--repeats`` times, the modes alternating (off, on, off, on, ...); median and ratio;
* tokens encoded: the sum over forward passes of batch x width (prefills and decoding steps);
* peak tensor memory of the rollout (a separate, untimed run under ``benchmarks/memory_plan.py``'s ``PeakMemory``
  which counts every tensor storage alive, model weights included);
* greedy equivalence: with ``do_sample=False`` both modes must produce the same token ids for every episode.
"""

from __future__ import annotations

import _offline  # noqa: F401  (the offline environment, before transformers is imported)

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from trl_aem import EnvRunner, ObservationRenderer, RolloutLimits  # noqa: E402
from trl_aem.generation import make_hf_generate_fn  # noqa: E402

from _common import (  # noqa: E402
    add_size_options, cpu_model, padded_word_tokenizer, resolve_sizes, special_token_ids, write_json,
)
from memory import TASK_WORDS, ToolLogEnv  # noqa: E402
from memory_plan import tracked  # noqa: E402

DEFAULTS = dict(hidden_size=512, layers=8, heads=8, kv_heads=2, vocab_size=4096, episodes=16, turns=12,
                tokens_per_turn=16, obs_tokens=100, repeats=3)
QUICK = dict(hidden_size=128, layers=2, heads=4, kv_heads=2, vocab_size=1024, episodes=4, turns=4, tokens_per_turn=8,
             obs_tokens=40, repeats=1)


def build(opts):
    """Tokenizer and model (fixed seed) for the run."""
    tokenizer = padded_word_tokenizer(TASK_WORDS, opts.vocab_size)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=opts.hidden_size,
                         intermediate_size=opts.hidden_size * 11 // 4, num_hidden_layers=opts.layers,
                         num_attention_heads=opts.heads, num_key_value_heads=opts.kv_heads,
                         max_position_embeddings=8192, tie_word_embeddings=True, use_sliding_window=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    return tokenizer, model


def rollout(opts, tokenizer, model, reuse: bool, sample: bool, seed: int = 0):
    """One rollout of ``opts.episodes`` episodes; returns (episodes, seconds, tokens encoded)."""
    encoded = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: encoded.append(kwargs["input_ids"].numel()), with_kwargs=True)
    config = GenerationConfig(do_sample=sample, temperature=1.0, top_k=None, top_p=None,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              suppress_tokens=special_token_ids(tokenizer))
    generate = make_hf_generate_fn(model, tokenizer.pad_token_id, tokenizer.eos_token_id, config,
                                   reuse_kv_cache=reuse)
    words = max(1, len(tokenizer) - 64)
    completion = opts.turns * opts.tokens_per_turn + opts.turns * (opts.obs_tokens + 16)
    runner = EnvRunner(lambda: ToolLogEnv(turns=opts.turns, obs_tokens=opts.obs_tokens, vocab_words=words),
                       ObservationRenderer(tokenizer), RolloutLimits(opts.turns, opts.tokens_per_turn, completion),
                       num_workers=1, timeout=None)
    rows = [{"seed": 1000 + i} for i in range(opts.episodes)]
    prompts = [[{"role": "user", "content": "list entries matching even ."}]] * opts.episodes
    torch.manual_seed(seed)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            episodes = runner.run(rows, prompts, generate)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return episodes, seconds, sum(encoded)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_options(parser, DEFAULTS, QUICK)
    opts = parser.parse_args(argv)
    resolve_sizes(parser, opts, DEFAULTS, QUICK)
    transformers.logging.set_verbosity_error()
    tokenizer, model = build(opts)
    print(f"Qwen2 hidden {opts.hidden_size}, {opts.layers} layers, vocab {len(tokenizer)}; {opts.episodes} episodes x "
          f"{opts.turns} turns x {opts.tokens_per_turn} tokens, {opts.obs_tokens}-word observations; "
          f"{cpu_model()}, torch threads {torch.get_num_threads()}", flush=True)

    greedy = {reuse: rollout(opts, tokenizer, model, reuse, sample=False)[0] for reuse in (False, True)}
    same = all(a.completion_ids == b.completion_ids and a.prompt_ids == b.prompt_ids
               for a, b in zip(greedy[False], greedy[True]))
    rollout(opts, tokenizer, model, False, sample=True)  # warm-up
    times = {False: [], True: []}
    encoded, lengths = {}, {}
    for repeat in range(opts.repeats):
        for reuse in (False, True):
            episodes, seconds, tokens = rollout(opts, tokenizer, model, reuse, sample=True, seed=repeat)
            times[reuse].append(seconds)
            encoded[reuse] = tokens
            lengths[reuse] = statistics.fmean(len(e.prompt_ids) + len(e.completion_ids) for e in episodes)
            print(f"  repeat {repeat + 1}, reuse {'on ' if reuse else 'off'}: {seconds:.2f} s", flush=True)
    peaks = {}
    for reuse in (False, True):
        tracer = tracked(model)
        with tracer:
            rollout(opts, tokenizer, model, reuse, sample=True)
        peaks[reuse] = tracer.peak

    result = {
        "settings": {k: getattr(opts, k) for k in DEFAULTS}, "hardware": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(), "versions": {"torch": torch.__version__,
                                                               "transformers": transformers.__version__,
                                                               "python": platform.python_version()},
        "greedy_same_tokens": same,
        "modes": {("reuse" if reuse else "re-encode"): {
            "seconds": times[reuse], "median_seconds": statistics.median(times[reuse]),
            "tokens_encoded": encoded[reuse], "mean_trajectory_tokens": lengths[reuse],
            "peak_tensor_bytes": peaks[reuse]} for reuse in (False, True)},
    }
    off, on = result["modes"]["re-encode"], result["modes"]["reuse"]
    result["speedup"] = off["median_seconds"] / on["median_seconds"]
    result["encoded_ratio"] = off["tokens_encoded"] / on["tokens_encoded"]
    result["peak_ratio"] = on["peak_tensor_bytes"] / off["peak_tensor_bytes"]
    print()
    print(f"{'mode':<10}  {'median s':>9}  {'tokens encoded':>14}  {'peak tensors MiB':>16}")
    for name, mode in result["modes"].items():
        print(f"{name:<10}  {mode['median_seconds']:>9.2f}  {mode['tokens_encoded']:>14,}  "
              f"{mode['peak_tensor_bytes'] / 2**20:>16.1f}")
    print(f"speed-up (re-encode / reuse time, medians of {opts.repeats}): {result['speedup']:.2f}x; tokens encoded "
          f"{result['encoded_ratio']:.1f}x fewer; peak tensor memory reuse/re-encode {result['peak_ratio']:.2f}; "
          f"greedy trajectories identical: {same}")
    if opts.json:
        write_json(opts.json, result)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
