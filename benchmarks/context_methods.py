"""Which context keeps a clue seen early? full, window, summary (SUPO) and echo (ECHO) contexts, each with and without
AEM, on the built-in long-horizon ``trl_aem/ClueRooms-v0``, with a tiny Qwen2 on CPU.

    python benchmarks/context_methods.py --quick                                   # smoke run, a few minutes
    python benchmarks/context_methods.py --out benchmarks/results/context_methods  # the real run

Task: ``ClueRooms(num_rooms=5, num_colors=4, num_items=2, clue_rooms=2, filler_words=0, distractors=False,
list_actions=False)``: walk from the entrance through 5 rooms; one of the first 2 has the note ``the <item> is
<color>``, the others none; then tell the vault the item's color (10 for the right color, chance 1/4). An expert plays
7 turns; at the vault the clue is 4 to 5 observations back. (The harder settings, distractor notes about other items
and listed actions that name every color, need a model that binds an item to its color: this 2-layer model did not
learn that within this CPU budget, so the benchmark measures the memory, not the binding.)

Contexts (what the model sees; ``env_context``):

* ``full``: the whole episode, one growing sequence (about 150 tokens);
* ``window``: the task, the last ``--history`` observation/action pair and the current observation (the step-wise
  setting); the clue is gone at the vault, so it can only guess;
* ``summary`` (SUPO): past ``--budget`` tokens the policy writes a summary; the next segment starts from the task, the
  summary and the current observation; every segment carries the episode's advantage;
* ``echo`` (ECHO): every answer carries ``<finding>...</finding>``; past ``--echo-budget`` tokens (findings and kept
  records cost more, so its budget is larger; both budgets make an expert episode rebuild once or twice) the policy
  selects turns to keep; the next segment holds the task, the kept turns' actions and findings, the last ``--recent``
  turns and the current observation; ECHO's traceable credit (final segment + selected turns + final selection) and
  positive advantages only. ``--arms`` may add ``echo dense`` (ECHO's dense-credit ablation) and ``window gigpo``
  (GiGPO's step credit).

Protocol (every arm of a seed starts from the same weights):

* Per seed: a tiny Qwen2 built in code, then a supervised warm start on the expert's transcripts *rendered in all
  four contexts* (the same rollout code as training, driven by a scripted expert that walks, writes the room's note
  as its finding, selects the clue's turn, summarises with the clue's color and names it at the vault) for
  ``--sft-steps`` steps (see :func:`warm_start` for the two changes to plain SFT that let this model learn to read
  the clue at all). The warm start teaches the formats and the reading; RL then trains each arm in its context.
* RL: ``--steps`` steps of ``--tasks-per-step`` tasks x G = ``--num-generations`` episodes, ``loss_type="dapo"``,
  ``beta = 0``, temperature 1, constant learning rate ``--learning-rate`` (1e-4). AEM on = ``aem_lambda=1, aem_min_entropy_range=0.1`` (the
  paper's); off = ``aem_lambda=0`` (bit-identical to the base method, same metrics).
* Evaluation on ``--eval-tasks`` held-out tasks (seeds 100000...), sampled at temperature 1 in the arm's context,
  before RL (the warm start) and after: success, turns per episode, tokens per rollout (prompt + completion tokens of
  every segment of the episode, i.e. what the model processed), generated tokens per episode and rebuilds.

Outputs in ``--out``: ``steps.csv`` (per arm, seed, step: training success, turns, rebuilds, credited-token fraction,
AEM's alpha std, step time), ``final.csv`` (per arm and seed: before/after success, turns, tokens per rollout),
``summary.md`` (means +- std over seeds, AEM on vs off by exact permutation tests), ``success.png`` and ``run.json``.
Runs go to ``--workers`` processes with one torch thread each; results do not depend on the number of workers.
"""

from __future__ import annotations

import os

import _offline  # noqa: E402,F401  (the offline environment, before transformers is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import as_completed  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from _common import cpu_label, job_pool, permutation_p_value, write_csv  # noqa: E402

ENV_ID = "trl_aem/ClueRooms-v0"
ENV_KWARGS = dict(num_rooms=5, num_colors=4, num_items=2, clue_rooms=2, filler_words=0, distractors=False,
                  list_actions=False)
SYSTEM_PROMPT = "you are a helpful agent ."
EVAL_SEED_OFFSET, SFT_SEED_OFFSET = 100_000, 50_000
MAX_TURNS, TOKENS_PER_TURN, MEMORY_TOKENS = 10, 24, 24
CONTEXTS = ("full", "window", "summary", "echo")


@dataclass(frozen=True)
class Arm:
    """One training configuration: a context (and its credit) with AEM on or off."""

    name: str
    context: str
    aem: bool
    extra: dict = field(default_factory=dict)


def _arms() -> list[Arm]:
    arms = []
    for context in CONTEXTS:
        arms += [Arm(context, context, False), Arm(f"{context} +AEM", context, True)]
    arms += [Arm("echo dense", "echo", False, {"env_credit": "episode"}),
             Arm("echo dense +AEM", "echo", True, {"env_credit": "episode"}),
             Arm("window gigpo", "window", False, {"env_credit": "gigpo"}),
             Arm("window gigpo +AEM", "window", True, {"env_credit": "gigpo"})]
    return arms


ARMS = _arms()
DEFAULT_ARMS = [a.name for a in ARMS if not a.extra]
STEP_COLUMNS = {"success_rate": "env/success_rate", "turns_mean": "env/turns_mean",
                "rebuilds": "env/rebuilds_per_episode", "overlong_frac": "env/overlong_frac",
                "credited_frac": "credit/credited_token_frac", "summary_tokens": "env/summary_tokens_mean",
                "selected_turns": "env/selected_turns_mean", "findings_frac": "env/findings_frac",
                "alpha_std": "aem/alpha_std", "span_entropy": "aem/response_entropy_mean"}
DEFAULT = dict(seeds=5, steps=16, tasks_per_step=1, num_generations=8, sft_steps=1000, sft_episodes=200,
               eval_tasks=40, budget=110, echo_budget=150, history=1, recent=0, hidden_size=64)
QUICK = dict(seeds=2, steps=2, tasks_per_step=1, num_generations=4, sft_steps=4, sft_episodes=8, eval_tasks=4,
             budget=110, echo_budget=150, history=1, recent=0, hidden_size=32)


def context_options(context: str, opts: dict) -> dict:
    """The ``env_*`` fields of a context (the same in training and evaluation)."""
    budget = opts["echo_budget"] if context == "echo" else opts["budget"]
    return dict(env_context=context, env_history_turns=opts["history"], env_context_budget=budget,
                env_memory_max_tokens=MEMORY_TOKENS, env_max_rebuilds=5, env_echo_recent_turns=opts["recent"],
                env_prompt_format="chat")


def _policy(context: str, opts: dict):
    from types import SimpleNamespace

    from trl_aem.context import context_policy_from_args

    return context_policy_from_args(SimpleNamespace(**context_options(context, opts)))


def _tokenizer():
    from trl_aem import DEFAULT_PROMPT
    from trl_aem.tiny import build_agent_tokenizer

    return build_agent_tokenizer(ENV_ID, ENV_KWARGS, DEFAULT_PROMPT, SYSTEM_PROMPT)


def _model(tokenizer, seed: int, hidden_size: int):
    from trl_aem.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tokenizer, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, seed=seed)


def _runner(tokenizer, context: str, opts: dict, envs: list | None = None):
    from trl_aem import EnvRunner, ObservationRenderer, RolloutLimits
    from trl_aem.envs.clues import ClueRooms

    def factory():
        env = ClueRooms(**ENV_KWARGS)
        if envs is not None:
            envs.append(env)
        return env

    return EnvRunner(factory, ObservationRenderer(tokenizer, SYSTEM_PROMPT),
                     RolloutLimits(MAX_TURNS, TOKENS_PER_TURN, 1024), context=_policy(context, opts),
                     num_workers=1, timeout=None)


# ------------------------------------------------------------------------------------------------ the warm start
def expert_generate(tokenizer, envs: list, context: str):
    """A scripted expert as a ``GenerateFn``: reads the state of the episode's environment (``envs[i]``) and answers
    the turn, or the memory request its context shows, as an expert would."""
    from trl_aem.context import SELECTION_REQUEST, SUMMARY_REQUEST

    def generate(contexts, max_new_tokens, keys=None):
        out = []
        for context_ids, (_, index) in zip(contexts, keys):
            env = envs[index]
            tail = tokenizer.decode(context_ids[-160:])
            last = tail[tail.rfind("user"):]
            seen = env.clue_room <= env.room  # the clue's room has been shown
            if " ".join(SELECTION_REQUEST.split()[:4]) in last:
                answer = f"turn {env.clue_room + 1} : the {env.item} is {env.answer}" if seen else "none"
            elif " ".join(SUMMARY_REQUEST.split()[-6:]) in last:
                answer = f"the {env.item} is {env.answer}" if seen else f"find out the color of the {env.item}"
            else:
                answer = env.expert_action()
                if context == "echo":
                    answer += f" <finding> {env.expert_finding()} </finding>"
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append(ids[:max_new_tokens])
        return out, None

    generate.accepts_keys = True
    return generate


def sft_rows(tokenizer, opts: dict) -> list[tuple[list[int], list[int], bool]]:
    """``(input_ids, labels, final)`` of every segment of expert episodes in every context (labels -100 off the
    generated tokens: the prompt and the observations; ``final``: the episode's last segment, which holds the answer
    at the vault)."""
    from trl_aem import DEFAULT_PROMPT

    rows = []
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]
    tasks = [{"prompt": prompt, "seed": SFT_SEED_OFFSET + i} for i in range(opts["sft_episodes"])]
    for context in CONTEXTS:
        envs: list = []
        runner = _runner(tokenizer, context, opts, envs)
        for episode in runner.run(tasks, [prompt] * len(tasks), expert_generate(tokenizer, envs, context)):
            assert episode.success, (context, episode.actions)
            segments = episode.segments()
            for k, segment in enumerate(segments):
                ids = segment.prompt_ids + segment.completion_ids
                labels = [-100] * len(segment.prompt_ids) + [
                    t if m else -100 for t, m in zip(segment.completion_ids, segment.env_mask)]
                rows.append((ids, labels, k == len(segments) - 1))
    return rows


def warm_start(model, tokenizer, rows, steps: int, seed: int, batch_size: int = 16, lr: float = 1e-3,
               final_share: float = 0.75, decision_weight: float = 10.0):
    """Supervised steps (AdamW, cross-entropy on the generated tokens) on random batches of ``rows``.

    A share ``final_share`` of every batch is drawn from the episodes' final segments (the vault's answer: the one
    token that needs the clue; the window context's one row per turn would otherwise dilute it), and the *decision
    tokens*, the ones that copy a clue (the word after ``say``, ``turn`` or ``is``: the color at the vault, the turn a
    selection keeps, the color a summary or finding states), weigh ``decision_weight`` times the others. Without both,
    this 2-layer model did not learn to read the clue within 2000 steps on this CPU; with them it does within
    a few hundred (measured while sizing this benchmark)."""
    rng = random.Random(seed)
    finals = [row for row in rows if row[2]]
    marks = torch.tensor(tokenizer.convert_tokens_to_ids(["say", "turn", "is"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = [finals[rng.randrange(len(finals))] if rng.random() < final_share else rows[rng.randrange(len(rows))]
                 for _ in range(batch_size)]
        width = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (ids, lab, _) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            attention[r, : len(ids)] = 1
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        target = labels[:, 1:]
        labelled = target != -100
        weight = labelled.float() * torch.where(torch.isin(input_ids[:, :-1], marks), decision_weight, 1.0)
        loss_per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                           target.clamp(min=0).reshape(-1), reduction="none")
        loss = (loss_per_token.view_as(weight) * weight).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(model, tokenizer, context: str, opts: dict, seed: int) -> dict:
    """Held-out tasks in ``context``, sampled at temperature 1: success, turns, tokens per rollout, rebuilds."""
    from transformers import GenerationConfig

    from trl_aem import DEFAULT_PROMPT
    from trl_aem.agents import eos_token_ids
    from trl_aem.generation import make_hf_generate_fn

    torch.manual_seed(seed)
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]
    rows = [{"prompt": prompt, "seed": EVAL_SEED_OFFSET + t} for t in range(opts["eval_tasks"])]
    stop = eos_token_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=None, top_k=None,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    generate = make_hf_generate_fn(model, tokenizer.pad_token_id, stop, config, temperature=1.0)
    model.eval()
    with torch.no_grad():
        episodes = _runner(tokenizer, context, opts).run(rows, [prompt] * len(rows), generate)
    count = max(len(episodes), 1)
    return {
        "success": sum(e.success for e in episodes) / count,
        "turns": sum(e.num_turns for e in episodes) / count,
        "tokens_per_rollout": sum(len(s.prompt_ids) + len(s.completion_ids) for e in episodes for s in e.segments())
        / count,
        "generated_tokens": sum(sum(s.env_mask) for e in episodes for s in e.segments()) / count,
        "rebuilds": sum(len(e.memories) for e in episodes) / count,
        "overlong": sum(e.overlong for e in episodes) / count,
    }


# ------------------------------------------------------------------------------------------------ jobs
def warm_start_job(seed: int, opts: dict, path: str) -> dict:
    """Build the seed's model, warm-start it on expert transcripts of every context, save it, evaluate it in each."""
    torch.set_num_threads(1)
    from transformers import set_seed

    saved = path + ".json"
    if os.path.exists(path) and os.path.exists(saved):  # a kept warm start of the same settings (--weights-dir)
        with open(saved) as handle:
            result = json.load(handle)
        if result.get("options") == {k: opts[k] for k in ("sft_steps", "sft_episodes", "hidden_size", "eval_tasks",
                                                           "budget", "echo_budget", "history", "recent")}:
            return result["warm"]
    set_seed(seed)
    tokenizer = _tokenizer()
    model = _model(tokenizer, seed, opts["hidden_size"])
    start = time.perf_counter()
    rows = sft_rows(tokenizer, opts)
    warm_start(model, tokenizer, rows, opts["sft_steps"], seed)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), path)
    warm = {"seed": seed, "sft_rows": len(rows), "sft_seconds": seconds,
            **{context: evaluate(model, tokenizer, context, opts, seed) for context in CONTEXTS}}
    with open(saved, "w") as handle:
        json.dump({"options": {k: opts[k] for k in ("sft_steps", "sft_episodes", "hidden_size", "eval_tasks", "budget",
                                                    "echo_budget", "history", "recent")}, "warm": warm}, handle)
    return warm


def train_job(arm: Arm, seed: int, opts: dict, weights: str) -> dict:
    """Train one arm from the seed's warm start; per-step logs and the final evaluation."""
    torch.set_num_threads(1)
    from transformers import set_seed

    from _common import train_and_log

    from trl_aem import AEMGRPOConfig

    tokenizer = _tokenizer()
    model = _model(tokenizer, seed, opts["hidden_size"])
    model.load_state_dict(torch.load(weights))
    set_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = AEMGRPOConfig(
            output_dir=tmp, max_steps=opts["steps"], seed=seed,
            per_device_train_batch_size=opts["tasks_per_step"] * opts["num_generations"],
            num_generations=opts["num_generations"], learning_rate=opts["learning_rate"], lr_scheduler_type="constant",
            beta=0.0, temperature=1.0, loss_type="dapo", max_completion_length=1024, env_max_turns=MAX_TURNS,
            env_max_new_tokens_per_turn=TOKENS_PER_TURN, env_system_prompt=SYSTEM_PROMPT, env_kwargs=ENV_KWARGS,
            env_num_workers=1, env_timeout=None, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
            use_cpu=True, disable_tqdm=True, aem_plots=False, use_aem=True,
            aem_lambda=1.0 if arm.aem else 0.0, aem_min_entropy_range=0.1,
            **context_options(arm.context, opts), **arm.extra,
        )
        identity = {"arm": arm.name, "context": arm.context, "aem": int(arm.aem), "seed": seed}
        trainer, steps, train_time = train_and_log(
            model, tokenizer, config, ENV_ID, opts["steps"] * opts["tasks_per_step"], STEP_COLUMNS, identity)
    final = evaluate(trainer.model, tokenizer, arm.context, opts, seed)
    return {"steps": steps, "final": {**identity, **{f"final_{k}": v for k, v in final.items()},
                                      "train_time_s": train_time}}


# ------------------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std over seeds)."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {std:.2g}"


def summary_table(finals: list[dict], warm: list[dict], arm_names: list[str]) -> str:
    """Markdown: per arm, success before (warm start, same context) and after RL, turns, tokens per rollout, rebuilds;
    AEM on vs off in the same context (permutation test over seeds)."""
    lines = ["| arm | success before RL | success after RL | turns / episode | tokens / rollout | generated tokens "
             "| rebuilds | AEM vs off: p |", "|---|---|---|---|---|---|---|---|"]
    by_arm = {name: [f for f in finals if f["arm"] == name] for name in arm_names}
    for name in arm_names:
        rows = by_arm[name]
        if not rows:
            continue
        context = rows[0]["context"]
        before = [w[context]["success"] for w in warm]
        after = [r["final_success"] for r in rows]
        p = ""
        if name.endswith(" +AEM") and by_arm.get(name[: -len(" +AEM")]):
            off = [r["final_success"] for r in by_arm[name[: -len(" +AEM")]]]
            p = f"{permutation_p_value(after, off):.3f}"
        lines.append(f"| {name} | {mean_std(before)} | {mean_std(after)} | "
                     f"{mean_std([r['final_turns'] for r in rows])} | "
                     f"{mean_std([r['final_tokens_per_rollout'] for r in rows])} | "
                     f"{mean_std([r['final_generated_tokens'] for r in rows])} | "
                     f"{mean_std([r['final_rebuilds'] for r in rows])} | {p} |")
    return "\n".join(lines)


def write_plot(out: str, finals: list[dict], warm: list[dict], arm_names: list[str]) -> str:
    """success.png: success before and after RL per arm (mean over seeds, dots per seed), and tokens per rollout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in arm_names if any(f["arm"] == n for f in finals)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for x, name in enumerate(names):
        rows = [f for f in finals if f["arm"] == name]
        context = rows[0]["context"]
        before = [w[context]["success"] for w in warm]
        after = [r["final_success"] for r in rows]
        color = "tab:red" if name.endswith("+AEM") else "tab:blue"
        axes[0].bar(x, statistics.fmean(after), color=color, alpha=0.6)
        axes[0].scatter([x] * len(after), after, color="black", s=10, zorder=3)
        axes[0].plot([x - 0.4, x + 0.4], [statistics.fmean(before)] * 2, color="gray", linestyle="--")
        axes[1].bar(x, statistics.fmean(r["final_tokens_per_rollout"] for r in rows), color=color, alpha=0.6)
    chance = 1.0 / ENV_KWARGS["num_colors"]
    axes[0].axhline(chance, color="gray", linestyle=":", linewidth=1)
    axes[0].set_title("held-out success after RL (dashed: warm start; dotted: chance)")
    axes[1].set_title("tokens per rollout (all segments, prompt + completion)")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = os.path.join(out, "success.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: str, run: dict, steps: list[dict], finals: list[dict], warm: list[dict]) -> str:
    """summary.md and success.png in ``out``; returns the summary."""
    opts = run["options"]
    arm_names = run["arms"]
    step_time = {name: statistics.median(r["step_time_s"] for r in steps if r["arm"] == name)
                 for name in arm_names if any(r["arm"] == name for r in steps)}
    warm_lines = ["| context | " + " | ".join(f"seed {w['seed']}" for w in warm) + " |",
                  "|---|" + "---|" * len(warm)]
    for context in CONTEXTS:
        warm_lines.append(f"| {context} | " + " | ".join(f"{w[context]['success']:.2f}" for w in warm) + " |")
    summary = "\n\n".join([
        f"Command: `{run['command']}`  ",
        f"{len(arm_names)} arms x {opts['seeds']} seeds on `{ENV_ID}` {ENV_KWARGS}; tiny Qwen2 (hidden "
        f"{opts['hidden_size']}, 2 layers, {run['model_parameters'] / 1e6:.3f}M parameters, word tokenizer); warm start "
        f"{opts['sft_steps']} supervised steps on {opts['sft_episodes']} expert episodes per context; RL "
        f"{opts['steps']} steps of {opts['tasks_per_step']} tasks x G={opts['num_generations']}, dapo, lr "
        f"{opts['learning_rate']}; context budget {opts['budget']} tokens (summary), {opts['echo_budget']} (echo: its "
        f"findings and kept records cost more), window of {opts['history']} turn(s), echo keeps {opts['recent']} recent "
        f"turn(s) in full; evaluation on {opts['eval_tasks']} held-out tasks, sampled at temperature 1. Chance: "
        f"{1 / ENV_KWARGS['num_colors']:.2f}.",
        "Per arm, mean ± std over seeds (before RL: the warm-started model in the same context):",
        summary_table(finals, warm, arm_names),
        "Warm start, held-out success per context and seed:",
        "\n".join(warm_lines),
        "Median RL step time (s, rollouts included): "
        + ", ".join(f"{name} {value:.1f}" for name, value in step_time.items()),
        f"Wall time {run['wall_time_s']:.0f}s with {run['workers']} workers on {run['cpu']}.",
    ])
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(summary + "\n")
    write_plot(out, finals, warm, arm_names)
    return summary


def parse_args(argv=None):
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 steps, tiny groups")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    for key, value in DEFAULT.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"default {value} (quick {QUICK[key]})")
    parser.add_argument("--learning-rate", type=float, default=1e-4,
                        help="RL learning rate (default 1e-4; at 1e-3 a fresh Adam's first steps broke the warm start's "
                             "memory formats within one or two updates)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: "
                        + ", ".join(DEFAULT_ARMS) + "); also: " + ", ".join(a.name for a in ARMS if a.extra))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes (1: every job in this process)")
    parser.add_argument("--weights-dir", default=None,
                        help="keep the warm-start weights here and reuse them when the settings match (default: a "
                             "temporary folder)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Warm-start every seed, train every arm, evaluate, write the report."""
    args = parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    opts = {key: (getattr(args, key) if getattr(args, key) is not None else value) for key, value in preset.items()}
    opts["learning_rate"] = args.learning_rate
    names = [n.strip() for n in args.arms.split(",")] if args.arms else list(DEFAULT_ARMS)
    unknown = sorted(set(names) - {a.name for a in ARMS})
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; allowed: {[a.name for a in ARMS]}")
    arms = [a for a in ARMS if a.name in names]
    out = args.out or tempfile.mkdtemp(prefix="trl_aem_context_methods_")
    os.makedirs(out, exist_ok=True)
    started = time.time()
    print(f"[context_methods] {len(arms)} arms x {opts['seeds']} seeds, {opts['steps']} RL steps; {args.workers} "
          f"workers -> {out}", flush=True)
    with tempfile.TemporaryDirectory() as scratch, job_pool(args.workers) as pool:
        weights_dir = args.weights_dir or scratch
        os.makedirs(weights_dir, exist_ok=True)
        weights = {seed: os.path.join(weights_dir, f"seed{seed}.pt") for seed in range(opts["seeds"])}
        warm = [f.result() for f in [pool.submit(warm_start_job, s, opts, weights[s]) for s in weights]]
        for w in warm:
            print(f"[warm start] seed {w['seed']} ({w['sft_rows']} rows, {w['sft_seconds']:.0f}s): "
                  + ", ".join(f"{c} {w[c]['success']:.2f}" for c in CONTEXTS), flush=True)
        # with --weights-dir, every finished run is kept too, and a rerun with the same settings skips it
        kept = {(arm.name, seed): os.path.join(weights_dir, f"run_{arm.name.replace(' ', '_')}_{seed}.json")
                for seed in weights for arm in arms}
        settings = {k: v for k, v in opts.items() if k != "eval_tasks"} | {"eval_tasks": opts["eval_tasks"]}
        jobs = {}
        for seed in weights:
            for arm in arms:
                path = kept[(arm.name, seed)]
                if args.weights_dir and os.path.exists(path):
                    with open(path) as handle:
                        saved = json.load(handle)
                    if saved.get("options") == settings:
                        jobs[(arm.name, seed)] = saved["result"]
                        continue
                jobs[(arm.name, seed)] = pool.submit(train_job, arm, seed, opts, weights[seed])
        pending = {future: key for key, future in jobs.items() if not isinstance(future, dict)}
        for future in as_completed(pending):  # keep each run as soon as it finishes
            jobs[pending[future]] = future.result()
            if args.weights_dir:
                with open(kept[pending[future]], "w") as handle:
                    json.dump({"options": settings, "result": jobs[pending[future]]}, handle)
        steps, finals = [], []
        for (name, seed), result in jobs.items():
            steps.extend(result["steps"])
            finals.append(result["final"])
            f = result["final"]
            print(f"[run] {name:<18} seed {seed}: success {f['final_success']:.2f}, turns {f['final_turns']:.1f}, "
                  f"tokens/rollout {f['final_tokens_per_rollout']:.0f}, {f['train_time_s']:.0f}s", flush=True)
    write_csv(os.path.join(out, "steps.csv"), steps)
    write_csv(os.path.join(out, "final.csv"), finals)
    write_csv(os.path.join(out, "warm_start.csv"),
              [{"seed": w["seed"], "context": c, **w[c]} for w in warm for c in CONTEXTS])
    import transformers
    import trl

    tokenizer = _tokenizer()
    run = {"command": "python benchmarks/context_methods.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "options": opts, "arms": [a.name for a in arms], "workers": args.workers,
           "model_parameters": sum(p.numel() for p in _model(tokenizer, 0, opts["hidden_size"]).parameters()),
           "wall_time_s": round(time.time() - started, 1), "cpu": cpu_label(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    with open(os.path.join(out, "run.json"), "w") as handle:
        json.dump({**run, "warm_start": warm}, handle, indent=2)
    print(write_report(out, run, steps, finals, warm))
    print(f"[context_methods] wrote steps.csv, final.csv, warm_start.csv, summary.md, success.png, run.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
