"""Entropy dynamics and learning with enough seeds: GRPO vs AEM-GRPO and AEM's reverse and shuffle ablations.

    python benchmarks/entropy_dynamics.py --out benchmarks/results/entropy_dynamics      # 4 arms x 10 seeds
    python benchmarks/entropy_dynamics.py --out DIR --resume                             # finish an interrupted run
    python benchmarks/entropy_dynamics.py --report-only benchmarks/results/entropy_dynamics   # re-read, no training
    python benchmarks/entropy_dynamics.py --quick                                         # smoke run
    python benchmarks/entropy_dynamics.py --task textworld --out benchmarks/results/entropy_dynamics_textworld

Part 3 of issue 15. The protocol is ``benchmarks/learning.py``'s (its jobs are imported, not copied): per seed a tiny
Qwen2 built in code, a short supervised warm start shared by every arm of that seed, then ``--steps`` RL steps of
``--tasks-per-step`` tasks x G = 8 episodes on ``trl_aem/CodeBreaker-v0`` (one symbol out of 3, 3 guesses),
``num_iterations=2``, learning rate 1e-3, ``beta=0``, ``scale_rewards="batch"``, temperature 1; evaluation on the
same 200 held-out tasks for every arm of a seed. ``--task textworld`` runs TextWorld's coin collector instead
(level 2, 3 commands per episode, where a random admissible command wins 12.5%): 80 steps, a 40-step warm start on
48 walkthroughs, 64 held-out games of the evaluation split. Arms: GRPO (``aem_lambda=0``, bit-identical to GRPO),
AEM-GRPO (lambda 1, gate 0.1, group scope) and AEM-GRPO with ``aem_direction="reverse"`` and ``"shuffle"``.

Results are appended to ``steps.csv`` and ``final.csv`` after every finished (arm, seed) run, so an interrupted run
keeps what it finished and ``--resume`` runs only the rest.

Statistics written to ``dynamics.md`` / ``dynamics.json`` (definitions there too):

* final success per arm: mean, std and a 95% t interval over seeds;
* paired comparisons (every arm of a seed starts from the same weights and plays the same tasks): mean difference
  with its 95% t interval, wins, and the exact two-sided sign-flip permutation p (``learning.py``'s test);
* span entropy (the mean token entropy of every turn at generation, what AEM reads) per step: mean over seeds with
  a 95% t band (``entropy_bands.png``); its mean over the first, middle and last third of training, and paired
  AEM minus GRPO differences per third (the paper: AEM keeps entropy higher early and lower late);
* entropy collapse per run: the first step at which the span entropy, as a trailing mean of 3 steps, falls below half
  its first-step value (``collapse_step``, or none), and the largest one-step drop; compared paired by seed;
* power: with the measured standard deviation of the paired differences ``sd_d`` over ``n`` seeds, the smallest
  true mean difference a paired t test at two-sided 5% detects with 80% power:
  ``(t_{0.975, n-1} + t_{0.80, n-1}) * sd_d / sqrt(n)``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import as_completed

import _offline  # noqa: F401  (the offline environment, before transformers is imported)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import learning  # noqa: E402
from _common import cpu_label, job_pool  # noqa: E402

ARM_NAMES = ("GRPO", "AEM-GRPO", "AEM-GRPO reverse", "AEM-GRPO shuffle")
#: Paired comparisons reported: (arm, against).
COMPARISONS = (("AEM-GRPO", "GRPO"), ("AEM-GRPO reverse", "GRPO"), ("AEM-GRPO shuffle", "GRPO"),
               ("AEM-GRPO", "AEM-GRPO reverse"), ("AEM-GRPO", "AEM-GRPO shuffle"))
DEFAULT = dict(seeds=10, steps=40, tasks_per_step=4, num_generations=8, sft_steps=8, eval_tasks=200)
QUICK = dict(seeds=2, steps=3, tasks_per_step=2, num_generations=4, sft_steps=4, eval_tasks=8)
#: TextWorld's coin collector at level 2 (the coin is in the next room; the objective says which way; the
#: walkthrough is 2 commands) with 3 commands per episode, so that a random admissible command rarely wins.
#: Evaluation plays the ``split="eval"`` games (odd game seeds), training and the warm start train-split games.
TEXTWORLD = learning.Task("textworld", "trl_aem/TextWorld-v0",
                          {"challenge": "tw-coin_collector", "settings": {"level": 2}, "max_steps": 3},
                          max_turns=3, tokens_per_turn=4, max_completion_length=512,
                          expert_seeds=range(1_000_000, 1_000_048), eval_env_kwargs={"split": "eval"})
TW_DEFAULT = dict(seeds=10, steps=80, tasks_per_step=4, num_generations=8, sft_steps=40, eval_tasks=64,
                  expert_tasks=48)
TW_QUICK = dict(seeds=1, steps=2, tasks_per_step=1, num_generations=4, sft_steps=2, eval_tasks=2, expert_tasks=2)
#: Per task: (the task, the full run's settings, --quick's).
TASKS = {"codebreaker": (learning.CODEBREAKER, DEFAULT, QUICK), "textworld": (TEXTWORLD, TW_DEFAULT, TW_QUICK)}
COLLAPSE_FRACTION = 0.5
FAILED_BELOW = 0.05  # a run whose final success is below this ended in failure
COLLAPSE_SMOOTH = 3


# ------------------------------------------------------------------------------------------------ statistics
def t_cdf(x: float, df: int) -> float:
    """Student t distribution function (Simpson's rule on the density; accurate to ~1e-9 for |x| < 50)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    steps = 1000
    h = x / steps
    total = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """Quantile of the Student t distribution (bisection on :func:`t_cdf`; cached)."""
    lo, hi = -60.0, 60.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its t interval ``(mean, low, high)`` over the finite values (NaN interval for fewer than 2)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(1 - (1 - level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def fisher_exact_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test of k1/n1 against k2/n2 (sum of the hypergeometric tables no more likely than
    the observed one)."""
    total, k = n1 + n2, k1 + k2

    def prob(x):
        return math.comb(n1, x) * math.comb(n2, k - x) / math.comb(total, k)

    observed = prob(k1)
    return min(1.0, sum(prob(x) for x in range(max(0, k - n2), min(k, n1) + 1) if prob(x) <= observed * (1 + 1e-9)))


def minimum_detectable_difference(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean (paired) difference a two-sided t test at ``alpha`` detects with ``power``, given the
    standard deviation ``sd`` of the differences over ``n`` pairs (the usual noncentral-t approximation)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired comparison of per-seed values ``a`` vs ``b``: mean difference with 95% t interval, wins, ties, exact
    sign-flip p, sd of the differences and the minimum detectable difference (80% power, 5%)."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return {"n": 0}
    mean, low, high = t_interval(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return {"n": len(diffs), "mean_diff": mean, "ci95": [low, high], "wins": sum(d > 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs), "p_sign_flip": learning.paired_sign_flip_p_value(
                [a[s] for s in seeds], [b[s] for s in seeds]), "sd_diff": sd,
            "mdd_80": minimum_detectable_difference(sd, len(diffs)), "diffs": diffs}


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving mean (the first values average what exists so far)."""
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def collapse_stats(steps: list[int], entropy: list[float]) -> dict:
    """Per run, from the span entropy of its rollouts (``entropy[i]`` logged at RL step ``steps[i]``): the first step
    whose trailing mean over ``COLLAPSE_SMOOTH`` rollouts is below ``COLLAPSE_FRACTION`` of the first rollout's
    (None if never), and the largest drop between consecutive rollouts with the step it lands on."""
    smooth = smoothed(entropy, COLLAPSE_SMOOTH)
    threshold = COLLAPSE_FRACTION * entropy[0]
    step = next((steps[i] for i, v in enumerate(smooth) if v < threshold), None)
    drops = [entropy[i] - entropy[i + 1] for i in range(len(entropy) - 1)]
    return {"collapse_step": step, "largest_drop": max(drops) if drops else 0.0,
            "largest_drop_step": steps[drops.index(max(drops)) + 1] if drops else None}


# ------------------------------------------------------------------------------------------------ analysis
def by_arm_seed(rows: list[dict], column: str) -> dict[str, dict[int, float]]:
    """``{arm: {seed: value}}`` from final.csv-like rows."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        out.setdefault(row["arm"], {})[int(row["seed"])] = float(row[column])
    return out


def entropy_series(step_rows: list[dict]) -> dict[str, dict[int, tuple[list[int], list[float]]]]:
    """``{arm: {seed: (RL steps of the rollouts, span entropy of each)}}``, in step order (with
    ``num_iterations=2`` a rollout feeds two optimizer steps, so rollouts are logged at steps 1, 3, 5, ...)."""
    out: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for row in step_rows:
        out.setdefault(row["arm"], {}).setdefault(int(row["seed"]), []).append((int(row["step"]),
                                                                                 float(row["span_entropy"])))
    return {arm: {seed: ([s for s, _ in sorted(pairs)], [v for _, v in sorted(pairs)])
                  for seed, pairs in seeds.items()} for arm, seeds in out.items()}


def analyse(step_rows: list[dict], finals: list[dict]) -> dict:
    """Every statistic of ``dynamics.md`` (see the module docstring) as a dictionary."""
    success = by_arm_seed(finals, "final_success")
    arms = [a for a in ARM_NAMES if a in success]
    # only seeds every arm finished (an interrupted run leaves the last seed incomplete)
    complete = sorted(set.intersection(*(set(success[a]) for a in arms))) if arms else []
    partial = sorted(set().union(*(set(success[a]) for a in arms)) - set(complete)) if arms else []
    success = {a: {s: v for s, v in success[a].items() if s in complete} for a in arms}
    step_rows = [r for r in step_rows if int(r["seed"]) in complete]
    warm = {int(r["seed"]): float(r["warm_start_success"]) for r in finals if int(r["seed"]) in complete}
    series = entropy_series(step_rows)
    out: dict = {"arms": arms, "seeds": complete, "incomplete_seeds_left_out": partial,
                 "warm_start": dict(zip(("mean", "low", "high"), t_interval(list(warm.values()))))}
    out["success"] = {}
    for arm in arms:
        values = list(success[arm].values())
        mean, low, high = t_interval(values)
        out["success"][arm] = {"mean": mean, "ci95": [low, high],
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                               "per_seed": [success[arm][s] for s in sorted(success[arm])], "n": len(values)}
    out["paired_success"] = {f"{a} - {b}": paired(success[a], success[b]) for a, b in COMPARISONS
                             if a in success and b in success}
    # runs that end in failure (the policy drifted into invalid or wrong answers), as counts
    failed = {arm: sum(v < FAILED_BELOW for v in success[arm].values()) for arm in arms}
    out["failed_runs"] = {"threshold": FAILED_BELOW, "per_arm": failed}
    if "GRPO" in failed and len(arms) > 1:
        others = [a for a in arms if a != "GRPO"]
        n_grpo, n_other = len(success["GRPO"]), sum(len(success[a]) for a in others)
        out["failed_runs"]["fisher_p_grpo_vs_aem_arms"] = fisher_exact_p(
            failed["GRPO"], n_grpo, sum(failed[a] for a in others), n_other)
        if "AEM-GRPO" in failed:
            out["failed_runs"]["fisher_p_grpo_vs_aem_grpo"] = fisher_exact_p(
                failed["GRPO"], n_grpo, failed["AEM-GRPO"], len(success["AEM-GRPO"]))
    # entropy by thirds, paired AEM - GRPO per third, collapse
    thirds: dict[str, dict[int, list[float]]] = {}
    collapse: dict[str, dict[int, dict]] = {}
    for arm in arms:
        thirds[arm], collapse[arm] = {}, {}
        for seed, (steps, values) in series.get(arm, {}).items():
            n = len(values)
            cuts = [round(k * n / 3) for k in range(4)]
            thirds[arm][seed] = [statistics.fmean(values[cuts[k]:cuts[k + 1]]) if cuts[k + 1] > cuts[k]
                                 else float("nan") for k in range(3)]
            collapse[arm][seed] = collapse_stats(steps, values)
    out["entropy_thirds"] = {arm: [t_interval([v[k] for v in thirds[arm].values()]) for k in range(3)]
                             for arm in arms if thirds[arm]}
    out["entropy_thirds_paired"] = {}
    for a, b in COMPARISONS:
        if a in thirds and b in thirds and thirds[a] and thirds[b]:
            out["entropy_thirds_paired"][f"{a} - {b}"] = [
                paired({s: v[k] for s, v in thirds[a].items()}, {s: v[k] for s, v in thirds[b].items()})
                for k in range(3)]
    out["collapse"] = {}
    for arm in arms:
        runs = collapse[arm]
        steps = [c["collapse_step"] for c in runs.values()]
        out["collapse"][arm] = {
            "collapsed_runs": sum(s is not None for s in steps), "runs": len(steps),
            "collapse_steps": steps, "median_collapse_step": (statistics.median([s for s in steps if s is not None])
                                                              if any(s is not None for s in steps) else None),
            "largest_drop_mean": statistics.fmean(c["largest_drop"] for c in runs.values()) if runs else float("nan"),
        }
    if "AEM-GRPO" in collapse and "GRPO" in collapse:
        horizon = max((max(steps) for steps, _ in series.get("GRPO", {}).values()), default=0) + 1
        # a run that never collapses is censored at the end: count it as collapsing at step (steps + 1)
        first = {s: (c["collapse_step"] or horizon) for s, c in collapse["GRPO"].items()}
        second = {s: (c["collapse_step"] or horizon) for s, c in collapse["AEM-GRPO"].items()}
        out["collapse_paired"] = {"AEM-GRPO - GRPO (collapse step, never = last step + 1)": paired(second, first),
                                  "grpo_collapses_earlier": sum(first[s] < second[s] for s in first if s in second),
                                  "aem_collapses_earlier": sum(second[s] < first[s] for s in first if s in second),
                                  "same": sum(second[s] == first[s] for s in first if s in second)}
        drops = paired({s: c["largest_drop"] for s, c in collapse["AEM-GRPO"].items()},
                       {s: c["largest_drop"] for s, c in collapse["GRPO"].items()})
        out["collapse_paired"]["AEM-GRPO - GRPO (largest one-step entropy drop)"] = drops
    out["paper"] = {"claims": ["AEM improves on GRPO", "reverse direction hurts", "shuffled alpha weakens the gain",
                               "GRPO's entropy collapses abruptly early; AEM keeps it higher early, lower late"],
                    "alfworld_1.5b_grpo": "68.0 -> 76.8 (+8.8 points, mean of 3 seeds)"}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}" if math.isfinite(x) else "nan"


def report(result: dict, run: dict) -> str:
    """dynamics.md: the tables and the power statement."""
    opts = run["options"]
    task, base = run.get("task"), run.get("baselines")
    lines = [f"# Entropy dynamics and learning{' on ' + task['name'] if task else ''}: {', '.join(result['arms'])} "
             f"x {len(result['seeds'])} seeds", ""]
    if task and base:  # runs before the task was recorded are CodeBreaker's
        lines += [f"Task: `{task['env_id']}` {task['env_kwargs']}, at most {task['max_turns']} turns of "
                  f"{task['tokens_per_turn']} tokens; evaluation env kwargs {task['eval_env_kwargs'] or 'the same'}, "
                  f"seeds {task['eval_seed_offset']}... On the {opts['eval_tasks']} evaluation tasks a random "
                  f"admissible action succeeds {base['random']:.1%}, the expert (walkthrough) {base['expert']:.1%}.",
                  ""]
    lines += [f"Command: `{run['command']}`; {opts['steps']} RL steps of {opts['tasks_per_step']} tasks x "
              f"G = {opts['num_generations']}, num_iterations {opts['num_iterations']}, lr {opts['learning_rate']}, "
              f"warm start {opts['sft_steps']} SFT steps, evaluation on {opts['eval_tasks']} held-out tasks "
              f"(sampled, temperature 1). Wall time {run.get('wall_time_s', float('nan')):.0f} s on {run['cpu']}."
              + (f" Seeds {result['incomplete_seeds_left_out']} did not finish every arm and are left out."
                 if result["incomplete_seeds_left_out"] else ""),
              "",
              "## Final success (95% t interval over seeds)",
              "",
              "| arm | mean | 95% CI | std | per seed |",
              "|---|---|---|---|---|"]
    w = result["warm_start"]
    lines.append(f"| warm start | {w['mean']:.1%} | [{w['low']:.1%}, {w['high']:.1%}] | | |")
    for arm, s in result["success"].items():
        lines.append(f"| {arm} | {s['mean']:.1%} | [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}] | {s['std']:.1%} | "
                     + ", ".join(f"{100 * v:.1f}" for v in s["per_seed"]) + " |")
    lines += ["", "## Paired differences of final success (points; same seed = same start and tasks)", "",
              "| comparison | mean diff | 95% CI | wins/ties of n | sign-flip p | sd of diffs | "
              "detectable (80% power) |",
              "|---|---|---|---|---|---|---|"]
    for name, p in result["paired_success"].items():
        if p.get("n"):
            lines.append(f"| {name} | {_pct(p['mean_diff'])} | [{_pct(p['ci95'][0])}, {_pct(p['ci95'][1])}] | "
                         f"{p['wins']}/{p['ties']} of {p['n']} | {p['p_sign_flip']:.3f} | {100 * p['sd_diff']:.1f} | "
                         f"{100 * p['mdd_80']:.1f} |")
    fr = result.get("failed_runs")
    if fr:
        lines += ["", f"Runs ending below {fr['threshold']:.0%} success: "
                  + ", ".join(f"{arm} {k}/{len(result['seeds'])}" for arm, k in fr["per_arm"].items())
                  + (f"; Fisher exact p, GRPO against the AEM arms together {fr['fisher_p_grpo_vs_aem_arms']:.3f}, "
                     f"against AEM-GRPO alone {fr['fisher_p_grpo_vs_aem_grpo']:.3f}."
                     if "fisher_p_grpo_vs_aem_grpo" in fr else ".")]
    lines += ["", "## Span entropy by thirds of training (nats; mean [95% CI] over seeds)", "",
              "| arm | first third | middle third | last third |", "|---|---|---|---|"]
    for arm, rows in result["entropy_thirds"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in rows) + " |")
    lines += ["", "| paired entropy difference | first third | middle third | last third |", "|---|---|---|---|"]
    for name, parts in result["entropy_thirds_paired"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{p['mean_diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}], p {p['p_sign_flip']:.3f}"
            if p.get("n") else "n/a" for p in parts) + " |")
    lines += ["", f"## Entropy collapse (first step where the trailing mean of {COLLAPSE_SMOOTH} steps of span "
              f"entropy is below {COLLAPSE_FRACTION:.0%} of the first step's)", "",
              "| arm | runs that collapse | collapse steps per seed (- = never) | median step | mean largest one-step "
              "drop (nats) |", "|---|---|---|---|---|"]
    for arm, c in result["collapse"].items():
        steps = ", ".join("-" if s is None else str(s) for s in c["collapse_steps"])
        lines.append(f"| {arm} | {c['collapsed_runs']}/{c['runs']} | {steps} | {c['median_collapse_step']} | "
                     f"{c['largest_drop_mean']:.3f} |")
    cp = result.get("collapse_paired")
    if cp:
        key = "AEM-GRPO - GRPO (collapse step, never = last step + 1)"
        p = cp[key]
        lines += [] if not p.get("n") else [
            "", f"Collapse step, AEM-GRPO minus GRPO, paired: {p['mean_diff']:+.1f} steps "
                  f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}], sign-flip p {p['p_sign_flip']:.3f}; GRPO collapses "
                  f"first in {cp['grpo_collapses_earlier']} seeds, AEM-GRPO first in {cp['aem_collapses_earlier']}, "
                  f"same step in {cp['same']}."]
    main = result["paired_success"].get("AEM-GRPO - GRPO")
    if main and main.get("n", 0) >= 2:
        lines += ["", "## Power", "",
                  f"With n = {main['n']} seeds the paired differences of final success between AEM-GRPO and GRPO have "
                  f"a standard deviation of {100 * main['sd_diff']:.1f} points, so this design detects (paired t "
                  f"test, two-sided 5%, 80% power) a true difference of about {100 * main['mdd_80']:.1f} points or "
                  f"more; the paper's ALFWorld gain for the 1.5B model was +8.8 points. The exact sign-flip test's "
                  f"smallest possible p is 2/2^{main['n']} = {2 / 2 ** main['n']:.4f}."]
    return "\n".join(lines)


def write_plot(path: str, step_rows: list[dict], seeds: list[int]) -> None:
    """entropy_bands.png: span entropy and training success per step, mean over seeds with a 95% t band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"GRPO": "tab:blue", "AEM-GRPO": "tab:red", "AEM-GRPO reverse": "tab:purple",
              "AEM-GRPO shuffle": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, column, label in ((axes[0], "span_entropy", "span entropy at generation (nats)"),
                              (axes[1], "success_rate", "training success (moving mean of 5 steps)")):
        for arm in ARM_NAMES:
            per_seed: dict[int, list[tuple[int, float]]] = {}
            for row in step_rows:
                if row["arm"] == arm and int(row["seed"]) in seeds:
                    per_seed.setdefault(int(row["seed"]), []).append((int(row["step"]), float(row[column])))
            if not per_seed:
                continue
            length = min(len(v) for v in per_seed.values())
            runs = [[v for _, v in sorted(p)][:length] for p in per_seed.values()]
            if column == "success_rate":
                runs = [smoothed(r, 5) for r in runs]
            steps = [s for s, _ in sorted(next(iter(per_seed.values())))][:length]
            stats = [t_interval([r[i] for r in runs]) for i in range(length)]
            mean = [m for m, _, _ in stats]
            ax.plot(steps, mean, color=colors[arm], label=f"{arm} ({len(runs)} seeds)",
                    ls="--" if arm == "GRPO" else "-")
            if len(runs) > 1:
                ax.fill_between(steps, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], color=colors[arm],
                                alpha=0.12)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("span entropy, mean over seeds, 95% band")
    axes[1].set_title("training success, mean over seeds, 95% band")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ running
def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _append_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    new = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def prepare_games(task, opts: dict) -> None:
    """Reset the env once on every seed the run plays and build the tokenizer, in this process: TextWorld generates
    and caches its games here, so that the workers only load them."""
    from trl_aem.rollout import make_env_factory

    for kwargs, seeds in ((task.env_kwargs, range(opts["steps"] * opts["tasks_per_step"])),
                          (task.env_kwargs, task.expert_seeds),
                          (task.eval_kwargs, range(task.eval_seed_offset, task.eval_seed_offset + opts["eval_tasks"]))):
        env = make_env_factory(task.env_id, kwargs)()
        try:
            for seed in seeds:
                env.reset(seed=seed)
        finally:
            env.close()
    learning._tokenizer_and_model(0, opts["hidden_size"], opts["layers"], task)


def baselines(task, num_tasks: int) -> dict:
    """Success of a random admissible command and of the env's expert (walkthrough) on the evaluation tasks."""
    from trl_aem import evaluate

    return {policy: evaluate(task.env_id, policy, num_tasks=num_tasks, env_kwargs=task.eval_kwargs,
                             seed_offset=task.eval_seed_offset, max_turns=task.max_turns).success_rate
            for policy in ("random", "expert")}


def run_all(out: str, opts: dict, arms, seeds: list[int], workers: int, resume: bool,
            task=learning.CODEBREAKER) -> None:
    """Warm starts, then every (arm, seed) not yet in ``final.csv``; rows appended as runs finish."""
    done = {(r["arm"], int(r["seed"])) for r in _read_csv(os.path.join(out, "final.csv"))} if resume else set()
    if not resume:
        for name in ("steps.csv", "final.csv"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    todo = [(arm, seed) for seed in seeds for arm in arms if (arm.name, seed) not in done]
    if not todo:
        return
    prepare_games(task, opts)
    with tempfile.TemporaryDirectory() as weights_dir, job_pool(workers) as pool:
        needed = sorted({seed for _, seed in todo})
        weights = {seed: os.path.join(weights_dir, f"seed{seed}.pt") for seed in needed}
        warm = {}
        for future in as_completed([pool.submit(learning.warm_start_job, s, opts, weights[s], task)
                                    for s in needed]):
            w = future.result()
            warm[w["seed"]] = w
            print(f"[warm start] seed {w['seed']}: sampled success {w['warm_start_success']:.1%}", flush=True)
        futures = {pool.submit(learning.train_job, arm, seed, opts, weights[seed], task): (arm.name, seed)
                   for arm, seed in todo}
        for future in as_completed(futures):
            result = future.result()
            final = result["final"]
            w = warm[final["seed"]]
            _append_csv(os.path.join(out, "steps.csv"), result["steps"])
            _append_csv(os.path.join(out, "final.csv"), [{**final, "warm_start_success": w["warm_start_success"],
                                                          "warm_start_greedy": w["warm_start_greedy"]}])
            print(f"[run] {final['arm']:<18} seed {final['seed']}: final success {final['final_success']:.1%}, "
                  f"{final['train_time_s']:.0f}s", flush=True)


def write_report(out: str, run: dict) -> str:
    """dynamics.json, dynamics.md and entropy_bands.png from the CSVs in ``out``; returns the markdown."""
    step_rows, finals = _read_csv(os.path.join(out, "steps.csv")), _read_csv(os.path.join(out, "final.csv"))
    result = analyse(step_rows, finals)
    with open(os.path.join(out, "dynamics.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    text = report(result, run)
    with open(os.path.join(out, "dynamics.md"), "w") as handle:
        handle.write(text + "\n")
    write_plot(os.path.join(out, "entropy_bands.png"), step_rows, result["seeds"])
    return text


def parse_args(argv=None):
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1-2 seeds, 2-3 steps, GRPO and AEM-GRPO")
    parser.add_argument("--task", choices=sorted(TASKS), default="codebreaker",
                        help="environment and its settings (TASKS); default codebreaker")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT['seeds']})")
    parser.add_argument("--steps", type=int, default=None, help=f"RL steps (default {DEFAULT['steps']})")
    parser.add_argument("--tasks-per-step", type=int, default=None, help="tasks per RL step (x G = 8 episodes)")
    parser.add_argument("--sft-steps", type=int, default=None, help="supervised warm-start steps")
    parser.add_argument("--eval-tasks", type=int, default=None, help="held-out evaluation tasks")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--arms", default=None, help="comma-separated subset of: " + ", ".join(ARM_NAMES))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes (1: every job in this process)")
    parser.add_argument("--resume", action="store_true", help="keep finished runs in --out, run the rest")
    parser.add_argument("--report-only", metavar="DIR", default=None, help="only rebuild the report from DIR")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run (or resume, or only report), print the report."""
    args = parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.report_only, "run.json")) as handle:
            run = json.load(handle)
        print(write_report(args.report_only, run))
        return 0
    task, default, quick = TASKS[args.task]
    opts = dict(quick if args.quick else default)
    for key in ("seeds", "steps", "tasks_per_step", "sft_steps", "eval_tasks"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    opts.update(num_iterations=2, learning_rate=args.learning_rate, hidden_size=128, layers=2)
    if "expert_tasks" in opts:  # the first ones of the task's expert seeds
        task = dataclasses.replace(task, expert_seeds=task.expert_seeds[:opts["expert_tasks"]])
    names = [n.strip() for n in args.arms.split(",")] if args.arms else (
        ["GRPO", "AEM-GRPO"] if args.quick else list(ARM_NAMES))
    unknown = sorted(set(names) - set(ARM_NAMES))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; allowed: {list(ARM_NAMES)}")
    arms = [a for a in learning.ARMS if a.name in names]
    out = args.out or tempfile.mkdtemp(prefix="aem_entropy_dynamics_")
    os.makedirs(out, exist_ok=True)
    started = time.time()
    previous = 0.0
    if args.resume and os.path.exists(os.path.join(out, "run.json")):
        with open(os.path.join(out, "run.json")) as handle:
            previous = json.load(handle).get("wall_time_s", 0.0)
    print(f"[entropy_dynamics] {len(arms)} arms x {opts['seeds']} seeds, {opts['steps']} steps, lr "
          f"{opts['learning_rate']}, {args.workers} workers -> {out}", flush=True)
    run_all(out, opts, arms, list(range(opts["seeds"])), args.workers, args.resume, task)
    import torch
    import transformers
    import trl

    run = {"command": "python benchmarks/entropy_dynamics.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "options": opts, "arms": [a.name for a in arms], "workers": args.workers,
           "task": {**dataclasses.asdict(task), "expert_seeds": [task.expert_seeds.start, task.expert_seeds.stop]},
           "baselines": baselines(task, opts["eval_tasks"]),
           "wall_time_s": round(previous + time.time() - started, 1), "cpu": cpu_label(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "trl": trl.__version__}
    with open(os.path.join(out, "run.json"), "w") as handle:
        json.dump(run, handle, indent=2)
    print(write_report(out, run))
    print(f"[entropy_dynamics] wrote steps.csv, final.csv, run.json, dynamics.md, dynamics.json, entropy_bands.png "
          f"to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
