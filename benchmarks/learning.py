"""Does AEM beat its base method here? GRPO, DAPO and GSPO with and without AEM, plus AEM's ablations, on CPU.

    python benchmarks/learning.py --quick                              # smoke run, a few minutes
    python benchmarks/learning.py --out benchmarks/results/learning    # the real run (about an hour on 2 cores)

Task: the built-in multi-turn ``trl_aem/CodeBreaker-v0`` at its easiest setting (one secret symbol out of 3, at
most 3 guesses, feedback after each wrong guess; the episode reward is 10 for success, -0.1 per invalid action),
the same preset as ``examples/cpu_demo.py``. The model is a tiny Qwen2 built in code with a word-level tokenizer
(``trl_aem.tiny``); nothing is downloaded.

Protocol (identical for every arm):

* Per seed: build the model (weights from the seed), then a short supervised warm start with TRL's SFTTrainer on
  the scripted expert's trajectories (``--sft-steps``), stopped far short of expert level. Every arm of that seed
  starts from these same weights.
* RL: ``--steps`` optimizer steps, ``--tasks-per-step`` tasks x G = ``--num-generations`` episodes per step,
  rollout temperature 1, constant learning rate, ``beta = 0``, ``scale_rewards="batch"``, and
  ``--num-iterations`` updates per generated batch (default 2, so that the importance ratios and clipping
  of the three base methods actually differ: with one on-policy update the ratio is always 1 and GSPO's
  gradient equals GRPO's). Same seed, same task order and same budget in every arm.
* Base methods (TRL's own options): GRPO = ``loss_type="grpo"``; DAPO = ``loss_type="dapo"``,
  ``epsilon_high=0.28`` (token-level normalisation and clip-higher; TRL has no dynamic sampling);
  GSPO = ``importance_sampling_level="sequence"``, ``epsilon=3e-4``, ``epsilon_high=4e-4`` (the GSPO paper's).
* AEM arms: the same with ``use_aem=True, aem_lambda=1, aem_min_entropy_range=0.1`` (the paper's settings).
  Ablations on AEM-GRPO: ``aem_direction="reverse"`` and ``"shuffle"``, ``aem_scope="trajectory"`` and
  ``"batch"``.
* The base arms run ``AEMGRPOTrainer`` with ``aem_lambda=0``, which reproduces ``GRPOTrainer``'s losses, gradients
  and weights bit for bit (``tests/test_trainer.py``) but still logs the same entropy and advantage statistics
  (alpha is exactly 1), so every arm's CSV has the same columns.
* Evaluation: after training, the same ``--eval-tasks`` held-out tasks (seeds 100000...) for every arm and seed,
  sampled at temperature 1 (the policy RL optimises, with a fixed sampling seed) and greedy.

Outputs in ``--out``: ``steps.csv`` (per arm, seed and step: training success rate, return, TRL's policy entropy,
span entropy, alpha mean/std/min/max, gated fraction, negative-advantage fraction, step time), ``final.csv`` (per
arm and seed: warm-start and final success), ``summary.md`` (final success mean +- std over seeds, and an exact
two-sided permutation tests of each AEM arm against its base method, unpaired and paired by seed), ``success.png`` and ``entropy.png`` (mean
over seeds with a +-1 std band), ``rollout_speed.txt`` (batched multi-turn rollouts against one episode at a time,
turns per second, from one run) and ``run.json`` (the command, settings, versions, CPU and wall time).
AEM's step-time overhead (single- and multi-turn) is measured by ``benchmarks/overhead.py``.
``--report-only DIR`` rebuilds summary.md and the plots from a finished run's files without training.

Runs are spread over ``--workers`` processes with one torch thread each; results do not depend on the number of
workers (each run seeds itself).
"""

from __future__ import annotations

import os

import _offline  # noqa: E402,F401  (the offline environment, before transformers is imported)

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from trl_aem.envs import CodeBreaker  # noqa: E402

from _common import cpu_label, job_pool, paired_sign_flip_p_value, permutation_p_value, write_csv  # noqa: E402

SYSTEM_PROMPT = "you are a helpful agent ."


@dataclass(frozen=True)
class Task:
    """What the jobs train and evaluate on: the env, its rollout limits, the warm start's expert seeds and the
    held-out evaluation (seeds ``eval_seed_offset ...``, env kwargs updated by ``eval_env_kwargs``). The tokenizer is
    the env's word vocabulary (``trl_aem.tiny.build_agent_tokenizer``)."""

    name: str
    env_id: str
    env_kwargs: dict
    max_turns: int
    tokens_per_turn: int
    max_completion_length: int = 64
    expert_seeds: range = range(10_000, 10_200)
    eval_seed_offset: int = 100_000
    eval_env_kwargs: dict = field(default_factory=dict)

    @property
    def eval_kwargs(self) -> dict:
        """The env kwargs of the evaluation games: ``env_kwargs`` updated by ``eval_env_kwargs``."""
        return {**self.env_kwargs, **self.eval_env_kwargs}


#: The default task: CodeBreaker at the CPU demo's setting (one symbol out of 3, 3 guesses).
CODEBREAKER = Task("codebreaker", "trl_aem/CodeBreaker-v0", dict(CodeBreaker.EASIEST), max_turns=3, tokens_per_turn=4)

#: TRL options of each base method.
BASES = {
    "GRPO": {"loss_type": "grpo"},
    "DAPO": {"loss_type": "dapo", "epsilon_high": 0.28},
    "GSPO": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
}
AEM_ON = {"use_aem": True, "aem_lambda": 1.0, "aem_min_entropy_range": 0.1}
AEM_OFF = {"use_aem": True, "aem_lambda": 0.0}  # bit-identical to the base method; keeps the same metrics


@dataclass(frozen=True)
class Arm:
    """One training configuration: a base method and the AEM options on top of it."""

    name: str
    base: str
    aem: dict

    @property
    def is_base(self) -> bool:
        """True for the plain base method (AEM off)."""
        return self.aem.get("aem_lambda", 1.0) == 0.0


ARMS = [
    Arm("GRPO", "GRPO", AEM_OFF), Arm("AEM-GRPO", "GRPO", AEM_ON),
    Arm("DAPO", "DAPO", AEM_OFF), Arm("AEM-DAPO", "DAPO", AEM_ON),
    Arm("GSPO", "GSPO", AEM_OFF), Arm("AEM-GSPO", "GSPO", AEM_ON),
    Arm("AEM-GRPO reverse", "GRPO", {**AEM_ON, "aem_direction": "reverse"}),
    Arm("AEM-GRPO shuffle", "GRPO", {**AEM_ON, "aem_direction": "shuffle"}),
    Arm("AEM-GRPO trajectory scope", "GRPO", {**AEM_ON, "aem_scope": "trajectory"}),
    Arm("AEM-GRPO batch scope", "GRPO", {**AEM_ON, "aem_scope": "batch"}),
]
#: Log keys copied into steps.csv (column name -> key in TRL's log history).
STEP_COLUMNS = {
    "success_rate": "env/success_rate", "return_mean": "env/return_mean", "policy_entropy": "entropy",
    "span_entropy": "aem/response_entropy_mean", "alpha_mean": "aem/alpha_mean", "alpha_std": "aem/alpha_std",
    "alpha_min": "aem/alpha_min", "alpha_max": "aem/alpha_max", "gated_frac": "aem/gated_frac",
    "neg_adv_frac": "aem/neg_adv_frac", "reward_std": "reward_std",
}

DEFAULT = dict(seeds=5, steps=40, tasks_per_step=4, num_generations=8, sft_steps=8, eval_tasks=200,
               speed_episodes=64)
QUICK = dict(seeds=2, steps=3, tasks_per_step=2, num_generations=4, sft_steps=4, eval_tasks=16, speed_episodes=8)


# ------------------------------------------------------------------------------------------------ model and runs
def _tokenizer_and_model(seed: int, hidden_size: int, layers: int, task: Task = CODEBREAKER):
    from trl_aem import DEFAULT_PROMPT
    from trl_aem.tiny import build_agent_tokenizer, build_tiny_qwen2

    tokenizer = build_agent_tokenizer(task.env_id, task.env_kwargs, DEFAULT_PROMPT, SYSTEM_PROMPT)
    model = build_tiny_qwen2(tokenizer, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, seed=seed)
    return tokenizer, model


def _evaluate(model, tokenizer, num_tasks: int, seed: int, greedy: bool, task: Task = CODEBREAKER) -> float:
    from trl_aem import evaluate

    torch.manual_seed(seed)  # same sampling noise for every arm of a seed
    result = evaluate(task.env_id, "model", model=model, tokenizer=tokenizer, num_tasks=num_tasks,
                      env_kwargs=task.eval_kwargs, seed_offset=task.eval_seed_offset,
                      system_prompt=SYSTEM_PROMPT, greedy=greedy, temperature=1.0, max_turns=task.max_turns,
                      max_new_tokens_per_turn=task.tokens_per_turn)
    return result.success_rate


def warm_start_job(seed: int, opts: dict, path: str, task: Task = CODEBREAKER) -> dict:
    """Build the seed's model, warm-start it on expert trajectories, save its weights to ``path``, evaluate it."""
    torch.set_num_threads(1)
    from transformers import set_seed

    from trl_aem import expert_sft_dataset, warm_start

    set_seed(seed)
    tokenizer, model = _tokenizer_and_model(seed, opts["hidden_size"], opts["layers"], task)
    data = expert_sft_dataset(task.env_id, task.expert_seeds, env_kwargs=task.env_kwargs, system_prompt=SYSTEM_PROMPT)
    with tempfile.TemporaryDirectory() as tmp:
        model = warm_start(model, tokenizer, data, max_steps=opts["sft_steps"], output_dir=tmp, seed=seed)
    torch.save(model.state_dict(), path)
    return {"seed": seed,
            "warm_start_success": _evaluate(model, tokenizer, opts["eval_tasks"], seed, greedy=False, task=task),
            "warm_start_greedy": _evaluate(model, tokenizer, opts["eval_tasks"], seed, greedy=True, task=task)}


def train_job(arm: Arm, seed: int, opts: dict, weights: str, task: Task = CODEBREAKER) -> dict:
    """Train one arm from the seed's warm-start weights; return per-step logs and final evaluation."""
    torch.set_num_threads(1)
    from transformers import set_seed

    from _common import train_and_log

    from trl_aem import AEMGRPOConfig

    tokenizer, model = _tokenizer_and_model(seed, opts["hidden_size"], opts["layers"], task)
    model.load_state_dict(torch.load(weights))
    set_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = AEMGRPOConfig(
            output_dir=tmp, max_steps=opts["steps"], seed=seed,
            per_device_train_batch_size=opts["tasks_per_step"] * opts["num_generations"],
            num_generations=opts["num_generations"], num_iterations=opts["num_iterations"],
            learning_rate=opts["learning_rate"], lr_scheduler_type="constant", beta=0.0, temperature=1.0,
            scale_rewards="batch", max_completion_length=task.max_completion_length, env_max_turns=task.max_turns,
            env_max_new_tokens_per_turn=task.tokens_per_turn, env_system_prompt=SYSTEM_PROMPT,
            env_kwargs=task.env_kwargs,
            logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True, disable_tqdm=True,
            **BASES[arm.base], **arm.aem,
        )
        identity = {"arm": arm.name, "base": arm.base, "aem": int(not arm.is_base), "seed": seed}
        trainer, rows, train_time = train_and_log(
            model, tokenizer, config, task.env_id, opts["steps"] * opts["tasks_per_step"], STEP_COLUMNS, identity)
    model = trainer.model
    final = {**identity,
             "final_success": _evaluate(model, tokenizer, opts["eval_tasks"], seed, greedy=False, task=task),
             "final_greedy": _evaluate(model, tokenizer, opts["eval_tasks"], seed, greedy=True, task=task),
             "train_time_s": train_time}
    return {"steps": rows, "final": final}


def rollout_speed(opts: dict, weights: str) -> dict:
    """Turns per second of batched rollouts (all episodes, one generate call per turn) against one at a time."""
    from transformers import GenerationConfig

    from trl_aem import DEFAULT_PROMPT, EnvRunner, ObservationRenderer, RolloutLimits
    from trl_aem.generation import make_hf_generate_fn
    from trl_aem.rollout import make_env_factory

    tokenizer, model = _tokenizer_and_model(0, opts["hidden_size"], opts["layers"])
    model.load_state_dict(torch.load(weights))
    model.eval()
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=None, top_k=None,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    generate = make_hf_generate_fn(model, tokenizer.pad_token_id, tokenizer.eos_token_id, config, record_entropy=True)
    task = CODEBREAKER
    runner = EnvRunner(make_env_factory(task.env_id, task.env_kwargs), ObservationRenderer(tokenizer, SYSTEM_PROMPT),
                       RolloutLimits(task.max_turns, task.tokens_per_turn, task.max_completion_length))
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]
    rows = [{"prompt": prompt, "seed": 50_000 + i} for i in range(opts["speed_episodes"])]
    result = {"episodes": len(rows), "threads": torch.get_num_threads()}
    with torch.no_grad():
        runner.run(rows[:2], [prompt] * 2, generate)  # warm-up
        for mode in ("batched", "one_at_a_time"):
            torch.manual_seed(0)
            start = time.perf_counter()
            if mode == "batched":
                episodes = runner.run(rows, [prompt] * len(rows), generate)
            else:
                episodes = [runner.run([row], [prompt], generate)[0] for row in rows]
            seconds = time.perf_counter() - start
            turns = sum(e.num_turns for e in episodes)
            result[mode] = {"seconds": seconds, "turns": turns, "turns_per_s": turns / seconds}
    result["ratio"] = result["batched"]["turns_per_s"] / result["one_at_a_time"]["turns_per_s"]
    return result


# ------------------------------------------------------------------------------------------------ statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(finals: list[dict], warm: list[dict], metric: str = "final_success") -> str:
    """Markdown table: final success mean +- std per arm, and each AEM arm against its base method."""
    by_arm: dict[str, dict[int, float]] = {}
    for row in finals:
        by_arm.setdefault(row["arm"], {})[row["seed"]] = row[metric]
    warm_key = "warm_start_success" if metric == "final_success" else "warm_start_greedy"
    warm_values = [w[warm_key] for w in warm]
    lines = ["| arm | success (mean ± std) | vs base: difference | per-seed wins | p unpaired | p paired |",
             "|---|---|---|---|---|---|",
             "| warm start (before RL) | {:.1%} ± {:.1%} | | | | |".format(*mean_std(warm_values))]
    for arm in ARMS:
        values = by_arm.get(arm.name)
        if not values:
            continue
        mean, std = mean_std(list(values.values()))
        if arm.is_base:
            lines.append(f"| {arm.name} | {mean:.1%} ± {std:.1%} | (base) | | | |")
            continue
        base = by_arm.get(arm.base, {})
        seeds = sorted(set(values) & set(base))
        if not seeds:
            lines.append(f"| {arm.name} | {mean:.1%} ± {std:.1%} | | | | |")
            continue
        ours, theirs = [values[s] for s in seeds], [base[s] for s in seeds]
        wins = sum(x > y for x, y in zip(ours, theirs))
        diff = statistics.fmean(ours) - statistics.fmean(theirs)
        lines.append(f"| {arm.name} | {mean:.1%} ± {std:.1%} | {diff:+.1%} vs {arm.base} | {wins}/{len(seeds)} | "
                     f"{permutation_p_value(ours, theirs):.3f} | {paired_sign_flip_p_value(ours, theirs):.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ outputs
def _curves(step_rows: list[dict], column: str, smooth: int) -> dict[str, tuple[list, list, list]]:
    """Per arm: steps, mean over seeds and std over seeds of ``column`` (trailing moving average of ``smooth``)."""
    import numpy as np

    curves = {}
    for arm in ARMS:
        by_seed: dict[int, list[float]] = {}
        steps: list[int] = []
        for row in step_rows:
            if row["arm"] == arm.name:
                by_seed.setdefault(row["seed"], []).append(float(row[column]))
                if row["seed"] == step_rows[0]["seed"]:
                    steps.append(int(row["step"]))
        if not by_seed:
            continue
        length = min(len(v) for v in by_seed.values())
        values = np.array([v[:length] for v in by_seed.values()], dtype=float)
        if smooth > 1:
            kernel = np.ones(smooth)
            padded = np.concatenate([np.repeat(values[:, :1], smooth - 1, axis=1), values], axis=1)
            values = np.stack([np.convolve(v, kernel, mode="valid") / smooth for v in padded])
        curves[arm.name] = (steps[:length], values.mean(axis=0), values.std(axis=0))
    return curves


def write_plots(out: str, step_rows: list[dict], smooth: int) -> list[str]:
    """success.png and entropy.png: mean over seeds with a +-1 std band; base methods and ablations side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Base methods vs AEM", [a for a in ARMS if a.name in {"GRPO", "AEM-GRPO", "DAPO", "AEM-DAPO",
                                                                          "GSPO", "AEM-GSPO"}]),
              ("AEM-GRPO ablations", [a for a in ARMS if a.base == "GRPO"])]
    colors = {"GRPO": "tab:blue", "DAPO": "tab:orange", "GSPO": "tab:green"}
    ablation_colors = ["tab:gray", "tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
    paths = []
    for column, ylabel, name in (("success_rate", f"training success (moving mean of {smooth} rollouts)",
                                  "success.png"),
                                 ("span_entropy", f"span entropy at generation (moving mean of {smooth})",
                                  "entropy.png")):
        curves = _curves(step_rows, column, smooth)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for ax, (title, arms) in zip(axes, panels):
            for i, arm in enumerate(arms):
                if arm.name not in curves:
                    continue
                steps, mean, std = curves[arm.name]
                if title.startswith("Base"):
                    color, style = colors[arm.base], ("-" if not arm.is_base else "--")
                else:
                    color, style = ablation_colors[i % len(ablation_colors)], ("--" if arm.is_base else "-")
                ax.plot(steps, mean, style, color=color, label=arm.name)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.12)
            ax.set_title(title)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel(ylabel)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def entropy_reading(step_rows: list[dict]) -> str:
    """Mean span entropy over seeds in the first, middle and last third of training, per arm (text table)."""
    lines = ["| arm | span entropy, steps 1/3 | 2/3 | 3/3 | TRL policy entropy, first -> last third |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        rows = [r for r in step_rows if r["arm"] == arm.name]
        if not rows:
            continue
        last = max(r["step"] for r in rows)
        thirds = [[r for r in rows if (k * last) / 3 < r["step"] <= ((k + 1) * last) / 3] for k in range(3)]
        span = [statistics.fmean(float(r["span_entropy"]) for r in t) if t else math.nan for t in thirds]
        policy = [statistics.fmean(float(r["policy_entropy"]) for r in t) if t else math.nan for t in thirds]
        lines.append(f"| {arm.name} | {span[0]:.3f} | {span[1]:.3f} | {span[2]:.3f} | "
                     f"{policy[0]:.3f} -> {policy[2]:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 3 steps, small groups")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT['seeds']})")
    parser.add_argument("--steps", type=int, default=None, help=f"RL steps per run (default {DEFAULT['steps']})")
    parser.add_argument("--tasks-per-step", type=int, default=None, help="tasks per RL step")
    parser.add_argument("--num-generations", type=int, default=None, help="episodes per task (group size G)")
    parser.add_argument("--num-iterations", type=int, default=2, help="updates per generated batch (TRL's mu)")
    parser.add_argument("--sft-steps", type=int, default=None, help="supervised warm-start steps per seed")
    parser.add_argument("--eval-tasks", type=int, default=None, help="held-out tasks in the final evaluation")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--arms", default=None,
                        help="comma-separated arm names to run (default: all): " + ", ".join(a.name for a in ARMS))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, one torch thread each (1: every job in this process)")
    parser.add_argument("--smooth", type=int, default=None, help="moving-average window of the plots")
    parser.add_argument("--report-only", metavar="DIR", default=None,
                        help="do not train: rebuild summary.md and the plots from a finished run's files in DIR")
    return parser.parse_args(argv)


def load_results(out: str) -> tuple[dict, list[dict], list[dict], list[dict], dict]:
    """Read a finished run back from ``out``: run.json, steps.csv, final.csv (with the warm start) and the speed."""
    def typed(value: str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return value

    with open(os.path.join(out, "run.json")) as handle:
        run = json.load(handle)
    rows = {}
    for name in ("steps.csv", "final.csv"):
        with open(os.path.join(out, name), newline="") as handle:
            rows[name] = [{key: typed(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    warm = {}
    for row in rows["final.csv"]:
        warm[row["seed"]] = {"seed": row["seed"], "warm_start_success": row["warm_start_success"],
                             "warm_start_greedy": row["warm_start_greedy"]}
    with open(os.path.join(out, "rollout_speed.txt")) as handle:
        speed = json.loads(handle.read().split("\n", 1)[1])
    run.setdefault("model_parameters", count_parameters(run["options"]))  # runs before it was recorded
    return run, rows["steps.csv"], rows["final.csv"], [warm[s] for s in sorted(warm)], speed


def write_report(out: str, run: dict, step_rows: list[dict], finals: list[dict], warm: list[dict],
                 speed: dict, smooth: int) -> str:
    """Write summary.md, rollout_speed.txt, success.png and entropy.png into ``out``; return the summary text."""
    opts = run["options"]
    arm_names = [a.name for a in ARMS if a.name in set(run["arms"])]
    step_time = {name: statistics.median(r["step_time_s"] for r in step_rows if r["arm"] == name)
                 for name in arm_names}
    speed_text = (f"Rollout speed ({speed['episodes']} CodeBreaker episodes, warm-start model of seed 0, "
                  f"{speed['threads']} torch thread(s)): batched {speed['batched']['turns_per_s']:.1f} turns/s "
                  f"({speed['batched']['turns']} turns in {speed['batched']['seconds']:.2f}s), one episode at a time "
                  f"{speed['one_at_a_time']['turns_per_s']:.1f} turns/s ({speed['one_at_a_time']['turns']} turns in "
                  f"{speed['one_at_a_time']['seconds']:.2f}s): ratio {speed['ratio']:.1f}x")
    summary = "\n\n".join([
        f"Command: `{run['command']}`  ",
        f"{len(arm_names)} arms x {opts['seeds']} seeds; tiny Qwen2 with {run['model_parameters'] / 1e6:.3f}M "
        f"parameters; {opts['steps']} RL steps of {opts['tasks_per_step']} tasks x G={opts['num_generations']} "
        f"episodes, num_iterations={opts['num_iterations']}, lr {opts['learning_rate']}; warm start "
        f"{opts['sft_steps']} SFT steps; final evaluation on {opts['eval_tasks']} held-out tasks.",
        "Tests against the base method: exact two-sided permutation tests of the difference in means over seeds, "
        "unpaired (all relabelings of the pooled values) and paired by seed (all sign flips of the per-seed "
        f"differences; with n seeds its smallest possible p is 2/2^n = {2 / 2 ** opts['seeds']:.4f}).",
        "Final success, sampled at temperature 1 (the policy RL optimises):",
        summary_table(finals, warm, "final_success"),
        "Final success, greedy:",
        summary_table(finals, warm, "final_greedy"),
        "Span entropy during training (mean over seeds):",
        entropy_reading(step_rows),
        "Median step time (s, includes the rollouts): "
        + ", ".join(f"{name} {value:.2f}" for name, value in step_time.items()),
        speed_text,
        f"Wall time {run['wall_time_s']:.0f}s with {run['workers']} workers on {run['cpu']}.",
    ])
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(summary + "\n")
    with open(os.path.join(out, "rollout_speed.txt"), "w") as handle:
        handle.write(speed_text + "\n" + json.dumps(speed, indent=2) + "\n")
    write_plots(out, step_rows, smooth)
    return summary


def main(argv=None) -> int:
    """Run every arm and seed (or, with ``--report-only``, reread a finished run), write the report, print it."""
    args = parse_args(argv)
    if args.report_only:
        run, step_rows, finals, warm, speed = load_results(args.report_only)
        smooth = args.smooth or (5 if run["options"]["steps"] >= 20 else 1)
        print(write_report(args.report_only, run, step_rows, finals, warm, speed, smooth))
        return 0
    preset = QUICK if args.quick else DEFAULT
    opts = {key: (getattr(args, key) if getattr(args, key, None) is not None else value)
            for key, value in preset.items()}
    opts.update(num_iterations=args.num_iterations, learning_rate=args.learning_rate, hidden_size=args.hidden_size,
                layers=args.layers)
    arms = ARMS
    if args.arms:
        wanted = [name.strip() for name in args.arms.split(",")]
        unknown = sorted(set(wanted) - {a.name for a in ARMS})
        if unknown:
            raise SystemExit(f"--arms: unknown {unknown}; allowed: {[a.name for a in ARMS]}")
        arms = [a for a in ARMS if a.name in wanted]
    out = args.out or tempfile.mkdtemp(prefix="trl_aem_learning_")
    os.makedirs(out, exist_ok=True)
    smooth = args.smooth or (5 if opts["steps"] >= 20 else 1)
    started = time.time()
    print(f"[learning] {len(arms)} arms x {opts['seeds']} seeds, {opts['steps']} RL steps of "
          f"{opts['tasks_per_step']} tasks x G={opts['num_generations']}, warm start {opts['sft_steps']} SFT steps, "
          f"eval {opts['eval_tasks']} tasks; {args.workers} workers -> {out}", flush=True)

    with tempfile.TemporaryDirectory() as weights_dir, job_pool(args.workers) as pool:
        weights = {seed: os.path.join(weights_dir, f"seed{seed}.pt") for seed in range(opts["seeds"])}
        warm = [f.result() for f in [pool.submit(warm_start_job, s, opts, weights[s]) for s in weights]]
        for w in warm:
            print(f"[warm start] seed {w['seed']}: sampled success {w['warm_start_success']:.1%}, greedy "
                  f"{w['warm_start_greedy']:.1%}", flush=True)
        jobs = {(arm.name, seed): pool.submit(train_job, arm, seed, opts, weights[seed])
                for seed in weights for arm in arms}
        step_rows, finals = [], []
        for (name, seed), future in jobs.items():
            result = future.result()
            step_rows.extend(result["steps"])
            finals.append(result["final"])
            print(f"[run] {name:<26} seed {seed}: final success {result['final']['final_success']:.1%} "
                  f"(greedy {result['final']['final_greedy']:.1%}), {result['final']['train_time_s']:.0f}s",
                  flush=True)
        speed = pool.submit(rollout_speed, opts, weights[0]).result()

    write_csv(os.path.join(out, "steps.csv"), step_rows)
    write_csv(os.path.join(out, "final.csv"), [{**f, "warm_start_success": warm[f["seed"]]["warm_start_success"],
                                                "warm_start_greedy": warm[f["seed"]]["warm_start_greedy"]}
                                               for f in finals])
    import transformers
    import trl

    run = {"command": "python benchmarks/learning.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "options": opts, "arms": [a.name for a in arms], "workers": args.workers,
           "model_parameters": count_parameters(opts), "wall_time_s": round(time.time() - started, 1),
           "cpu": cpu_label(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "trl": trl.__version__}
    with open(os.path.join(out, "run.json"), "w") as handle:
        json.dump(run, handle, indent=2)
    print(write_report(out, run, step_rows, finals, warm, speed, smooth))
    print(f"[learning] wrote steps.csv, final.csv, summary.md, rollout_speed.txt, run.json, success.png, entropy.png "
          f"to {out}")
    return 0


def count_parameters(opts: dict) -> int:
    """Parameters of the tiny model the run trains."""
    return sum(p.numel() for p in _tokenizer_and_model(0, opts["hidden_size"], opts["layers"])[1].parameters())


if __name__ == "__main__":
    sys.exit(main())
