"""Does AEM's alpha track the Monte-Carlo relative surprisal of responses? The paper's mechanism check, on CPU.

    python benchmarks/mechanism.py --quick                                   # smoke run (under a minute)
    python benchmarks/mechanism.py --out benchmarks/results/mechanism        # the run in docs/benchmarks.md
    python benchmarks/mechanism.py --report-only benchmarks/results/mechanism   # recompute the statistics

The paper (arXiv:2605.00425) reports that ``alpha - 1`` tracks the Monte-Carlo relative surprisal of responses:
r = 0.63, and the same sign in 55 of 64 states. The theory's quantity is ``S(a|s) - H_resp(s)``: the surprisal of
a whole response (``S = -log pi(a|s)``, the sum of its token surprisals) minus the response-level entropy at that
state (``H_resp = E_a[S(a|s)]``). AEM's practical proxy is the span's *mean token entropy*, min-max normalised in
its group. A response with ``S < H_resp`` (more likely than typical) should get ``alpha > 1``, so the check is the
correlation between ``alpha - 1`` and ``-(S - H_resp)``.

Protocol:

1. A tiny Qwen2 (built in code, word-level tokenizer) gets a short supervised warm start on the environment's
   scripted expert (``--sft-steps``), as in ``benchmarks/learning.py``; its policy is imperfect and varied.
2. Rollouts, exactly as ``AEMGRPOTrainer(env=...)`` plays them (``EnvRunner``, ``make_hf_generate_fn`` with the
   entropy recorded during generation, temperature 1, full context): ``--tasks`` tasks x G = 8 episodes.
   Every turn of every episode is a state ``s`` (its context: prompt and all earlier turns and observations) with
   the response ``a`` the rollout sampled there. ``--states`` (64) of them are drawn at random (seeded).
3. At each chosen state, ``--samples`` (N) fresh responses are sampled from the same policy (temperature 1, the
   trainer's end-of-turn ids and per-turn token limit), with the context's KV cache shared by all N. Every
   response's surprisal ``S`` (sum of token surprisals, end-of-turn token included, since it is one of the
   sampled tokens of the span) and mean token entropy are recorded. ``H_resp(s)`` is the mean of ``S`` over the
   N samples, with standard error ``sd(S) / sqrt(N)``.
4. AEM's alpha, two designs, both computed by trl_aem.aem's own functions in the trainer's order
   (``span_mean_entropy`` over the loss mask, NaN for a span with no token, then ``aem_modulation`` with the
   trainer's defaults ``lam=1, min_range=0.1, scope="group"``); the trainer's own method
   (``AEMGRPOTrainer._aem_modulate``) is run on the same tensors and must agree (``trainer_path_max_abs_diff``):

   * **trainer groups** (one response per state, the paper's "64 states"): the rollout's response at the state,
     with the alpha AEM gave it in training: its group is all turns (spans) of the G = 8 episodes of its task.
   * **state groups** (the issue's design): the first G = 8 of the N fresh responses at one state form a group;
     512 responses in all. ``H_resp`` is then estimated from the other N - 8 samples, so that the group's own
     responses do not enter the reference they are compared with.

Statistics (definitions; the paper publishes no code, so which one it used is our reading):

* ``r``: Pearson correlation of ``alpha - 1`` with ``-(S - H_resp)``. For trainer groups over the 64 states, with a
  Fisher-z 95% interval; for state groups over all responses of ungated groups, with a 95% bootstrap interval
  that resamples states (responses of one state are not independent). Spearman's rho beside it.
* ``sign agreement``: states where ``sign(alpha - 1) == sign(-(S - H_resp))``, out of 64, with an exact
  (Clopper-Pearson) 95% interval. Chance is not 1/2 when most responses are both more likely than average and
  up-weighted, so the agreement the two sides' own sign frequencies give by chance is reported beside it, with a
  permutation p (random pairings of the same values); the binomial p against 1/2 is in summary.json. A gated
  response (alpha exactly 1, no sign) counts as a disagreement. For trainer groups this is the paper's "same sign
  in k of 64 states"; for state groups two per-state readings: the state's first response (one draw per state,
  like the trainer design), and the state's within-group correlation being positive.
* The proxy: the same r and sign statistics with the length-normalised surprisal ``S/|a|`` in place of ``S``
  (``-(S/|a| - E[S/|a|])``), and both again on short and long responses separately (split at the median
  length over all responses), to show where mean token entropy stands in for total surprisal and where not.

Outputs in ``--out``: ``states.csv`` (per state: turn, context length, H_resp, its SE, the rollout response's S,
length, mean entropy, alpha, gate), ``responses.csv`` (every state-group response), ``summary.json`` (every
statistic, settings, versions, wall time), ``summary.md`` (the tables) and ``scatter.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time

import _offline  # noqa: F401  (the offline environment, before transformers is imported)
import torch

from trl_aem.aem import aem_modulation, span_mean_entropy, token_entropy_from_logits

from _common import cpu_label

SYSTEM_PROMPT = "you are a helpful agent ."
GROUP_SIZE = 8  # G, the paper's group size
#: Environments: (gymnasium id, knobs, max turns, tokens per turn).
PRESETS = {
    # Pick-and-place, 2 locations, start at the object (the CPU demo's Household preset). Actions are 1 to 7 tokens
    # ("look", "go to desk 1", "take mug 1 from desk 1"): the length spread the proxy check needs.
    "household": ("trl_aem/Household-v0", {"num_locations": 2, "num_distractors": 0, "task_types": ["pick"],
                                           "start_at_object": True, "open_containers": True}, 4, 8),
    # One secret symbol out of 3 (the learning benchmark's task): answers are 2-3 tokens ("guess 2").
    "codebreaker": ("trl_aem/CodeBreaker-v0", {"code_length": 1, "num_symbols": 3, "max_guesses": 3}, 3, 4),
    # TextWorld's coin collector, level 2 (go one room, take the coin); games generated locally (the textworld
    # extra), a few seconds each the first time. Answers are 2-3 tokens ("go west", "take coin").
    "textworld": ("trl_aem/TextWorld-v0", {"challenge": "tw-coin_collector", "settings": {"level": 2}}, 3, 4),
}
#: Expert episodes of the supervised warm start, per preset (TextWorld games cost seconds each to generate).
SFT_SEEDS = {"household": range(10_000, 10_200), "codebreaker": range(10_000, 10_200),
             "textworld": range(100_000, 100_064)}
DEFAULT = dict(states=64, samples=512, tasks=4, sft_steps=40)
QUICK = dict(states=8, samples=32, tasks=1, sft_steps=4)


# ------------------------------------------------------------------------------------------------ model, rollouts
def build_policy(env: str, seed: int, sft_steps: int, hidden_size: int = 128, layers: int = 2):
    """The tokenizer and a tiny Qwen2 warm-started for ``sft_steps`` supervised steps on the env's expert."""
    from transformers import set_seed

    from trl_aem import DEFAULT_PROMPT, expert_sft_dataset, warm_start
    from trl_aem.tiny import build_agent_tokenizer, build_tiny_qwen2

    env_id, env_kwargs, _, _ = PRESETS[env]
    set_seed(seed)
    tokenizer = build_agent_tokenizer(env_id, env_kwargs, DEFAULT_PROMPT, SYSTEM_PROMPT)
    model = build_tiny_qwen2(tokenizer, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, seed=seed)
    if sft_steps > 0:
        data = expert_sft_dataset(env_id, SFT_SEEDS[env], env_kwargs=env_kwargs, system_prompt=SYSTEM_PROMPT)
        with tempfile.TemporaryDirectory() as tmp:
            model = warm_start(model, tokenizer, data, max_steps=sft_steps, output_dir=tmp, seed=seed)
    model.eval()
    return tokenizer, model


def play_groups(model, tokenizer, env: str, num_tasks: int, seed: int):
    """``num_tasks`` tasks x G episodes, played as ``AEMGRPOTrainer(env=...)`` plays them (temperature 1, entropy
    recorded during generation). Returns the episodes, task by task (G consecutive episodes per task)."""
    from transformers import GenerationConfig

    from trl_aem import DEFAULT_PROMPT, EnvRunner, ObservationRenderer, RolloutLimits
    from trl_aem.agents import eos_token_ids
    from trl_aem.generation import make_hf_generate_fn
    from trl_aem.rollout import make_env_factory

    env_id, env_kwargs, max_turns, tokens_per_turn = PRESETS[env]
    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos)
    generate = make_hf_generate_fn(model, tokenizer.pad_token_id, eos, config, record_entropy=True)
    runner = EnvRunner(make_env_factory(env_id, env_kwargs), ObservationRenderer(tokenizer, SYSTEM_PROMPT),
                       RolloutLimits(max_turns, tokens_per_turn, 1024))
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]
    rows = [{"prompt": prompt, "seed": 20_000 + task} for task in range(num_tasks) for _ in range(GROUP_SIZE)]
    torch.manual_seed(seed)
    with torch.no_grad():
        return runner.run(rows, [prompt] * len(rows), generate)


def episode_batch(episodes) -> dict[str, torch.Tensor]:
    """The episodes as the trainer's ``(B, T)`` tensors: completion ids, loss mask, span ids, recorded entropy."""
    width = max(len(e.completion_ids) for e in episodes)
    batch = {"completion_ids": torch.zeros(len(episodes), width, dtype=torch.long),
             "completion_mask": torch.zeros(len(episodes), width, dtype=torch.long),
             "span_ids": torch.full((len(episodes), width), -1, dtype=torch.long),
             "token_entropy": torch.zeros(len(episodes), width)}
    for row, e in enumerate(episodes):
        n = len(e.completion_ids)
        batch["completion_ids"][row, :n] = torch.tensor(e.completion_ids)
        batch["completion_mask"][row, :n] = torch.tensor(e.env_mask)
        batch["span_ids"][row, :n] = torch.tensor(e.span_ids)
        batch["token_entropy"][row, :n] = torch.tensor(e.token_entropy)
    return batch


def aem_alpha(token_entropy: torch.Tensor, loss_mask: torch.Tensor, span_ids: torch.Tensor | None,
              group_size: int = GROUP_SIZE):
    """AEM's alpha per span, by trl_aem.aem's functions in the trainer's order (``AEMGRPOTrainer._aem_modulate``):
    span means over the loss mask, spans without tokens invalid (NaN), groups of ``group_size`` consecutive rows,
    the trainer's defaults (lambda 1, gate 0.1, group scope). Returns (the span table, the AEMResult)."""
    table = span_mean_entropy(token_entropy, loss_mask, span_ids)
    entropy = torch.where(table.num_tokens > 0, table.response_entropy.float(),
                          torch.full_like(table.response_entropy.float(), float("nan")))
    result = aem_modulation(entropy, torch.div(table.row, group_size, rounding_mode="floor"), lam=1.0,
                            min_range=0.1, scope="group", direction="normal")
    return table, result


def trainer_token_alpha(model, tokenizer, env: str, token_entropy, loss_mask, span_ids) -> torch.Tensor:
    """The ``(B, T)`` alpha that ``AEMGRPOTrainer._aem_modulate`` itself gives these spans (base advantages 1), for
    checking that :func:`aem_alpha` is the trainer's computation. Builds a trainer around the model (no training)."""
    from trl_aem import AEMGRPOConfig, AEMGRPOTrainer, make_env_dataset

    env_id, env_kwargs, max_turns, tokens_per_turn = PRESETS[env]
    with tempfile.TemporaryDirectory() as tmp:
        config = AEMGRPOConfig(output_dir=tmp, num_generations=GROUP_SIZE, per_device_train_batch_size=GROUP_SIZE,
                               max_completion_length=1024, env_max_turns=max_turns,
                               env_max_new_tokens_per_turn=tokens_per_turn, env_kwargs=env_kwargs, report_to="none",
                               use_cpu=True, bf16=False, disable_tqdm=True, aem_plots=False)
        trainer = AEMGRPOTrainer(model=model, args=config, processing_class=tokenizer, env=env_id,
                                 train_dataset=make_env_dataset(GROUP_SIZE))
        trainer.model.train()  # training mode: groups of num_generations rows, as in a training step
        output = {"advantages": torch.ones(token_entropy.size(0)), "completion_mask": loss_mask}
        try:
            return trainer._aem_modulate(output, token_entropy, span_ids=span_ids)
        finally:
            model.eval()


def turn_states(episodes) -> list[dict]:
    """Every turn of every episode: its context ids (prompt and everything before the turn), the response's ids, the
    recorded token entropies, the episode (row) and turn index."""
    states = []
    for row, e in enumerate(episodes):
        for turn in range(e.num_turns):
            positions = [j for j, s in enumerate(e.span_ids) if s == turn]
            if not positions:
                continue
            start, end = positions[0], positions[-1] + 1
            states.append({"row": row, "turn": turn, "context": list(e.prompt_ids) + list(e.completion_ids[:start]),
                           "response": list(e.completion_ids[start:end]),
                           "recorded_entropy": list(e.token_entropy[start:end])})
    return states


# ------------------------------------------------------------------------------------------------ sampling, scoring
@torch.no_grad()
def sample_responses(model, context: list[int], num: int, max_new_tokens: int, eos_ids, generator: torch.Generator,
                     temperature: float = 1.0):
    """``num`` responses sampled at one state, the context's KV cache computed once and shared by all.

    Returns ``(tokens, logprobs, entropies, mask)``: ``(num, T)`` tensors of the sampled ids, their log-probability,
    the full-vocabulary entropy of the distribution each was drawn from (``token_entropy_from_logits``, the function
    the trainer records with) and 1 for tokens of the response (through its first end-of-turn id)."""
    out = model(input_ids=torch.tensor([context]), use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num)
    logits = out.logits[:, -1, :].float().expand(num, -1)
    eos = torch.tensor(sorted(eos_ids))
    alive = torch.ones(num, dtype=torch.bool)
    tokens, logprobs, entropies, masks = [], [], [], []
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        token = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
        tokens.append(token)
        logprobs.append(log_probs.gather(1, token[:, None]).squeeze(1))
        entropies.append(token_entropy_from_logits(logits, temperature))
        masks.append(alive.clone())
        alive = alive & ~torch.isin(token, eos)
        if not alive.any() or step == max_new_tokens - 1:
            break
        out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].float()
    mask = torch.stack(masks, dim=1)
    return (torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1) * mask, torch.stack(entropies, dim=1) * mask,
            mask.long())


@torch.no_grad()
def score_response(model, context: list[int], response: list[int], temperature: float = 1.0):
    """``(logprobs, entropies)`` of ``response`` after ``context`` from one forward pass (per token)."""
    ids = torch.tensor([context + response])
    logits = model(input_ids=ids).logits[0, len(context) - 1: len(context) + len(response) - 1].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    return (log_probs.gather(1, torch.tensor(response)[:, None]).squeeze(1),
            token_entropy_from_logits(logits, temperature))


# ------------------------------------------------------------------------------------------------ statistics
def pearson(x, y) -> float:
    """Pearson correlation (NaN if either side is constant or there are fewer than 3 pairs)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(v.numel(), dtype=torch.float64)
        for value in torch.unique(v):  # ties: average rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r
    return pearson(ranks(x), ranks(y))


def fisher_interval(r: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval of a Pearson r from n pairs (Fisher's z transform)."""
    if not math.isfinite(r) or n < 4 or abs(r) >= 1:
        return (float("nan"), float("nan"))
    center, half = math.atanh(r), z / math.sqrt(n - 3)
    return (math.tanh(center - half), math.tanh(center + half))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for k successes out of n, by bisection on the binomial distribution."""
    if n == 0:
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2

    def solve(target, k_, upper):
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            value = _binomial_cdf(k_, n, mid)
            if (value > target) == upper:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(1 - tail, k - 1, True)  # P(X >= k | low) = tail
    high = 1.0 if k == n else solve(tail, k, True)  # P(X <= k | high) = tail
    return (low, high)


def binomial_p(k: int, n: int) -> float:
    """Two-sided exact binomial test of k out of n against probability 1/2 (both tails, doubled, at most 1)."""
    if n == 0:
        return float("nan")
    tail = min(k, n - k)
    return min(1.0, 2 * _binomial_cdf(tail, n, 0.5))


def cluster_bootstrap_r(x, y, cluster, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Pearson r, resampling clusters (states) with replacement."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    cluster = torch.as_tensor(cluster)
    ids = torch.unique(cluster)
    members = [torch.nonzero(cluster == c).squeeze(1) for c in ids]
    rng = random.Random(seed)
    values = []
    for _ in range(reps):
        pick = torch.cat([members[rng.randrange(len(members))] for _ in members])
        r = pearson(x[pick], y[pick])
        if math.isfinite(r):
            values.append(r)
    if not values:
        return (float("nan"), float("nan"))
    values.sort()
    return (values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))])


def sign_stats(alpha_minus_one, target, reps: int = 10_000, seed: int = 0) -> dict:
    """Sign agreement of ``alpha - 1`` with ``target`` (gated, alpha exactly 1, counts as a disagreement).

    Besides the exact binomial test against 1/2, agreement is compared with what the two sides' own sign frequencies
    give by chance: ``chance_rate = P(a > 0) P(t > 0) + P(a < 0) P(t < 0)``, and a permutation p (the share of
    ``reps`` random pairings of the same values that agree at least as often). When most responses are both
    more likely than average and up-weighted, 1/2 is the wrong baseline."""
    a, t = torch.as_tensor(alpha_minus_one, dtype=torch.float64), torch.as_tensor(target, dtype=torch.float64)

    def agreement(x):
        return ((x > 0) & (t > 0) | (x < 0) & (t < 0)).sum(dim=-1)

    agree = int(agreement(a))
    n = a.numel()
    low, high = clopper_pearson(agree, n)
    out = {"agree": agree, "n": n, "rate": agree / n if n else float("nan"), "ci95": [low, high],
           "gated": int((a == 0).sum()), "binomial_p_vs_half": binomial_p(agree, n) if n else float("nan")}
    if n:
        chance = float((a > 0).double().mean() * (t > 0).double().mean() + (a < 0).double().mean()
                       * (t < 0).double().mean())
        g = torch.Generator().manual_seed(seed)
        shuffled = a[torch.argsort(torch.rand(reps, n, generator=g, dtype=torch.float64), dim=1)]
        out.update(chance_rate=chance, permutation_p=float((agreement(shuffled) >= agree).double().mean()),
                   share_alpha_above_1=float((a > 0).double().mean()),
                   share_target_positive=float((t > 0).double().mean()))
    return out


def correlation_stats(alpha_minus_one, target, cluster=None) -> dict:
    """Pearson r (Fisher or cluster-bootstrap 95% interval), Spearman rho and n."""
    r = pearson(alpha_minus_one, target)
    n = len(alpha_minus_one)
    interval = (cluster_bootstrap_r(alpha_minus_one, target, cluster) if cluster is not None
                else fisher_interval(r, n))
    return {"r": r, "ci95": list(interval), "spearman": spearman(alpha_minus_one, target), "n": n,
            "interval": "bootstrap over states" if cluster is not None else "Fisher z"}


# ------------------------------------------------------------------------------------------------ the run
def run(opts) -> dict:
    """The whole check; returns the summary dictionary (also written to ``opts.out``)."""
    started = time.time()
    env_id, env_kwargs, max_turns, tokens_per_turn = PRESETS[opts.env]
    tokenizer, model = build_policy(opts.env, opts.seed, opts.sft_steps)
    from trl_aem.agents import eos_token_ids

    eos = set(eos_token_ids(model, tokenizer))
    t0 = time.time()
    episodes = play_groups(model, tokenizer, opts.env, opts.tasks, opts.seed)
    batch = episode_batch(episodes)
    table, result = aem_alpha(batch["token_entropy"], batch["completion_mask"], batch["span_ids"])
    trainer_alpha = trainer_token_alpha(model, tokenizer, opts.env, batch["token_entropy"], batch["completion_mask"],
                                        batch["span_ids"])
    ours = torch.ones_like(trainer_alpha)
    ours[table.span_index >= 0] = result.alpha.float()[table.span_index[table.span_index >= 0]]
    trainer_diff = float((ours - trainer_alpha.float()).abs().max())
    span_of = {(int(r), int(s)): k for k, (r, s) in enumerate(zip(table.row, table.span_id))}
    rollout_seconds = time.time() - t0

    states = turn_states(episodes)
    rng = random.Random(opts.seed)
    chosen = sorted(rng.sample(range(len(states)), min(opts.states, len(states))))
    generator = torch.Generator().manual_seed(opts.seed)
    state_rows, response_rows, score_check = [], [], 0.0
    t0 = time.time()
    for index, k in enumerate(chosen):
        state = states[k]
        tokens, logprobs, entropies, mask = sample_responses(model, state["context"], opts.samples, tokens_per_turn,
                                                             eos, generator)
        lengths = mask.sum(1)
        surprisal = -logprobs.double().sum(1)
        mean_entropy = (entropies.double().sum(1) / lengths)
        norm_surprisal = surprisal / lengths
        # the rollout's own response at this state: S from a forward pass, alpha from its training group
        logp, _ = score_response(model, state["context"], state["response"])
        span = span_of[(state["row"], state["turn"])]
        if index == 0:  # the sampler's log-probabilities against a plain forward pass on the same response
            first = tokens[0, : int(lengths[0])].tolist()
            check, _ = score_response(model, state["context"], first)
            score_check = float((check.double() - logprobs[0, : len(first)].double()).abs().max())
        s_roll, n_roll = float(-logp.double().sum()), len(state["response"])
        h_all, se_all = float(surprisal.mean()), float(surprisal.std() / math.sqrt(opts.samples))
        hn_all = float(norm_surprisal.mean())
        state_rows.append({
            "state": index, "episode": state["row"], "task": state["row"] // GROUP_SIZE, "turn": state["turn"],
            "context_tokens": len(state["context"]), "H_resp": h_all, "H_resp_se": se_all,
            "S_sd": float(surprisal.std()), "mean_len": float(lengths.double().mean()),
            "E_norm_surprisal": hn_all, "rollout_S": s_roll, "rollout_len": n_roll,
            "rollout_mean_entropy": float(table.response_entropy[span]), "rollout_alpha": float(result.alpha[span]),
            "rollout_gated": bool(result.gated[span]), "rollout_rel_surprisal": s_roll - h_all,
            "rollout_rel_norm_surprisal": s_roll / n_roll - hn_all,
        })
        # state group: the first G fresh responses; H_resp from the other N - G
        g_table, g_result = aem_alpha(entropies[:GROUP_SIZE], mask[:GROUP_SIZE], None)
        ref = surprisal[GROUP_SIZE:]
        h_ref, se_ref, hn_ref = float(ref.mean()), float(ref.std() / math.sqrt(ref.numel())), \
            float(norm_surprisal[GROUP_SIZE:].mean())
        for j in range(GROUP_SIZE):
            response_rows.append({
                "state": index, "response": j, "length": int(lengths[j]), "S": float(surprisal[j]),
                "mean_entropy": float(mean_entropy[j]), "norm_S": float(norm_surprisal[j]), "H_resp": h_ref,
                "H_resp_se": se_ref, "E_norm_S": hn_ref, "alpha": float(g_result.alpha[j]),
                "gated": bool(g_result.gated[j]), "rel_S": float(surprisal[j]) - h_ref,
                "rel_norm_S": float(norm_surprisal[j]) - hn_ref,
                "text": tokenizer.decode(tokens[j, : int(lengths[j])].tolist(), skip_special_tokens=False),
            })
    sampling_seconds = time.time() - t0
    summary = analyse(state_rows, response_rows)
    summary.update({
        "settings": {"env": env_id, "env_kwargs": env_kwargs, "max_turns": max_turns,
                     "tokens_per_turn": tokens_per_turn, "group_size": GROUP_SIZE, "states": len(chosen),
                     "states_available": len(states), "samples_per_state": opts.samples, "tasks": opts.tasks,
                     "sft_steps": opts.sft_steps, "seed": opts.seed, "temperature": 1.0, "aem_lambda": 1.0,
                     "aem_min_entropy_range": 0.1, "model_parameters": sum(p.numel() for p in model.parameters())},
        "checks": {"trainer_path_max_abs_diff": trainer_diff, "sampler_vs_forward_logprob_max_abs_diff": score_check},
        "rollout_success_rate": sum(e.success for e in episodes) / len(episodes),
        "seconds": {"rollouts": round(rollout_seconds, 1), "sampling": round(sampling_seconds, 1),
                    "total": round(time.time() - started, 1)},
        "command": "python benchmarks/mechanism.py " + " ".join(opts.argv),
        "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_label(),
    })
    write_outputs(opts.out, summary, state_rows, response_rows)
    return summary


def analyse(state_rows: list[dict], response_rows: list[dict]) -> dict:
    """Every statistic of the check from the per-state and per-response rows (see the module docstring)."""
    out: dict = {}
    # trainer groups: one response per state
    a1 = [s["rollout_alpha"] - 1 for s in state_rows]
    y = [-s["rollout_rel_surprisal"] for s in state_rows]
    yn = [-s["rollout_rel_norm_surprisal"] for s in state_rows]
    out["trainer_groups"] = {
        "surprisal": {**correlation_stats(a1, y), "sign": sign_stats(a1, y)},
        "norm_surprisal": {**correlation_stats(a1, yn), "sign": sign_stats(a1, yn)},
        "gated_states": sum(s["rollout_gated"] for s in state_rows),
    }
    # state groups: G responses per state
    ungated = [r for r in response_rows if not r["gated"]]
    first = [r for r in response_rows if r["response"] == 0]
    section: dict = {"gated_states": len({r["state"] for r in response_rows if r["gated"]}),
                     "responses": len(response_rows), "ungated_responses": len(ungated)}
    for key, field in (("surprisal", "rel_S"), ("norm_surprisal", "rel_norm_S")):
        x = [r["alpha"] - 1 for r in ungated]
        t = [-r[field] for r in ungated]
        within = []
        for state in sorted({r["state"] for r in response_rows}):
            rows = [r for r in response_rows if r["state"] == state]
            within.append(pearson([r["alpha"] - 1 for r in rows], [-r[field] for r in rows]))
        positive = sum(1 for w in within if math.isfinite(w) and w > 0)
        lo, hi = clopper_pearson(positive, len(within))
        section[key] = {
            **correlation_stats(x, t, cluster=[r["state"] for r in ungated]),
            "sign_first_response": sign_stats([r["alpha"] - 1 for r in first], [-r[field] for r in first]),
            "sign_all_responses": sign_stats(x, t),
            "states_with_positive_within_r": {"count": positive, "n": len(within), "ci95": [lo, hi],
                                              "binomial_p_vs_half": binomial_p(positive, len(within))},
        }
    lengths = sorted(r["length"] for r in ungated)
    if lengths:
        cut = lengths[len(lengths) // 2]
        for name, keep in (("short", lambda r: r["length"] < cut), ("long", lambda r: r["length"] >= cut)):
            rows = [r for r in ungated if keep(r)]
            if len(rows) >= 3:
                section[f"{name}_responses"] = {
                    "length_rule": f"length {'<' if name == 'short' else '>='} {cut} tokens", "n": len(rows),
                    "surprisal": correlation_stats([r["alpha"] - 1 for r in rows], [-r["rel_S"] for r in rows],
                                                   cluster=[r["state"] for r in rows]),
                    "norm_surprisal": correlation_stats([r["alpha"] - 1 for r in rows],
                                                        [-r["rel_norm_S"] for r in rows],
                                                        cluster=[r["state"] for r in rows]),
                    "sign_surprisal": sign_stats([r["alpha"] - 1 for r in rows], [-r["rel_S"] for r in rows]),
                }
        section["length_vs_rel_S_r"] = pearson([r["length"] for r in ungated], [r["rel_S"] for r in ungated])
    out["state_groups"] = section
    out["decomposition"] = decomposition(response_rows)
    se = sorted(s["H_resp_se"] for s in state_rows)
    spread = sorted(abs(s["rollout_rel_surprisal"]) for s in state_rows)
    out["H_resp"] = {"mean": sum(s["H_resp"] for s in state_rows) / len(state_rows),
                     "se_median": se[len(se) // 2], "se_max": se[-1],
                     "median_abs_rel_surprisal": spread[len(spread) // 2]}
    out["paper"] = {"r": 0.63, "sign_agreement": "55/64"}
    return out


def decomposition(response_rows: list[dict]) -> dict:
    """How much of the relative surprisal any entropy-based proxy can see.

    Along a sampled response, ``S(a) = sum_j H_j + sum_j (s_j - H_j)``: the entropies ``H_j`` of the distributions
    the tokens were drawn from, plus the realised part ``s_j - H_j`` (each token's surprisal minus its
    distribution's entropy), which has mean zero given the prefix and is invisible to anything computed from the
    entropies. Reported over all state-group responses, within states (each state's mean removed): the correlation
    of ``-(S - H_resp)`` with the path-entropy sum and with the mean token entropy (AEM's ``Hbar``), and the standard
    deviations of ``S - H_resp`` and of the realised part."""
    by_state: dict[int, list[dict]] = {}
    for r in response_rows:
        by_state.setdefault(r["state"], []).append(r)
    rel, path_sum, mean_h, realised = [], [], [], []
    for rows in by_state.values():
        sums = [r["mean_entropy"] * r["length"] for r in rows]
        means = [r["mean_entropy"] for r in rows]
        for r, total, mean in zip(rows, sums, means):
            rel.append(-r["rel_S"])
            path_sum.append(-(total - sum(sums) / len(sums)))
            mean_h.append(-(mean - sum(means) / len(means)))
            realised.append(r["S"] - total)
    sd = lambda v: float(torch.tensor(v, dtype=torch.float64).std()) if len(v) > 1 else float("nan")  # noqa: E731
    return {"r_with_path_entropy_sum": pearson(rel, path_sum), "r_with_mean_token_entropy": pearson(rel, mean_h),
            "sd_rel_surprisal": sd(rel), "sd_realised_part": sd(realised), "n": len(rel)}


def fmt_corr(c: dict) -> str:
    """``r [lo, hi] (rho)`` for a table cell."""
    return f"{c['r']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] (rho {c['spearman']:+.2f})"


def fmt_sign(s: dict) -> str:
    """``k/n [lo%, hi%], chance x%, permutation p`` for a table cell."""
    return (f"{s['agree']}/{s['n']} [{s['ci95'][0]:.0%}, {s['ci95'][1]:.0%}]; chance {s['chance_rate']:.0%}, "
            + (f"permutation p {s['permutation_p']:.2g}" if s["permutation_p"] > 0 else "permutation p < 1e-4")
            + (f"; {s['gated']} gated" if s["gated"] else ""))


def report(summary: dict) -> str:
    """summary.md: the tables."""
    tg, sg, st = summary["trainer_groups"], summary["state_groups"], summary["settings"]
    lines = [
        f"# AEM mechanism check ({st['env']}, {st['states']} states, N = {st['samples_per_state']} samples each)",
        "",
        "| design | target | r [95% CI] (Spearman) | same sign, of states [95% CI]; chance from the sign frequencies, "
        "permutation p |",
        "|---|---|---|---|",
        "| paper | -(S - H_resp) | +0.63 | 55/64 |",
        f"| trainer groups, one response per state | -(S - H_resp) | {fmt_corr(tg['surprisal'])} | "
        f"{fmt_sign(tg['surprisal']['sign'])} |",
        f"| trainer groups, one response per state | -(S/len - E[S/len]) | {fmt_corr(tg['norm_surprisal'])} | "
        f"{fmt_sign(tg['norm_surprisal']['sign'])} |",
    ]
    for key, label in (("surprisal", "-(S - H_resp)"), ("norm_surprisal", "-(S/len - E[S/len])")):
        c = sg[key]
        pos = c["states_with_positive_within_r"]
        lines.append(f"| state groups (G = 8 at one state), all ungated responses | {label} | {fmt_corr(c)} | "
                     f"first response: {fmt_sign(c['sign_first_response'])}; within-state r > 0: "
                     f"{pos['count']}/{pos['n']} |")
    lines += ["", "| state-group responses | n | r with -(S - H_resp) | r with -(S/len - E[S/len]) | same sign as "
              "-(S - H_resp) |", "|---|---|---|---|---|"]
    for name in ("short", "long"):
        part = sg.get(f"{name}_responses")
        if part:
            lines.append(f"| {name} ({part['length_rule']}) | {part['n']} | {fmt_corr(part['surprisal'])} | "
                         f"{fmt_corr(part['norm_surprisal'])} | {fmt_sign(part['sign_surprisal'])} |")
    d = summary["decomposition"]
    lines += ["", f"What entropies can see (state groups, within states, n = {d['n']}): r of -(S - H_resp) with "
              "minus the "
              f"path-entropy sum {d['r_with_path_entropy_sum']:+.2f}, with minus the mean token entropy (AEM's Hbar) "
              f"{d['r_with_mean_token_entropy']:+.2f}; sd of S - H_resp {d['sd_rel_surprisal']:.2f} nats, of its "
              f"realised part S - sum_j H_j {d['sd_realised_part']:.2f} nats."]
    h = summary["H_resp"]
    lines += ["", f"H_resp: mean {h['mean']:.3f} nats; its Monte-Carlo standard error median {h['se_median']:.4f}, "
              f"max {h['se_max']:.4f} (median |S - H_resp| of the rollout responses "
              f"{h['median_abs_rel_surprisal']:.3f}). "
              f"Gated states: trainer groups {tg['gated_states']}, state groups {sg['gated_states']}. "
              f"Correlation of response length with S - H_resp: {sg.get('length_vs_rel_S_r', float('nan')):+.2f}.",
              f"Checks: alpha of trl_aem.aem's functions vs AEMGRPOTrainer._aem_modulate, max |diff| "
              f"{summary['checks']['trainer_path_max_abs_diff']:.2e}; sampler log-probabilities vs a forward pass, max "
              f"|diff| {summary['checks']['sampler_vs_forward_logprob_max_abs_diff']:.2e}. Rollout success "
              f"{summary['rollout_success_rate']:.1%}. Wall time {summary['seconds']['total']:.0f} s."]
    return "\n".join(lines)


def write_outputs(out: str, summary: dict, state_rows: list[dict], response_rows: list[dict]) -> None:
    """states.csv, responses.csv, summary.json, summary.md, scatter.png in ``out``."""
    import csv

    os.makedirs(out, exist_ok=True)
    for name, rows in (("states.csv", state_rows), ("responses.csv", response_rows)):
        with open(os.path.join(out, name), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    text = report(summary)
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(text + "\n")
    write_scatter(os.path.join(out, "scatter.png"), state_rows, response_rows)


def write_scatter(path: str, state_rows: list[dict], response_rows: list[dict]) -> None:
    """alpha - 1 against -(S - H_resp): trainer groups, state groups, and state groups against -(S/len - E)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].scatter([-s["rollout_rel_surprisal"] for s in state_rows], [s["rollout_alpha"] - 1 for s in state_rows],
                    s=14, c=[s["turn"] for s in state_rows], cmap="viridis")
    axes[0].set_title("trainer groups: rollout response per state\n(colour: turn)")
    axes[0].set_xlabel("-(S - H_resp)  [nats]")
    lengths = [r["length"] for r in response_rows]
    for ax, key, label in ((axes[1], "rel_S", "-(S - H_resp)  [nats]"),
                           (axes[2], "rel_norm_S", "-(S/len - E[S/len])  [nats/token]")):
        points = ax.scatter([-r[key] for r in response_rows], [r["alpha"] - 1 for r in response_rows], s=8,
                            c=lengths, cmap="plasma", alpha=0.7)
        ax.set_xlabel(label)
        ax.set_title("state groups: G = 8 fresh responses per state\n(colour: length in tokens)")
    fig.colorbar(points, ax=axes[2])
    for ax in axes:
        ax.axhline(0, color="gray", lw=0.6)
        ax.axvline(0, color="gray", lw=0.6)
        ax.set_ylabel("alpha - 1")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few states and samples")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--env", choices=sorted(PRESETS), default="household")
    parser.add_argument("--states", type=int, help=f"states (default {DEFAULT['states']})")
    parser.add_argument("--samples", type=int, help=f"fresh responses per state, N (default {DEFAULT['samples']})")
    parser.add_argument("--tasks", type=int, help=f"rollout tasks x {GROUP_SIZE} episodes (default {DEFAULT['tasks']})")
    parser.add_argument("--sft-steps", type=int, help=f"warm-start steps (default {DEFAULT['sft_steps']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    opts = parser.parse_args(argv)
    for key, value in (QUICK if opts.quick else DEFAULT).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.samples <= GROUP_SIZE + 1:
        parser.error(f"--samples must be > {GROUP_SIZE + 1}")
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    return opts


def report_only(out: str) -> dict:
    """Recompute every statistic from a finished run's states.csv and responses.csv (settings, checks and times
    kept from its summary.json) and rewrite its outputs."""
    import csv

    def typed(value: str):
        if value in ("True", "False"):
            return value == "True"
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return value

    rows = {}
    for name in ("states.csv", "responses.csv"):
        with open(os.path.join(out, name), newline="") as handle:
            rows[name] = [{k: (v if k == "text" else typed(v)) for k, v in r.items()} for r in csv.DictReader(handle)]
    with open(os.path.join(out, "summary.json")) as handle:
        old = json.load(handle)
    summary = analyse(rows["states.csv"], rows["responses.csv"])
    summary.update({key: value for key, value in old.items() if key not in summary})
    write_outputs(out, summary, rows["states.csv"], rows["responses.csv"])
    return summary


def main(argv=None) -> int:
    """Run the check (or, with ``--report-only DIR``, re-read one), print the tables."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report-only"]:
        print(report(report_only(argv[1])))
        return 0
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.out is None:
        opts.out = tempfile.mkdtemp(prefix="aem_mechanism_")
    summary = run(opts)
    print(report(summary))
    print(f"[mechanism] wrote states.csv, responses.csv, summary.json, summary.md, scatter.png to {opts.out}")
    return 0


if __name__ == "__main__":
    from trl_aem.scripts import quiet_known_noise

    quiet_known_noise()
    sys.exit(main())
