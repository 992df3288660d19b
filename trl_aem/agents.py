"""Datasets, supervised warm start and evaluation for agents in gymnasium text environments.

* :func:`make_env_dataset` builds the prompt dataset ``AEMGRPOTrainer(env=...)`` trains on (a generic prompt and
  one ``seed`` per task).
* :func:`expert_sft_dataset` and :func:`warm_start` give a model built from scratch (or a weak instruct model) a
  short supervised start on a scripted expert's trajectories, with TRL's ``SFTTrainer``.
* :func:`evaluate` reports success rate, mean return, mean turns and pass@k over N tasks, for a model (greedy or
  sampled) or for the ``"expert"``/``"random"`` policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import torch
from datasets import Dataset
from transformers import GenerationConfig

from .callbacks import SuccessProgressCallback
from .context import ContextPolicy, make_context_policy
from .generation import make_hf_generate_fn
from .rollout import EnvRunner, ObservationRenderer, RolloutLimits, initial_messages, make_env_factory, row_seed

#: The generic instruction the built-in recipes use; the environment's first observation is appended to it.
DEFAULT_PROMPT = "you are an agent . answer with one action ."


def make_env_dataset(num_tasks: int, *, seed_offset: int = 0, prompt: str | list[dict] = DEFAULT_PROMPT,
                     conversational: bool = True, extra_columns: dict[str, Any] | None = None) -> Dataset:
    """A dataset of ``num_tasks`` rows: ``prompt`` and ``seed`` (``seed_offset + i``), plus constant extra columns.

    Keep training and evaluation seeds apart (e.g. ``seed_offset=0`` for training, ``100_000`` for evaluation).
    """
    if isinstance(prompt, str) and conversational:
        prompt_value: Any = [{"role": "user", "content": prompt}]
    else:
        prompt_value = prompt
    rows = [{"prompt": prompt_value, "seed": seed_offset + i, **(extra_columns or {})} for i in range(num_tasks)]
    return Dataset.from_list(rows)


def expert_sft_dataset(env: str | Callable[[], gymnasium.Env], seeds: Sequence[int], *, env_kwargs: dict | None = None,
                       prompt: str | list[dict] = DEFAULT_PROMPT, system_prompt: str | None = None,
                       max_turns: int = 10, only_successful: bool = True) -> Dataset:
    """Conversational prompt-completion rows from the environment's scripted expert (``expert_action()``).

    Each expert turn becomes one row: the conversation so far (rendered exactly as the rollouts render it:
    first observation appended to the prompt, later observations as user messages, earlier actions as assistant
    messages) and the expert's action as the completion.
    """
    factory = make_env_factory(env, env_kwargs)
    instance = factory()
    rows = []
    try:
        for seed in seeds:
            observation, _ = instance.reset(seed=int(seed), options={"seed": int(seed)})
            messages = initial_messages(prompt, observation, system_prompt)
            episode_rows, success = [], False
            for _ in range(max_turns):
                action = instance.unwrapped.expert_action()
                episode_rows.append({"prompt": [dict(m) for m in messages],
                                     "completion": [{"role": "assistant", "content": action}]})
                observation, _, terminated, truncated, info = instance.step(action)
                success = bool(info.get("success", False))
                if terminated or truncated:
                    break
                messages = messages + [{"role": "assistant", "content": action},
                                       {"role": "user", "content": observation}]
            if success or not only_successful:
                rows.extend(episode_rows)
    finally:
        instance.close()
    if not rows:
        raise ValueError("the expert produced no (successful) episode for these seeds")
    return Dataset.from_list(rows)


def warm_start(model, tokenizer, dataset: Dataset, *, max_steps: int = 100, learning_rate: float = 3e-3,
               batch_size: int = 16, output_dir: str = "warm_start", seed: int = 0, **sft_kwargs):
    """Supervised warm start with TRL's ``SFTTrainer`` (loss on the expert's actions only). Returns the model."""
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type=sft_kwargs.pop("lr_scheduler_type", "constant"),
        warmup_steps=0,
        logging_steps=max(1, max_steps // 5),
        save_strategy="no",
        report_to="none",
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        seed=seed,
        disable_tqdm=True,
        completion_only_loss=True,
        **sft_kwargs,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    # Quiet console: no raw metric dictionary per log (log level `info` brings them back), no summary line.
    trainer.add_callback(SuccessProgressCallback(trainer.callback_handler.callbacks, summary=False))
    trainer.train()
    return trainer.model


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`."""

    success_rate: float
    mean_return: float
    mean_turns: float
    pass_at_k: float
    k: int
    num_tasks: int
    episodes: list[dict] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return (f"success {self.success_rate:.1%}  return {self.mean_return:.2f}  turns {self.mean_turns:.2f}  "
                f"pass@{self.k} {self.pass_at_k:.1%}  ({self.num_tasks} tasks x {self.k})")

    def as_dict(self) -> dict[str, float]:
        """The scalar results (for logging)."""
        return {"success_rate": self.success_rate, "mean_return": self.mean_return, "mean_turns": self.mean_turns,
                f"pass@{self.k}": self.pass_at_k}


def _pass_at_k(successes_per_task: list[list[bool]], k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021) averaged over tasks, from n >= k attempts per task."""
    values = []
    for attempts in successes_per_task:
        n, c = len(attempts), sum(attempts)
        values.append(1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k))
    return sum(values) / len(values) if values else 0.0


def _play_text_policy(env: Any, row: dict, policy: Callable[[str, Any], str], max_turns: int) -> dict:
    observation, _ = env.reset(seed=row_seed(row), options=dict(row))
    total, success, turns, truncated = 0.0, False, 0, True
    for turns in range(1, max_turns + 1):
        observation, reward, terminated, trunc, info = env.step(policy(observation, env))
        total += float(reward)
        success = success or bool(info.get("success", False))  # as EnvRunner: any step reporting success
        if terminated or trunc:
            truncated = bool(trunc) and not terminated
            break
    else:
        truncated = True
    return {"seed": row_seed(row), "success": success and not truncated, "return": total, "turns": turns}


def eos_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end a completion, built as TRL's ``GRPOTrainer`` builds its ``eos_token_ids`` (so
    evaluation stops where training does): every id of the model's ``generation_config.eos_token_id`` (one id or a
    list: Qwen2.5 declares two), preceded by the tokenizer's ``eos_token_id`` when the model does not declare it."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if declared is None:
        ids = []
    elif isinstance(declared, int):
        ids = [declared]
    else:
        ids = list(declared)
    if tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return [int(i) for i in ids if i is not None]


def evaluate(
    env: str | Callable[[], gymnasium.Env],
    policy: str | Callable[[str, Any], str] = "model",
    *,
    model=None,
    tokenizer=None,
    num_tasks: int = 50,
    k: int = 1,
    seed_offset: int = 100_000,
    env_kwargs: dict | None = None,
    greedy: bool = True,
    temperature: float = 1.0,
    max_turns: int = 10,
    max_new_tokens_per_turn: int = 32,
    max_completion_length: int = 1024,
    prompt: str | list[dict] = DEFAULT_PROMPT,
    system_prompt: str | None = None,
    batch_size: int = 64,
    progress: bool = False,
    context: str | ContextPolicy = "full",
    history_turns: int = 2,
    prompt_format: str = "chat",
    invalid_action_penalty: float = 0.1,
) -> EvalResult:
    """Play ``num_tasks`` tasks (seeds ``seed_offset ...``) ``k`` times each and report success, return, turns, pass@k.

    Args:
        env: a gymnasium id (``"trl_aem/Household-v0"``) or a factory.
        policy: ``"model"`` (needs ``model`` and ``tokenizer``; rollouts exactly as in training, with turns ending
            at the same EOS ids, :func:`eos_token_ids`), ``"expert"`` (the env's ``expert_action()``), ``"random"``
            (a random admissible action), or a callable ``(observation, env) -> action``.
        k: attempts per task; pass@k counts a task solved if any of its k attempts succeeds. Use ``greedy=False``
            for k > 1 (greedy attempts are identical).
        seed_offset: tasks are seeds ``seed_offset ... seed_offset + num_tasks - 1``.
        env_kwargs: keyword arguments of the environment (difficulty knobs).
        greedy: greedy decoding for the model (else sampling at ``temperature``).
        temperature: sampling temperature when ``greedy=False``.
        max_turns: turn limit per episode, as in training.
        max_new_tokens_per_turn: token budget of one turn, as in training.
        max_completion_length: token budget of a whole trajectory, as in training.
        prompt: the instruction the first observation is appended to, as in training.
        system_prompt: optional system message, as in training.
        batch_size: episodes generated together per batch.
        progress: show a progress bar with the success rate so far.
        context: what the model sees at each turn, as in training (``env_context``: ``"full"`` or ``"window"``), or
            a :class:`~trl_aem.context.ContextPolicy` (``"summary"`` and ``"echo"`` need their budget:
            ``context_policy_from_args(config)`` builds the one a training configuration describes).
        history_turns: with ``context="window"``, earlier observation/action pairs per prompt (``env_history_turns``).
        prompt_format: ``"chat"`` or ``"react"`` (``env_prompt_format``), as in training.
        invalid_action_penalty: with ``"react"``, the reward of a malformed answer is minus this.
    """
    policy_of_context = (context if isinstance(context, ContextPolicy)
                         else make_context_policy(context, history_turns, prompt_format))
    rows = [{"prompt": prompt, "seed": seed_offset + t} for t in range(num_tasks) for _ in range(k)]
    factory = make_env_factory(env, env_kwargs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="evaluate", unit="episode")
    results: list[dict] = []
    if policy == "model":
        if model is None or tokenizer is None:
            raise ValueError('policy="model" needs model= and tokenizer=')
        renderer = ObservationRenderer(tokenizer, system_prompt)
        limits = RolloutLimits(max_turns, max_new_tokens_per_turn, max_completion_length)
        runner = EnvRunner(factory, renderer, limits, context=policy_of_context,
                           invalid_action_penalty=invalid_action_penalty)
        stop_ids = eos_token_ids(model, tokenizer)  # the ids that end a turn in training, too
        config = GenerationConfig(do_sample=not greedy, temperature=temperature if not greedy else None,
                                  top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=stop_ids)
        was_training = model.training
        model.eval()
        generate = make_hf_generate_fn(model, tokenizer.pad_token_id, stop_ids, config,
                                       temperature=temperature, record_entropy=False)
        try:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start: start + batch_size]
                for row, episode in zip(chunk, runner.run(chunk, [r["prompt"] for r in chunk], generate)):
                    results.append({"seed": row["seed"], "success": episode.success, "return": episode.episode_return,
                                    "turns": episode.num_turns, "actions": episode.actions, "error": episode.error})
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(success=f"{sum(r['success'] for r in results) / len(results):.1%}")
        finally:
            model.train(was_training)
    else:
        if policy == "expert":
            text_policy = lambda observation, e: e.unwrapped.expert_action()  # noqa: E731
        elif policy == "random":
            from .envs import random_policy_action

            text_policy = lambda observation, e: random_policy_action(e)  # noqa: E731
        elif callable(policy):
            text_policy = policy
        else:
            raise ValueError(f'policy must be "model", "expert", "random" or a callable, got {policy!r}')
        instance = factory()
        try:
            for row in rows:
                results.append(_play_text_policy(instance, row, text_policy, max_turns))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(success=f"{sum(r['success'] for r in results) / len(results):.1%}")
        finally:
            instance.close()
    if bar is not None:
        bar.close()
    by_task: dict[int, list[bool]] = {}
    for result in results:
        by_task.setdefault(result["seed"], []).append(bool(result["success"]))
    n = max(len(results), 1)
    return EvalResult(
        success_rate=sum(r["success"] for r in results) / n,
        mean_return=sum(r["return"] for r in results) / n,
        mean_turns=sum(r["turns"] for r in results) / n,
        pass_at_k=_pass_at_k(list(by_task.values()), k),
        k=k,
        num_tasks=num_tasks,
        episodes=results,
    )
