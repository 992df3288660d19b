"""ECHO, SUPO and GiGPO through AEMGRPOTrainer: the credit reaches the loss (the gradient of every token's
log-probability is exactly what its credited advantage says, zero on uncredited tokens), AEM multiplies it, the
configuration refuses what cannot work, and the recipe trains through the command-line script.

The rollouts are played by the scripted reader of ``test_memory_context.py`` (deterministic outcomes per episode), the
loss runs on a tiny Qwen2: the gradient checks hold for any weights."""

from pathlib import Path

import pytest
import torch
from conftest import base_args
from datasets import Dataset
from test_memory_context import PROMPT, SEED, reader_generate
from test_rollout import bpe_tokenizer

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.context import MEMORY_SPAN_OFFSET
from trl_aem.envs.clues import ClueRooms
from trl_aem.tiny import build_tiny_qwen2

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-4  # TRL's std epsilon


class _Scripted(AEMGRPOTrainer):
    """Rollouts by a scripted policy (``generate``); keeps the loss pass's per-token log-probabilities (with grad)."""

    generate = None
    logps = None

    def _env_rollout(self, prompts, trainer=None):
        episodes = self.env_runner.run(self._env_rows, prompts, type(self).generate)
        return self._env_rollout_output(episodes, record=self.args.use_aem, with_logprobs=False)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if torch.is_grad_enabled() and logps.requires_grad:
            logps.retain_grad()
            type(self).logps = logps
        return logps, entropies, aux


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(chat_template=True)


def scripted_trainer(tmp_path, tokenizer, generate, **overrides):
    values = dict(max_completion_length=2048, env_max_turns=10, env_max_new_tokens_per_turn=64, loss_type="dapo",
                  aem_min_entropy_range=0.0, aem_plots=False, max_steps=1)
    values.update(overrides)
    model = build_tiny_qwen2(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2)
    _Scripted.generate, _Scripted.logps = generate, None
    dataset = Dataset.from_list([{"prompt": PROMPT, "seed": SEED}] * 8)
    trainer = _Scripted(model=model, args=AEMGRPOConfig(**base_args(tmp_path, **values)), train_dataset=dataset,
                        processing_class=tokenizer,
                        env=lambda: ClueRooms(num_rooms=6, clue_rooms=3))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def score_and_backward(trainer):
    """One scored batch of the 4 episodes of the task; the loss's backward pass; per-token gradients of the logps."""
    rows = [{"prompt": PROMPT, "seed": SEED} for _ in range(4)]
    batch = trainer._generate_and_score_completions(rows)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return rows, batch, _Scripted.logps.grad


def expected_echo_mask(rows, width):
    """ECHO's credited tokens, recomputed from the episodes: the final segment, the turns the final rebuild
    selected and that selection (span MEMORY_SPAN_OFFSET + last)."""
    out = []
    for row in rows:
        episode = row["env_episode"]
        credited = set()
        if episode.memories:
            credited = set(episode.memories[-1].selected) | {MEMORY_SPAN_OFFSET + len(episode.memories) - 1}
        segments = episode.segments()
        for k, segment in enumerate(segments):
            mask = [int(s >= 0 and (k == len(segments) - 1 or s in credited)) for s in segment.span_ids]
            out.append(mask + [0] * (width - len(mask)))
    return torch.tensor(out)


@pytest.mark.parametrize("use_aem", [False, True])
def test_echo_credit_reaches_the_loss(tmp_path, tokenizer, use_aem):
    """Episodes 0 and 2 select the clue's turn and succeed, 1 and 3 do not and fail. Every token's gradient is
    -A_t / (credited tokens) (dapo): exactly 0 on uncredited tokens and on the failed episodes (positive part only),
    and alpha x the episode's advantage on the credited ones."""
    trainer = scripted_trainer(tmp_path, tokenizer, reader_generate(tokenizer, select=lambda i: i % 2 == 0),
                               env_context="echo", env_context_budget=700, env_echo_recent_turns=1, use_aem=use_aem)
    rows, batch, grad = score_and_backward(trainer)
    episodes = [row["env_episode"] for row in rows]
    assert [e.success for e in episodes] == [True, False, True, False]
    # the successful episodes rebuilt twice and kept the clue's turn; the others kept nothing (and walked on)
    assert [[m.selected for m in e.memories] for e in episodes] == [[[3], [3]], [[], [], []]] * 2
    credited = expected_echo_mask(rows, batch["completion_ids"].size(1))
    loss_mask = batch["completion_mask"] * batch["tool_mask"]
    assert torch.equal(loss_mask.cpu(), credited)  # the mask is ECHO's, and only ECHO's
    assert 0 < credited.sum() < sum(sum(s.env_mask) for e in episodes for s in e.segments())
    advantage = batch["advantages"] if batch["advantages"].dim() == 2 else batch["advantages"][:, None].expand_as(grad)
    assert int(batch["num_items_in_batch"]) == int(credited.sum())
    torch.testing.assert_close(grad * batch["num_items_in_batch"], -advantage * loss_mask, atol=1e-6, rtol=1e-5)
    assert torch.all(grad[~credited.bool()] == 0)
    success = torch.tensor([e.success for e in episodes])
    row_success = torch.repeat_interleave(success, torch.tensor([len(e.segments()) for e in episodes]))
    assert torch.all(grad[credited.bool() & row_success[:, None]] < 0)  # positive advantage: logps pushed up
    assert torch.all(grad[~row_success] == 0)  # failed rollouts: the positive part is 0
    positive = 5.0 / ((100.0 / 3.0) ** 0.5 + EPS)  # returns 10, 0, 10, 0: mean 5, sample std sqrt(100 / 3)
    base = trainer.aem_base_advantages if use_aem else batch["advantages"]
    torch.testing.assert_close(base.cpu(), torch.where(row_success, positive, 0.0), rtol=1e-5, atol=1e-6)
    if use_aem:  # AEM on top: alpha x the credited advantage
        alpha = trainer.aem_last_token_alpha
        assert alpha[loss_mask.bool()].std() > 0
        torch.testing.assert_close(batch["advantages"][loss_mask.bool()],
                                   (base[:, None] * alpha)[loss_mask.bool()], rtol=1e-6, atol=1e-6)
    logs = trainer._metrics["train"]
    assert logs["env/rebuilds_per_episode"][-1] == 2.5 and logs["env/selected_turns_mean"][-1] == pytest.approx(0.4)
    assert logs["credit/credited_token_frac"][-1] == pytest.approx(
        float(credited.sum()) / sum(sum(s.env_mask) for e in episodes for s in e.segments()))


def test_dense_credit_ablation_and_summary_credit_every_generated_token(tmp_path, tokenizer):
    """env_credit="episode" with the echo context (ECHO's dense ablation), and SUPO's summary context: every
    generated token of every segment (the selections and summaries included) carries the episode's advantage."""
    for context, budget in (("echo", 700), ("summary", 400)):
        trainer = scripted_trainer(tmp_path / context, tokenizer, reader_generate(tokenizer, wrong=lambda i: i % 2 == 1),
                                   env_context=context, env_context_budget=budget, env_echo_recent_turns=1,
                                   env_credit="episode", use_aem=False)
        rows, batch, grad = score_and_backward(trainer)
        episodes = [row["env_episode"] for row in rows]
        assert [e.success for e in episodes] == [True, False, True, False] and all(e.memories for e in episodes)
        generated = torch.tensor([[*s.env_mask, *[0] * (batch["completion_ids"].size(1) - len(s.env_mask))]
                                  for e in episodes for s in e.segments()])
        assert torch.equal((batch["completion_mask"] * batch["tool_mask"]).cpu(), generated)
        memory_tokens = torch.tensor([[*[int(x >= MEMORY_SPAN_OFFSET) for x in s.span_ids],
                                       *[0] * (batch["completion_ids"].size(1) - len(s.span_ids))]
                                      for e in episodes for s in e.segments()]).bool()
        assert memory_tokens.any() and torch.all(grad[memory_tokens] != 0) == (context == "summary")
        # positive part only by default with the echo context, the full advantage with summary
        rows_of = torch.repeat_interleave(torch.arange(4), torch.tensor([len(e.segments()) for e in episodes]))
        failed_rows = torch.tensor([not episodes[e].success for e in rows_of.tolist()])
        failed_grad = grad[failed_rows][generated[failed_rows].bool()]
        assert torch.all(failed_grad == 0) if context == "echo" else torch.all(failed_grad > 0)
        assert torch.all(grad[generated.bool() & ~failed_rows[:, None]] < 0)
        assert torch.all(grad[~generated.bool()] == 0)


@pytest.mark.parametrize("use_aem", [False, True])
def test_gigpo_step_advantage_reaches_the_loss(tmp_path, tokenizer, use_aem):
    """Window context showing every earlier turn: episodes 0 and 2 say the right color at the vault, 1 and 3 a wrong
    one; all four pass through the same 8 observations. Step groups have 4 steps; with gamma 0.5 and no std
    scaling, turn t's step advantage is +-5 * 0.5 ** (7 - t); the loss sees A_episode + omega * A_step (times alpha
    with AEM)."""
    omega, gamma = 0.3, 0.5
    trainer = scripted_trainer(tmp_path, tokenizer, reader_generate(tokenizer, wrong=lambda i: i % 2 == 1),
                               env_context="window", env_history_turns=10, env_credit="gigpo", env_gigpo_gamma=gamma,
                               env_gigpo_omega=omega, env_gigpo_step_scale="none", use_aem=use_aem)
    rows, batch, grad = score_and_backward(trainer)
    episodes = [row["env_episode"] for row in rows]
    assert [e.success for e in episodes] == [True, False, True, False] and all(e.num_turns == 8 for e in episodes)
    episode_advantage = 5.0 / ((100.0 / 3.0) ** 0.5 + EPS)
    expected = []
    for index in range(4):
        sign = 1.0 if index % 2 == 0 else -1.0
        expected += [sign * (episode_advantage + omega * 5.0 * gamma ** (7 - t)) for t in range(8)]
    expected = torch.tensor(expected)
    base = trainer.aem_base_advantages if use_aem else batch["advantages"]
    torch.testing.assert_close(base.cpu().float(), expected, rtol=1e-5, atol=1e-5)
    mask = (batch["completion_mask"] * batch["tool_mask"]).bool()
    advantage = batch["advantages"] if batch["advantages"].dim() == 2 else batch["advantages"][:, None].expand_as(grad)
    torch.testing.assert_close(grad * batch["num_items_in_batch"], -advantage * mask, atol=1e-6, rtol=1e-5)
    if use_aem:
        torch.testing.assert_close(batch["advantages"][mask], (base[:, None] * trainer.aem_last_token_alpha)[mask])
    logs = trainer._metrics["train"]
    assert logs["credit/step_group_size_mean"][-1] == 4.0 and logs["credit/step_shared_frac"][-1] == 1.0


def test_overlong_episodes_get_zero_advantage(tmp_path, tokenizer):
    trainer = scripted_trainer(tmp_path, tokenizer, reader_generate(tokenizer, wrong=lambda i: i % 2 == 1),
                               env_context="summary", env_context_budget=400, env_max_rebuilds=1,
                               env_positive_advantages=False, use_aem=False)
    rows, batch, grad = score_and_backward(trainer)
    assert all(row["env_episode"].overlong for row in rows) and all(row["env_overlong"] for row in rows)
    assert torch.all(batch["advantages"] == 0) and torch.all(grad == 0)
    assert trainer._metrics["train"]["env/overlong_frac"][-1] == 1.0


def test_memory_and_credit_configuration_errors(tmp_path):
    for overrides, message in (
            (dict(env_context="summary"), "env_context_budget"),
            (dict(env_context="echo", env_context_budget=0), "env_context_budget"),
            (dict(env_context="echo", env_context_budget=10, use_vllm=True), "use_vllm"),
            (dict(env_credit="gigpo"), "env_credit='gigpo'.*env_context='window'"),
            (dict(env_credit="gigpo", env_context="echo", env_context_budget=10), "env_context='window'"),
            (dict(env_credit="echo", env_context="window"), "env_credit='echo'.*env_context='echo'"),
            (dict(env_credit="steps"), "env_credit"),
            (dict(env_gigpo_gamma=1.5), "env_gigpo_gamma"),
            (dict(env_gigpo_omega=-1.0), "env_gigpo_omega"),
            (dict(env_gigpo_step_scale="max"), "env_gigpo_step_scale"),
            (dict(env_max_rebuilds=-1), "env_max_rebuilds"),
            (dict(env_memory_max_tokens=0), "env_memory_max_tokens"),
            (dict(env_echo_recent_turns=-2), "env_echo_recent_turns")):
        with pytest.raises(ValueError, match=message):
            AEMGRPOConfig(**base_args(tmp_path, **overrides))
    config = AEMGRPOConfig(**base_args(tmp_path, env_context="echo", env_context_budget=10))
    assert config.env_credit_method == "echo" and config.env_positive_only
    config = AEMGRPOConfig(**base_args(tmp_path, env_context="echo", env_context_budget=10, env_credit="episode",
                                       env_positive_advantages=False))
    assert config.env_credit_method == "episode" and not config.env_positive_only
    config = AEMGRPOConfig(**base_args(tmp_path, env_context="window"))
    assert config.env_credit_method == "episode" and not config.env_positive_only


def test_recipe_parses_and_the_cli_knows_the_knobs(tmp_path):
    from trl import ModelConfig, TrlParser

    from trl_aem.scripts.train_agent import AgentArguments

    parser = TrlParser((AgentArguments, AEMGRPOConfig, ModelConfig))
    agent, config, _ = parser.parse_args_and_config(
        ["--config", str(ROOT / "examples" / "recipes" / "tiny-clues-echo-cpu.yaml"), "--output_dir", str(tmp_path),
         "--env_credit", "episode", "--env_positive_advantages", "false", "--env_gigpo_omega", "0.5"])
    assert agent.env_id == "trl_aem/ClueRooms-v0" and config.env_context == "echo" and config.env_context_budget
    assert config.env_credit_method == "episode" and config.env_positive_advantages is False
    assert config.max_completion_length > config.env_context_budget + config.env_memory_max_tokens


#: Each ClueRooms recipe, the method it selects, and the metrics only that method logs.
CLUE_RECIPES = {
    "tiny-clues-echo-cpu.yaml": ("echo", "echo", ("env/rebuilds_per_episode", "env/findings_frac",
                                                  "env/selected_turns_mean", "credit/credited_token_frac")),
    "tiny-clues-summary-cpu.yaml": ("summary", "episode", ("env/rebuilds_per_episode", "env/summary_tokens_mean")),
    "tiny-clues-gigpo-cpu.yaml": ("window", "gigpo", ("credit/step_group_size_mean",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(CLUE_RECIPES))
def test_clue_recipes_train_through_the_script(recipe, tmp_path):
    """Each memory/credit recipe trains one step through examples/train_agent.py and logs its method's metrics."""
    from conftest import load_script

    context, credit, metrics = CLUE_RECIPES[recipe]
    script = load_script("examples/train_agent.py", "train_agent")
    trainer = script.main(["--config", str(ROOT / "examples" / "recipes" / recipe),
                           "--max_steps", "1", "--eval_tasks", "2", "--warm_start_steps", "0", "--num_train_tasks", "8",
                           "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path), "--logging_steps", "1"])
    assert trainer.args.env_context == context and trainer.args.env_credit_method == credit
    log = next(e for e in trainer.state.log_history if "env/success_rate" in e)
    missing = [m for m in metrics if m not in log]
    assert not missing, f"{recipe}: no {missing} in {sorted(log)}"


def test_eval_command_plays_in_a_memory_context(tmp_path):
    """`trl-aem eval` takes the memory-context fields (a tiny untrained model: the episodes only need to run)."""
    import json

    from trl_aem.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--tiny_model", "true", "--env_id", "trl_aem/ClueRooms-v0", "--env_kwargs",
                 '{"num_rooms": 3}', "--num_tasks", "2", "--env_max_turns", "4", "--env_max_new_tokens_per_turn", "6",
                 "--env_context", "echo", "--env_context_budget", "80", "--env_memory_max_tokens", "4",
                 "--output_json", str(out)]) == 0
    assert json.loads(out.read_text())
    assert main(["eval", "--policy", "expert", "--env_context", "summary"]) == 2  # no budget: a usage error
