"""env_context="window" (the step-wise setting): token-exact segments for both prompt formats, the malformed-action
rule, no-drop splits, scoring on the sampled contexts, and AEM's groups over every turn of a task's episodes."""

import pytest
import torch
from conftest import base_args
from test_env_trainer import env_dataset, make_trainer
from test_rollout import (
    PROMPT,
    SayEnv,
    bpe_tokenizer,
    runner,
    scripted_generate,
    seed_for,
)

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.context import (
    MALFORMED_ACTION_NOTE,
    FullContext,
    PromptFormat,
    TurnHistory,
    WindowContext,
)
from trl_aem.segments import pad_segments, row_parts, split_rows, take_rows


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer, messages):
    return ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


# ---------------------------------------------------------------- the policies and formats, pure text
def test_window_messages_show_the_task_the_last_k_pairs_and_the_current_observation():
    history = TurnHistory(PROMPT, observations=["say red", "say blue", "say green", "say red"],
                          actions=["red", "blue", "green"])
    window = WindowContext(history_turns=2)
    assert window.shown_turns(history) == [1, 2]
    assert window.messages(history) == [
        {"role": "user", "content": "answer the task .\nsay red\n(steps 1 to 1 are not shown)\nsay blue"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "say green"},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": "say red"},
    ]
    assert WindowContext(history_turns=0).messages(history) == [
        {"role": "user", "content": "answer the task .\nsay red\n(steps 1 to 3 are not shown)\nsay red"}]
    # k at least the turns played: the full conversation
    assert WindowContext(history_turns=5).messages(history)[0] == {"role": "user", "content": "answer the task .\nsay red"}
    assert len(WindowContext(history_turns=5).messages(history)) == 7
    first = TurnHistory(PROMPT, observations=["say red"])
    assert WindowContext(2).messages(first) == FullContext().messages(first)
    with pytest.raises(ValueError, match="env_history_turns"):
        WindowContext(history_turns=-1)


def test_react_step_text_and_action_parsing():
    react = PromptFormat("react")
    history = TurnHistory("play .", observations=["room one", "room two", "room three"], actions=["go", "look"],
                          task="find the key", admissible_actions=["go north", "take key"])
    text = react.turn_text(history, shown=[1])
    assert text == (
        "Your task: find the key\nThis is step 3.\nYour previous 1 step:\n"
        "[step 2] observation: room two\n[step 2] your action: look\n"
        "Current observation: room three\nAdmissible actions: go north, take key\n"
        "First think about what to do inside <think> </think>, then give exactly one action inside "
        "<action> </action>.")
    assert react.parse_action("<think>the key is north</think> <action> go north </action>") == "go north"
    for malformed in ("go north", "<action></action>", "<action>a</action><action>b</action>", "<action>go north",
                      "<action> <action>x</action>"):
        assert react.parse_action(malformed) is None, malformed
    assert PromptFormat("chat").parse_action("go north") == "go north"
    with pytest.raises(ValueError, match="env_prompt_format"):
        PromptFormat("xml")


# ---------------------------------------------------------------- token-exact segments
def test_window_chat_segments_are_token_exact():
    tokenizer = bpe_tokenizer(chat_template=True)
    seed = seed_for(["red", "blue", "green"])
    generate = scripted_generate(tokenizer, ["red<|im_end|>", "blue<|im_end|>", "green<|im_end|>"])
    env_runner = runner(lambda: SayEnv(length=3), tokenizer, context=WindowContext(history_turns=1))
    [episode] = env_runner.run([{"seed": seed}], [PROMPT], generate)
    assert episode.success and episode.actions == ["red", "blue", "green"]
    segments = episode.segments()
    assert len(segments) == 3
    expected_prompts = [
        [{"role": "user", "content": "answer the task .\nsay red"}],
        [{"role": "user", "content": "answer the task .\nsay red"}, {"role": "assistant", "content": "red"},
         {"role": "user", "content": "say blue"}],
        [{"role": "user", "content": "answer the task .\nsay red\n(steps 1 to 1 are not shown)\nsay blue"},
         {"role": "assistant", "content": "blue"}, {"role": "user", "content": "say green"}],
    ]
    for turn, (segment, messages, answer) in enumerate(zip(segments, expected_prompts, ["red", "blue", "green"])):
        assert segment.prompt_ids == chat_prompt(tokenizer, messages), turn
        assert segment.completion_ids == ids(tokenizer, f"{answer}<|im_end|>")  # exactly the sampled tokens
        assert segment.env_mask == [1] * len(segment.completion_ids)
        assert segment.span_ids == [turn] * len(segment.completion_ids)
        assert segment.token_entropy == pytest.approx([0.5 + 0.1 * j for j in range(len(segment.completion_ids))])
    # The contexts generate saw are exactly the segments' prompts.
    assert generate.contexts == [s.prompt_ids for s in segments]


def test_window_react_segments_are_token_exact_and_malformed_answers_do_not_step_the_env():
    tokenizer = bpe_tokenizer(chat_template=True)
    seed = seed_for(["red", "blue"])
    answers = ["<think>say it</think><action>red</action><|im_end|>", "blue<|im_end|>",
               "<action>blue</action><|im_end|>"]
    generate = scripted_generate(tokenizer, answers)
    steps = []

    class CountingEnv(SayEnv):
        def step(self, action):
            steps.append(action)
            return super().step(action)

    env_runner = runner(CountingEnv, tokenizer, per_turn=64, context=WindowContext(2, PromptFormat("react")),
                        invalid_action_penalty=0.25)
    [episode] = env_runner.run([{"seed": seed}], [PROMPT], generate)
    assert steps == ["red", "blue"]  # the malformed second answer never reached the environment
    assert episode.success and episode.rewards == [0.0, -0.25, 10.0]
    assert episode.invalid_actions == 1 and episode.malformed_actions == 1
    assert episode.actions == ["red", "blue<|im_end|>".replace("<|im_end|>", ""), "blue"]
    assert episode.observations[2] == f"{MALFORMED_ACTION_NOTE}\nsay blue"
    instruction = ("First think about what to do inside <think> </think>, then give exactly one action inside "
                   "<action> </action>.")
    texts = [
        f"Your task: say red\nThis is step 1.\nCurrent observation: say red\n{instruction}",
        f"Your task: say red\nThis is step 2.\nYour previous 1 step:\n[step 1] observation: say red\n"
        f"[step 1] your action: red\nCurrent observation: say blue\n{instruction}",
        f"Your task: say red\nThis is step 3.\nYour previous 2 steps:\n[step 1] observation: say red\n"
        f"[step 1] your action: red\n[step 2] observation: say blue\n[step 2] your action: blue\n"
        f"Current observation: {MALFORMED_ACTION_NOTE}\nsay blue\n{instruction}",
    ]
    for segment, text, answer in zip(episode.segments(), texts, answers):
        assert segment.prompt_ids == chat_prompt(tokenizer, [{"role": "user", "content": f"answer the task .\n{text}"}])
        assert segment.completion_ids == ids(tokenizer, answer)


def test_full_context_is_unchanged_by_the_policy_interface():
    """env_context="full" with the chat format gives the same trajectory as before segments existed."""
    tokenizer = bpe_tokenizer(chat_template=True)
    seed = seed_for(["red", "blue"])
    generate = scripted_generate(tokenizer, ["red<|im_end|>", "blue<|im_end|>"])
    [episode] = runner(SayEnv, tokenizer, context=FullContext()).run([{"seed": seed}], [PROMPT], generate)
    assert len(episode.segments()) == 1
    conversation = [{"role": "user", "content": "answer the task .\nsay red"}, {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "say blue"}, {"role": "assistant", "content": "blue"}]
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert episode.prompt_ids + episode.completion_ids == ids(tokenizer, full[: -len("\n")])


# ---------------------------------------------------------------- segment rows and splits
def test_split_rows_never_drops_or_duplicates_a_row():
    for rows in range(0, 23):
        for chunks in (1, 2, 3, 4, 7):
            parts = split_rows(rows, chunks)
            assert len(parts) == chunks
            covered = [i for part in parts for i in range(rows)[part]]
            assert covered == list(range(rows))
            sizes = [part.stop - part.start for part in parts]
            assert max(sizes) - min(sizes) <= 1
    assert row_parts(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)] and row_parts(7, None) == [slice(0, 7)]
    batch = {"a": torch.arange(5), "b": [10, 11, 12, 13, 14], "n": torch.tensor(3)}
    taken = take_rows(batch, torch.tensor([4, 0]))
    assert taken["a"].tolist() == [4, 0] and taken["b"] == [14, 10] and taken["n"].item() == 3


def test_pad_segments_by_hand():
    from trl_aem.rollout import Segment

    segments = [Segment([5, 6], [7, 8, 2], [1, 1, 1], [0, 0, 0], [0.1, 0.2, 0.3]),
                Segment([5], [9, 9], [1, 1], [1, 1], [0.4, 0.5]),
                Segment([5, 6, 6], [])]
    batch = pad_segments(segments, pad_token_id=0, eos_token_ids=[2], mask_truncated=True)
    assert batch["prompt_ids"].tolist() == [[0, 5, 6], [0, 0, 5], [5, 6, 6]]
    assert batch["prompt_mask"].tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert batch["completion_ids"].tolist() == [[7, 8, 2], [9, 9, 0], [0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]  # row 1 truncated (no EOS)
    assert batch["tool_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert batch["span_ids"].tolist() == [[0, 0, 0], [1, 1, -1], [-1, -1, -1]]
    torch.testing.assert_close(batch["token_entropy"][0], torch.tensor([0.1, 0.2, 0.3]))


# ---------------------------------------------------------------- the trainer
class _Probe(AEMGRPOTrainer):
    """Keeps the scored segment batch, the loss pass's log-probabilities and each micro-batch."""

    scored, micro_batches, ratios = None, [], []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        type(self).scored, type(self).inputs = output, inputs
        return output

    def _aem_compute_loss(self, model, inputs):
        type(self).micro_batches.append(inputs)
        return super()._aem_compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if torch.is_grad_enabled() and logps.requires_grad and type(self).micro_batches:
            batch = type(self).micro_batches[-1]
            if "old_per_token_logps" in batch:
                mask = (batch["completion_mask"] * batch["tool_mask"]).bool()
                type(self).ratios.append(torch.exp(logps.detach() - batch["old_per_token_logps"])[mask])
        return logps, entropies, aux


def window_trainer(tmp_path, tokenizer, cls=_Probe, **overrides):
    values = dict(env_context="window", env_history_turns=1, env_max_turns=3, max_steps=1)
    values.update(overrides)
    cls.scored, cls.micro_batches, cls.ratios = None, [], []
    return make_trainer(tmp_path, tokenizer, trainer_cls=cls, **values)


def rows_of(batch):
    """Every row of a scored batch as hashable (prompt tokens, completion tokens, advantage row)."""
    out = []
    for r in range(batch["prompt_ids"].size(0)):
        prompt = tuple(batch["prompt_ids"][r][batch["prompt_mask"][r].bool()].tolist())
        completion = tuple(batch["completion_ids"][r][batch["completion_mask"][r].bool()].tolist())
        out.append((prompt, completion, tuple(batch["advantages"][r].tolist())))
    return sorted(out)


class VariableEnv(SayEnv):
    """Episodes of 1 + seed % 2 turns, whatever the answers (so the rows per rollout are known)."""

    def reset(self, seed=None, options=None):
        self.left = 1 + (seed or 0) % 2
        return "say red", {}

    def step(self, action):
        self.left -= 1
        return "say red", 0.0, self.left == 0, False, {}


@pytest.mark.parametrize("steps_per_generation", [1, 3])
def test_every_segment_row_trains_once_and_is_scored_on_its_own_context(tmp_path, say_tokenizer,
                                                                        steps_per_generation):
    """The old-policy pass runs (steps_per_generation > gradient_accumulation_steps); with unchanged weights the
    importance ratio is 1 on every token; micro-batches hold every segment row exactly once, also when the number
    of rows does not divide steps_per_generation."""
    trainer = window_trainer(tmp_path, say_tokenizer, env=VariableEnv, steps_per_generation=steps_per_generation,
                             gradient_accumulation_steps=1, max_steps=steps_per_generation, learning_rate=0.0)
    trainer.train()
    scored = _Probe.scored
    rows = scored["prompt_ids"].size(0)
    assert len(_Probe.inputs) == 4 * steps_per_generation  # episodes: per_device_train_batch_size x steps
    assert rows == sum(1 + row["seed"] % 2 for row in _Probe.inputs)
    if steps_per_generation == 3:
        assert rows % 3 != 0  # (deterministic for this seed) the split is uneven
    micro = _Probe.micro_batches
    assert len(micro) == steps_per_generation
    assert sorted(r for b in micro for r in rows_of(b)) == rows_of(scored)
    if steps_per_generation > 1:  # the old-logps pass ran on the segment rows: ratio 1 with unchanged weights
        ratios = torch.cat(_Probe.ratios)
        assert ratios.numel() == int((scored["completion_mask"] * scored["tool_mask"]).sum())
        assert torch.equal(ratios, torch.ones_like(ratios))  # exactly 1: the same rows, the same contexts


def test_segments_carry_their_episodes_advantage_and_aem_groups_all_turns_of_a_task(tmp_path, say_tokenizer):
    def spread(completions, **kwargs):  # rewards with spread: non-zero advantages
        return [float(i % 4) for i in range(len(completions))]

    trainer = window_trainer(tmp_path, say_tokenizer, reward_funcs=[spread], aem_min_entropy_range=0.0)
    trainer.model.train()
    rows = [env_dataset()[0] for _ in range(trainer.num_generations)]
    output = trainer._generate_and_score_completions(rows)
    base = trainer.aem_base_advantages  # one per segment row: its episode's advantage
    turns = [r["env_turns"] for r in rows]
    assert base.numel() == sum(turns) == output["prompt_ids"].size(0)
    episode_of_row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(turns))
    for episode in range(len(rows)):
        assert base[episode_of_row == episode].unique().numel() == 1
    # AEM: one span per segment row; alphas normalised over ALL turns of the group's episodes (mean 1)
    mask = (output["completion_mask"] * output["tool_mask"]).bool()
    alpha = trainer.aem_last_token_alpha
    span_alpha = torch.stack([alpha[r][mask[r]][0] for r in range(alpha.size(0)) if mask[r].any()])
    assert span_alpha.numel() > trainer.num_generations  # more spans than episodes
    assert span_alpha.double().mean().item() == pytest.approx(1.0, abs=1e-5) and span_alpha.std() > 0
    torch.testing.assert_close(output["advantages"][mask], (base[:, None] * alpha)[mask])


class _CompareEntropy(AEMGRPOTrainer):
    pairs = []

    def _aem_collect_token_entropy(self, output):
        used = super()._aem_collect_token_entropy(output)
        fresh = self._aem_entropy_pass(output)
        mask = (output["completion_mask"] * output["tool_mask"]).bool()
        type(self).pairs.append((used[mask], fresh[mask]))
        return used


def test_recorded_entropies_match_a_forward_pass_on_the_segment_rows(tmp_path, say_tokenizer):
    _CompareEntropy.pairs = []
    trainer = window_trainer(tmp_path, say_tokenizer, cls=_CompareEntropy, aem_entropy_source="generation",
                             env_prompt_format="react")
    trainer.train()
    assert _CompareEntropy.pairs
    for used, fresh in _CompareEntropy.pairs:
        assert used.numel() > 0
        torch.testing.assert_close(used, fresh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_in_parts_gives_the_unsplit_gradient(tmp_path, say_tokenizer, loss_type):
    trainer = window_trainer(tmp_path, say_tokenizer, loss_type=loss_type)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [env_dataset()[0] for _ in range(trainer.num_generations)]
    batch = trainer._generate_and_score_completions(rows)
    batch["advantages"] = batch["advantages"] + torch.linspace(-1, 1, batch["advantages"].size(0))[:, None]
    grads = []
    for bound in (None, 2):
        trainer.args.env_rows_per_forward = bound
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_window_configuration_errors(tmp_path):
    for overrides, message in ((dict(env_context="sliding"), "env_context"),
                               (dict(env_history_turns=-1), "env_history_turns"),
                               (dict(env_prompt_format="json"), "env_prompt_format"),
                               (dict(env_rows_per_forward=0), "env_rows_per_forward"),
                               (dict(env_invalid_action_penalty=-1.0), "env_invalid_action_penalty"),
                               (dict(env_context="window", env_reuse_kv_cache=True), "nothing to reuse"),
                               (dict(env_context="window", use_vllm=True), "does not support use_vllm")):
        with pytest.raises(ValueError, match=message):
            AEMGRPOConfig(**base_args(tmp_path, **overrides))


def test_evaluate_plays_in_window_mode_and_checks_its_arguments(say_tokenizer):
    from trl_aem import evaluate
    from trl_aem.tiny import build_tiny_qwen2

    model = build_tiny_qwen2(say_tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)
    result = evaluate(lambda: SayEnv(length=2), "model", model=model, tokenizer=say_tokenizer, num_tasks=3,
                      max_turns=3, max_new_tokens_per_turn=4, context="window", history_turns=1,
                      prompt_format="react")
    assert result.num_tasks == 3 and 1 <= result.mean_turns <= 3
    with pytest.raises(ValueError, match="env_context"):
        evaluate(lambda: SayEnv(), "expert", num_tasks=1, context="sliding")


def test_repeated_malformed_answers_keep_one_reminder_over_the_environments_observation():
    tokenizer = bpe_tokenizer(chat_template=True)
    generate = scripted_generate(tokenizer, ["red<|im_end|>"])  # never a well-formed action
    env_runner = runner(SayEnv, tokenizer, max_turns=4, context=WindowContext(1, PromptFormat("react")))
    [episode] = env_runner.run([{"seed": seed_for(["red", "blue"])}], [PROMPT], generate)
    assert episode.malformed_actions == 4 and episode.truncated and episode.rewards == [-0.1] * 4
    assert episode.observations[1:] == [f"{MALFORMED_ACTION_NOTE}\nsay red"] * 3
    widths = [len(s.prompt_ids) for s in episode.segments()]
    assert widths[2] == widths[3]  # the window's prompt stops growing


def test_a_prompt_over_its_budget_ends_the_episode_as_truncated():
    tokenizer = bpe_tokenizer(chat_template=True)
    generate = scripted_generate(tokenizer, ["red<|im_end|>", "blue<|im_end|>", "green<|im_end|>"])
    first = runner(lambda: SayEnv(length=3), tokenizer, context=WindowContext(history_turns=5))
    [played] = first.run([{"seed": seed_for(["red", "blue", "green"])}], [PROMPT], generate)
    widths = [len(s.prompt_ids) for s in played.segments()]
    assert played.success and widths[0] < widths[1] < widths[2]
    from trl_aem.rollout import EnvRunner, ObservationRenderer, RolloutLimits

    limited = EnvRunner(lambda: SayEnv(length=3), ObservationRenderer(tokenizer),
                        RolloutLimits(5, 8, 256, max_prompt_length=widths[1]), context=WindowContext(history_turns=5))
    generate = scripted_generate(tokenizer, ["red<|im_end|>", "blue<|im_end|>", "green<|im_end|>"])
    [episode] = limited.run([{"seed": seed_for(["red", "blue", "green"])}], [PROMPT], generate)
    assert episode.num_turns == 2 and episode.truncated and not episode.success
    assert all(len(s.prompt_ids) <= widths[1] for s in episode.segments())
    with pytest.raises(ValueError, match="env_max_prompt_length"):
        AEMGRPOConfig(**base_args("/tmp/unused", env_max_prompt_length=0))


def test_window_mode_with_lora_and_a_kl_term_scores_the_reference_on_segment_rows(tmp_path, say_tokenizer):
    """LoRA, beta > 0 (the reference is the base model with the adapter disabled) and an entropy source from the
    old-logps pass: the reference log-probabilities are per segment row and equal the policy's before any update."""
    from peft import LoraConfig

    from trl_aem.tiny import build_tiny_qwen2

    model = build_tiny_qwen2(say_tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)
    args = AEMGRPOConfig(**base_args(tmp_path, max_completion_length=16, env_max_turns=3, env_max_new_tokens_per_turn=4,
                                     env_context="window", beta=0.1, steps_per_generation=2, max_steps=2,
                                     aem_min_entropy_range=0.0))
    trainer = _Probe(model=model, args=args, train_dataset=env_dataset(), processing_class=say_tokenizer, env=SayEnv,
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    _Probe.scored, _Probe.micro_batches, _Probe.ratios = None, [], []
    assert trainer.aem_entropy_source == "old_logps"
    trainer.train()
    scored = _Probe.scored
    mask = (scored["completion_mask"] * scored["tool_mask"]).bool()
    assert scored["ref_per_token_logps"].shape == scored["old_per_token_logps"].shape == mask.shape
    # a fresh LoRA adapter starts at zero: the reference (adapter disabled) equals the old policy on every token
    torch.testing.assert_close(scored["ref_per_token_logps"][mask], scored["old_per_token_logps"][mask])
    assert all("kl" in e for e in trainer.state.log_history if "loss" in e)


def test_num_iterations_gradient_accumulation_and_chunked_generation_in_window_mode(tmp_path, say_tokenizer):
    """steps_per_generation 2 x num_iterations 2 with gradient accumulation 2: one rollout, four micro-batches; each
    iteration trains every segment row exactly once; generation runs in chunks of at most 3 episodes."""
    calls = []
    trainer = window_trainer(tmp_path, say_tokenizer, env=VariableEnv, steps_per_generation=2, num_iterations=2,
                             gradient_accumulation_steps=2, max_steps=2, env_generation_chunk_size=3)
    original = type(trainer.model).generate

    def generate(input_ids, **kwargs):
        calls.append(input_ids.size(0))
        return original(trainer.model, input_ids=input_ids, **kwargs)

    trainer.model.generate = generate
    trainer.train()
    assert calls and max(calls) <= 3
    micro = _Probe.micro_batches
    assert len(micro) == 4  # 2 optimizer steps x 2 accumulation steps, from one generation
    expected = rows_of(_Probe.scored)
    assert sorted(r for b in micro[:2] for r in rows_of(b)) == expected
    assert sorted(r for b in micro[2:] for r in rows_of(b)) == expected
    assert all("old_per_token_logps" in b for b in micro)  # num_iterations > 1: the old-policy pass ran on segments


def test_evaluation_in_window_mode_with_loss_parts(tmp_path, say_tokenizer):
    """trainer.evaluate() (no gradients) runs the loss in parts without a backward pass."""
    trainer = window_trainer(tmp_path, say_tokenizer, cls=AEMGRPOTrainer, env_rows_per_forward=2,
                             per_device_eval_batch_size=4)
    trainer.eval_dataset = env_dataset(4)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_env/segments_per_episode"] >= 1


def test_scoring_passes_keep_sharded_processes_at_the_same_number_of_forwards(tmp_path, say_tokenizer, monkeypatch):
    """Under ZeRO-3/FSDP every forward is a collective: a process with fewer segment rows pads its scoring pass with
    copies of its first row (discarded) to the number of forwards the busiest process runs."""
    trainer = window_trainer(tmp_path, say_tokenizer, cls=AEMGRPOTrainer, env_rows_per_forward=2)
    trainer.model.eval()
    ids = torch.randint(3, 10, (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        alone = trainer._segment_forward(trainer.model, ids, mask, 4, compute_entropy=True)
    forwards = []
    handle = trainer.model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
    monkeypatch.setattr(type(trainer), "_sharded_processes", lambda self: True)
    monkeypatch.setattr(type(trainer), "_max_over_processes", lambda self, value: 4)  # another process: 4 forwards
    with torch.no_grad():
        padded = trainer._segment_forward(trainer.model, ids, mask, 4, compute_entropy=True)
    handle.remove()
    assert len(forwards) == 4  # 3 rows at 2 per forward would be 2 forwards
    torch.testing.assert_close(padded[0], alone[0])
    torch.testing.assert_close(padded[1], alone[1])
    assert padded[0].shape == (3, 4)


def test_loss_parts_refuse_terms_they_cannot_reproduce(tmp_path, say_tokenizer):
    for overrides, message in ((dict(entropy_coef=0.1), "entropy_coef"),
                               (dict(top_entropy_quantile=0.5), "top_entropy_quantile")):
        with pytest.raises(ValueError, match=message):
            window_trainer(tmp_path, say_tokenizer, cls=AEMGRPOTrainer, env_rows_per_forward=2, **overrides)
    window_trainer(tmp_path, say_tokenizer, cls=AEMGRPOTrainer, entropy_coef=0.1)  # without parts: fine


def test_a_first_prompt_over_budget_ends_the_episode_with_only_the_dataset_prompt():
    from trl_aem.rollout import EnvRunner, ObservationRenderer, RolloutLimits

    tokenizer = bpe_tokenizer(chat_template=True)
    renderer = ObservationRenderer(tokenizer)
    limited = EnvRunner(SayEnv, renderer, RolloutLimits(5, 8, 256, max_prompt_length=4), context=WindowContext(2))
    [episode] = limited.run([{"seed": 1}], [PROMPT], scripted_generate(tokenizer, ["red<|im_end|>"]))
    assert episode.truncated and episode.num_turns == 0 and not episode.success
    assert episode.prompt_ids == renderer.prompt_ids(PROMPT, "")
