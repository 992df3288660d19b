"""benchmarks/mechanism.py, sign_rule.py and entropy_dynamics.py (issue 15): their statistics against hand-computed
values, the sampler against a forward pass, alpha against the trainer's own method, the sign rule's first-order
exactness for the natural gradient, and --quick smoke runs (marked slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")


@pytest.fixture(scope="module")
def mechanism():
    return load_script("benchmarks/mechanism.py", "mechanism")


@pytest.fixture(scope="module")
def sign_rule():
    return load_script("benchmarks/sign_rule.py", "sign_rule")


@pytest.fixture(scope="module")
def dynamics():
    return load_script("benchmarks/entropy_dynamics.py", "entropy_dynamics")


# ------------------------------------------------------------------------------------------------ statistics
def test_exact_binomial_interval_and_test(mechanism):
    # R: binom.test(55, 64)$conf.int = 0.7497... 0.9336...; two-sided p against 1/2
    low, high = mechanism.clopper_pearson(55, 64)
    assert low == pytest.approx(0.74976, abs=1e-4) and high == pytest.approx(0.93363, abs=1e-4)
    assert mechanism.clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-6))
    assert mechanism.binomial_p(5, 10) == 1.0
    assert mechanism.binomial_p(10, 10) == pytest.approx(2 / 1024)
    assert mechanism.binomial_p(1, 10) == pytest.approx(2 * 11 / 1024)


def test_correlations_and_sign_agreement(mechanism):
    assert mechanism.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert mechanism.pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(mechanism.pearson([1, 1, 1], [1, 2, 3]))
    assert mechanism.spearman([1, 2, 3, 10], [1, 4, 9, 11]) == pytest.approx(1.0)  # monotone, not linear
    low, high = mechanism.fisher_interval(0.63, 64)
    assert low < 0.63 < high and low == pytest.approx(math.tanh(math.atanh(0.63) - 1.959964 / math.sqrt(61)))
    # gated responses (alpha exactly 1) count as disagreements
    stats = mechanism.sign_stats([0.2, -0.1, 0.0, 0.3], [1.0, -2.0, 5.0, -1.0])
    assert stats["agree"] == 2 and stats["n"] == 4 and stats["gated"] == 1
    # chance from the sign frequencies: P(a>0) P(t>0) + P(a<0) P(t<0) = .5 * .5 + .25 * .5
    assert stats["chance_rate"] == pytest.approx(0.375) and 0 < stats["permutation_p"] <= 1
    # agreement that the base rates alone explain is not significant; a perfect pairing of balanced signs is
    assert mechanism.sign_stats([1.0] * 9 + [-1.0], [1.0] * 9 + [-1.0])["permutation_p"] == pytest.approx(0.1, abs=0.02)
    balanced = [1.0, -1.0] * 10
    assert mechanism.sign_stats(balanced, balanced)["permutation_p"] < 1e-3


def test_decomposition_of_relative_surprisal(mechanism):
    # S equal to the path-entropy sum (no realised part): entropies see all of S - H_resp
    rows = []
    for state in range(3):
        for j, (mean_entropy, length) in enumerate([(0.5, 2), (1.0, 3), (2.0, 2), (0.7, 4)]):
            total = mean_entropy * length
            rows.append({"state": state, "response": j, "mean_entropy": mean_entropy, "length": length, "S": total,
                         "rel_S": total - 3.0})
    d = mechanism.decomposition(rows)
    assert d["r_with_path_entropy_sum"] == pytest.approx(1.0) and d["sd_realised_part"] == pytest.approx(0.0)
    assert d["n"] == 12


def test_cluster_bootstrap_interval_covers_r(mechanism):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g)
    y = x + 0.5 * torch.randn(200, generator=g)
    r = mechanism.pearson(x, y)
    low, high = mechanism.cluster_bootstrap_r(x, y, torch.arange(200) // 8, reps=300)
    assert low < r < high and high - low < 0.3


def test_t_quantiles_and_power(dynamics):
    assert dynamics.t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-3)
    assert dynamics.t_quantile(0.80, 9) == pytest.approx(0.8834, abs=1e-3)
    assert dynamics.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-2)
    assert dynamics.minimum_detectable_difference(10.0, 10) == pytest.approx((2.2622 + 0.8834) * 10 / math.sqrt(10),
                                                                              abs=1e-2)
    mean, low, high = dynamics.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)


def test_fisher_exact(dynamics):
    # R: fisher.test(matrix(c(2, 8, 0, 30), 2))$p.value = 0.0577 (2 of 10 against 0 of 30)
    assert dynamics.fisher_exact_p(2, 10, 0, 30) == pytest.approx(0.05769, abs=1e-4)
    assert dynamics.fisher_exact_p(2, 10, 0, 10) == pytest.approx(0.4737, abs=1e-4)
    assert dynamics.fisher_exact_p(3, 10, 3, 10) == pytest.approx(1.0)


def test_paired_comparison_and_collapse(dynamics):
    p = dynamics.paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.4})
    assert p["n"] == 3 and p["mean_diff"] == pytest.approx(0.2) and p["wins"] == 3
    assert p["p_sign_flip"] == pytest.approx(2 / 8)
    # entropy 2.0 falls below 1.0 (half) in the trailing mean of 3 at the 5th rollout (RL step 9)
    c = dynamics.collapse_stats([1, 3, 5, 7, 9, 11], [2.0, 1.9, 1.5, 0.6, 0.4, 0.3])
    assert c["collapse_step"] == 9 and c["largest_drop"] == pytest.approx(0.9) and c["largest_drop_step"] == 7
    assert dynamics.collapse_stats([1, 3], [2.0, 1.9])["collapse_step"] is None


def _fake_rows(dynamics, seeds=3, partial_seed=True):
    step_rows, finals = [], []
    for arm in dynamics.ARM_NAMES:
        for seed in range(seeds + (1 if partial_seed and arm == "GRPO" else 0)):
            fast = arm == "GRPO"
            for i, step in enumerate(range(1, 13, 2)):
                entropy = 2.0 * (0.5 if fast else 0.8) ** i
                step_rows.append({"arm": arm, "seed": seed, "step": step, "span_entropy": entropy,
                                  "success_rate": 0.1 * i})
            finals.append({"arm": arm, "seed": seed, "final_success": 0.3 + 0.1 * (arm == "AEM-GRPO") + 0.01 * seed,
                           "warm_start_success": 0.2, "warm_start_greedy": 0.4})
    return step_rows, finals


def test_analysis_on_synthetic_runs(dynamics, tmp_path):
    step_rows, finals = _fake_rows(dynamics)
    result = dynamics.analyse(step_rows, finals)
    assert result["seeds"] == [0, 1, 2] and result["incomplete_seeds_left_out"] == [3]
    main = result["paired_success"]["AEM-GRPO - GRPO"]
    assert main["mean_diff"] == pytest.approx(0.1) and main["wins"] == 3 and main["sd_diff"] == pytest.approx(0)
    # GRPO halves its entropy every rollout (2, 1, .5, .25): trailing mean of 3 below 1.0 at the 4th rollout (step 7);
    # AEM's falls by 0.8 per rollout: (1.024 + 0.819 + 0.655) / 3 < 1.0 at the 6th (step 11)
    assert result["collapse"]["GRPO"]["collapse_steps"] == [7, 7, 7]
    assert result["collapse"]["AEM-GRPO"]["collapse_steps"] == [11, 11, 11]
    assert result["collapse_paired"]["grpo_collapses_earlier"] == 3
    assert result["collapse_paired"]["AEM-GRPO - GRPO (collapse step, never = last step + 1)"]["mean_diff"] == 4
    early = result["entropy_thirds_paired"]["AEM-GRPO - GRPO"][0]
    assert early["mean_diff"] > 0  # AEM's entropy higher in the first third
    text = dynamics.report(result, {"command": "x", "cpu": "cpu", "wall_time_s": 1.0,
                                    "options": {"steps": 12, "tasks_per_step": 2, "num_generations": 4,
                                                "num_iterations": 2, "learning_rate": 1e-3, "sft_steps": 1,
                                                "eval_tasks": 8}})
    assert "| AEM-GRPO - GRPO | +10.0 |" in text and "Seeds [3] did not finish" in text and "## Power" in text
    dynamics.write_plot(str(tmp_path / "bands.png"), step_rows, result["seeds"])
    assert (tmp_path / "bands.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_appends_rows(dynamics, tmp_path):
    rows = [{"arm": "GRPO", "seed": 0, "x": 1}]
    dynamics._append_csv(str(tmp_path / "f.csv"), rows)
    dynamics._append_csv(str(tmp_path / "f.csv"), [{"arm": "GRPO", "seed": 1, "x": 2}])
    back = dynamics._read_csv(str(tmp_path / "f.csv"))
    assert [r["seed"] for r in back] == ["0", "1"]


# ------------------------------------------------------------------------------------------------ mechanism pieces
@pytest.fixture(scope="module")
def codebreaker_policy(mechanism):
    torch.manual_seed(0)
    return mechanism.build_policy("codebreaker", seed=0, sft_steps=0, hidden_size=32, layers=1)


def test_sampler_matches_a_forward_pass(mechanism, codebreaker_policy):
    tokenizer, model = codebreaker_policy
    context = tokenizer.apply_chat_template([{"role": "user", "content": "guess 1 ."}], add_generation_prompt=True,
                                            tokenize=False)
    context = tokenizer(context, add_special_tokens=False)["input_ids"]
    eos = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    tokens, logps, entropies, mask = mechanism.sample_responses(model, context, 16, 4, eos,
                                                                torch.Generator().manual_seed(0))
    assert tokens.shape == logps.shape == entropies.shape == mask.shape and tokens.size(0) == 16
    for row in range(16):
        n = int(mask[row].sum())
        assert n >= 1 and mask[row, :n].all() and not mask[row, n:].any()
        if n < tokens.size(1):  # stopped: its last token is the end-of-turn id
            assert int(tokens[row, n - 1]) in eos
        response = tokens[row, :n].tolist()
        ref_logp, ref_entropy = mechanism.score_response(model, context, response)
        assert torch.allclose(logps[row, :n], ref_logp, atol=1e-4)
        assert torch.allclose(entropies[row, :n], ref_entropy, atol=1e-4)
        assert (logps[row, n:] == 0).all() and (entropies[row, n:] == 0).all()


def test_alpha_is_the_trainers(mechanism, codebreaker_policy):
    tokenizer, model = codebreaker_policy
    g = torch.Generator().manual_seed(1)
    entropy = torch.rand(16, 10, generator=g) * 3
    mask = (torch.rand(16, 10, generator=g) > 0.2).long()
    mask[3] = 0  # a row with no token: its span is invalid (alpha 1)
    span_ids = torch.where(mask.bool(), torch.arange(10).expand(16, 10) // 4, torch.full((16, 10), -1))
    table, result = mechanism.aem_alpha(entropy, mask, span_ids)
    ours = torch.ones(16, 10)
    inside = table.span_index >= 0
    ours[inside] = result.alpha.float()[table.span_index[inside]]
    theirs = mechanism.trainer_token_alpha(model, tokenizer, "codebreaker", entropy, mask, span_ids)
    assert torch.allclose(ours, theirs.float(), atol=1e-6)
    # groups of 8 rows: alpha averages 1 over each group's valid spans
    for group in (0, 1):
        chosen = (torch.div(table.row, 8, rounding_mode="floor") == group) & result.valid
        assert float(result.alpha[chosen].double().mean()) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ sign rule pieces
def test_enumerated_responses_are_a_distribution(sign_rule):
    responses = sign_rule.all_responses()
    assert len(responses) == 1 + 5 + 25 + 125 and len({tuple(r) for r in responses}) == len(responses)
    model = sign_rule.build_policy(0, 0.5, hidden_size=16, layers=1)
    with torch.no_grad():
        logps = sign_rule.response_logprobs(model, [1, 2, 3], responses)
    assert float(logps.exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_adam_first_step_direction(sign_rule):
    model = sign_rule.build_policy(0, 0.5, hidden_size=16, layers=1)
    response = [2, 4, sign_rule.EOS]
    moved = sign_rule.optimizer_step(model, [0, 1], response, -1.0, "adam", 1e-3)
    logp = sign_rule.response_logprobs(model, [0, 1], [response])[0]
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp, list(model.parameters()))])
    expected = 1e-3 * -1.0 * sign_rule.adam_direction(grad)
    assert torch.allclose(sign_rule.flat_update(model, moved), expected, atol=1e-9)


def test_natural_gradient_follows_the_rule_to_first_order(sign_rule):
    # The network's natural gradient of log pi(a) moves every log-probability as the tabular one does,
    # d log pi(b) = 1[b = a] / pi(a) - 1, so the first-order entropy change is exactly S(a) - H_resp.
    model = sign_rule.build_policy(0, 0.5, hidden_size=16, layers=1)
    responses = sign_rule.all_responses()
    prompt = [3, 1, 4]
    with torch.no_grad():
        logps = sign_rule.response_logprobs(model, prompt, responses).double()
    probs = logps.exp()
    entropy = sign_rule.entropy_of(logps)
    jac = sign_rule.jacobian(model, prompt, responses)
    fisher = sign_rule.FisherFactors(jac, probs)
    assert fisher.rank == len(responses) - 1
    typical = int(torch.argsort(probs)[len(responses) // 2])  # the median-probability response
    for k in (0, 7, int(probs.argmax()), typical):
        moved = jac @ fisher.natural_gradient(k)
        tabular = -torch.ones_like(moved)
        tabular[k] += 1 / probs[k]
        assert torch.allclose(moved, tabular, rtol=1e-3, atol=1e-3 * float(tabular.abs().max()))
        first_order = float(-(probs * (logps + 1) * moved).sum())
        assert first_order == pytest.approx(float(-logps[k]) - entropy, rel=1e-3, abs=1e-6)


# ------------------------------------------------------------------------------------------------ smoke runs
@pytest.mark.slow
def test_quick_mechanism_run(tmp_path):
    out = tmp_path / "mech"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mechanism.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checks"]["trainer_path_max_abs_diff"] < 1e-6
    assert summary["checks"]["sampler_vs_forward_logprob_max_abs_diff"] < 1e-4
    assert summary["settings"]["states"] == 8 and summary["paper"]["r"] == 0.63
    import csv

    with open(out / "responses.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 * 8
    for state in {r["state"] for r in rows}:
        alphas = [float(r["alpha"]) for r in rows if r["state"] == state]
        assert sum(alphas) / len(alphas) == pytest.approx(1.0, abs=1e-5)  # every group: mean alpha 1
    for r in rows:
        assert float(r["S"]) > 0 and 1 <= int(r["length"]) <= 8 and float(r["H_resp_se"]) > 0
    for name in ("states.csv", "summary.md", "scatter.png"):
        assert (out / name).stat().st_size > 0
    assert "| paper | -(S - H_resp) | +0.63 | 55/64 |" in proc.stdout


@pytest.mark.slow
def test_quick_sign_rule_run(tmp_path):
    out = tmp_path / "sign"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sign_rule.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["natural/small"]["agree_first_order_rate"] == 1.0
    assert set(summary["results"]) == {f"{o}/{s}" for o in ("natural", "sgd", "adam") for s in ("small", "large")}
    assert (out / "sign_rule.png").stat().st_size > 0 and (out / "steps.csv").stat().st_size > 0


@pytest.mark.slow
def test_quick_entropy_dynamics_run_and_resume(tmp_path):
    out = tmp_path / "dyn"
    script = str(ROOT / "benchmarks" / "entropy_dynamics.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--steps", "2", "--out", str(out)],  # 2 spawned workers
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "dynamics.json").read_text())
    assert result["arms"] == ["GRPO", "AEM-GRPO"] and result["seeds"] == [0, 1]
    assert "AEM-GRPO - GRPO" in result["paired_success"]
    finals = (out / "final.csv").read_text().splitlines()
    again = subprocess.run([sys.executable, script, "--quick", "--steps", "2", "--out", str(out), "--resume"],
                           capture_output=True, text=True, env=ENV, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "final.csv").read_text().splitlines() == finals  # nothing left to run: no new rows
    assert (out / "entropy_bands.png").stat().st_size > 0 and "## Final success" in (out / "dynamics.md").read_text()


@pytest.mark.slow
def test_quick_entropy_dynamics_on_textworld(tmp_path, textworld_cache):
    """--task textworld --quick: GRPO and AEM-GRPO on TextWorld's coin collector, 1 seed, 2 steps. Games come from
    the run's shared game cache ($TRL_AEM_CACHE; generated on first use, a few seconds each)."""
    pytest.importorskip("textworld", reason='the optional extra: pip install "trl-aem[textworld]"')
    import csv

    out = tmp_path / "tw"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "entropy_dynamics.py"), "--task", "textworld",
                           "--quick", "--workers", "1", "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env=dict(ENV, TRL_AEM_CACHE=str(textworld_cache)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["task"]["env_id"] == "trl_aem/TextWorld-v0" and run["task"]["eval_env_kwargs"] == {"split": "eval"}
    assert run["task"]["expert_seeds"] == [1_000_000, 1_000_002]
    assert run["baselines"]["expert"] == 1.0 and 0.0 <= run["baselines"]["random"] < 1.0  # the walkthrough wins
    with open(out / "steps.csv", newline="") as handle:
        steps = list(csv.DictReader(handle))
    assert {r["arm"] for r in steps} == {"GRPO", "AEM-GRPO"} and {r["seed"] for r in steps} == {"0"}
    for r in steps:
        assert 0.0 <= float(r["success_rate"]) <= 1.0 and float(r["span_entropy"]) > 0
        assert float(r["step_time_s"]) > 0 and int(r["step"]) >= 1
    alpha = {r["arm"]: float(r["alpha_mean"]) for r in steps}
    assert alpha["GRPO"] == 1.0  # aem_lambda=0: no modulation
    with open(out / "final.csv", newline="") as handle:
        finals = list(csv.DictReader(handle))
    assert sorted(r["arm"] for r in finals) == ["AEM-GRPO", "GRPO"]
    for r in finals:
        for key in ("final_success", "final_greedy", "warm_start_success", "warm_start_greedy"):
            assert float(r[key]) * 2 == round(float(r[key]) * 2)  # a fraction of the 2 evaluation games
    result = json.loads((out / "dynamics.json").read_text())
    assert result["arms"] == ["GRPO", "AEM-GRPO"] and result["seeds"] == [0]
    text = (out / "dynamics.md").read_text()
    assert "on textworld" in text and "random admissible action succeeds" in text and "## Final success" in text
    assert (out / "entropy_bands.png").stat().st_size > 0


@pytest.mark.parametrize("folder", ["entropy_dynamics", "entropy_dynamics_textworld"])
def test_committed_entropy_dynamics_results_recompute(dynamics, folder):
    """The committed tables are what the committed CSVs give: docs/benchmarks.md quotes dynamics.md, and a change
    to the statistics that moved a number would show here (no training: the analysis of the committed CSVs)."""
    out = ROOT / "benchmarks" / "results" / folder
    run = json.loads((out / "run.json").read_text())
    result = dynamics.analyse(dynamics._read_csv(str(out / "steps.csv")), dynamics._read_csv(str(out / "final.csv")))
    assert json.loads(json.dumps(result)) == json.loads((out / "dynamics.json").read_text())
    assert dynamics.report(result, run) + "\n" == (out / "dynamics.md").read_text()
    assert len(result["seeds"]) == 10 and not result["incomplete_seeds_left_out"]
