"""``AEMGRPOTrainer``: TRL's ``GRPOTrainer`` with Adaptive Entropy Modulation of the advantages.

The glue is thin. GRPOTrainer generates, scores and computes its group-relative advantages as usual; this class
then (1) takes the per-token entropy of every sampled completion under the policy that sampled it, without an
extra forward pass where one can be avoided, (2) averages it per response span, (3) computes AEM's alpha per span
with :func:`trl_aem.aem.aem_modulation` over whole groups gathered from every process, and (4) hands TRL's loss the
advantages ``alpha * A_base``: ``(B,)`` where every row has one value (TRL's exact numbers), per-token ``(B, T)``
otherwise, and for multi-span rows under sequence-level importance sampling GSPO's token form, so that every span's
alpha shapes the gradient (see :meth:`AEMGRPOTrainer.compute_loss` and ``docs/method.md``).
"""

from __future__ import annotations

import copy
import os
import textwrap
import warnings
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import nanmax, nanmin, use_adapter

from .aem import (
    aem_modulation,
    broadcast_span_values,
    modulate_advantages,
    row_constant_values,
    sequence_token_old_logps,
    span_ids_from_mask,
    span_mean_entropy,
)
from .callbacks import (
    TRAJECTORY_COLUMNS,
    AEMPlotCallback,
    SuccessProgressCallback,
    trajectory_records,
)
from .config import SEGMENT_CONTEXTS, AEMGRPOConfig
from .context import MEMORY_SPAN_OFFSET, context_policy_from_args
from .credit import (
    anchor_state_ids,
    discounted_returns,
    echo_credit_mask,
    gigpo_advantages,
    gigpo_step_advantages,
    mask_overlong,
    positive_part,
)
from .generation import (
    GenerationEntropyRecorder,
    causal_lm_module,
    make_hf_generate_fn,
    tokens_through_eos,
)
from .rollout import EnvRunner, ObservationRenderer, RolloutLimits, make_env_factory
from .segments import pad_segments, row_parts, split_rows, take_rows

#: Keys of the scored batch that AEM reads (TRL's ``_generate_and_score_completions`` output).
SCORED_BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
#: Multimodal/forward keys of the scored batch passed back to the model in the extra entropy pass.
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)

AEM_CITATION = textwrap.dedent("""\
    @article{zhao2026aem,
        title        = {{AEM: Adaptive Entropy Modulation for Multi-Turn Agentic Reinforcement Learning}},
        author       = {Zhao and Zhou and Zhang and others},
        year         = 2026,
        eprint       = {arXiv:2605.00425},
    }""")


def loss_mask_of(batch: dict[str, Any]) -> torch.Tensor:
    """The tokens of a scored batch that enter the loss: ``completion_mask``, times ``tool_mask`` when there is one
    (tool/environment tokens of multi-turn rows are out), as TRL's ``_compute_loss`` builds its mask."""
    if "tool_mask" in batch:
        return batch["completion_mask"] * batch["tool_mask"]
    return batch["completion_mask"]


class AEMGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with AEM: per-span advantages ``alpha * A_base`` (arXiv:2605.00425).

    Takes exactly GRPOTrainer's arguments; ``args`` should be an :class:`~trl_aem.AEMGRPOConfig` (a plain
    ``GRPOConfig`` is upgraded with AEM's defaults). With ``args.use_aem=False`` this is GRPOTrainer, unchanged.

    Example:

    ```python
    from trl_aem import AEMGRPOConfig, AEMGRPOTrainer

    args = AEMGRPOConfig(output_dir="out", num_generations=8, aem_lambda=1.0)
    trainer = AEMGRPOTrainer(model="Qwen/Qwen2.5-1.5B-Instruct", reward_funcs=my_reward, args=args,
                             train_dataset=dataset)
    trainer.train()
    ```

    Metrics (logged through TRL, so wandb, trackio and tensorboard all get them): ``aem/alpha_mean``,
    ``aem/alpha_std``, ``aem/alpha_min``, ``aem/alpha_max``, ``aem/alpha_p10``/``p50``/``p90`` (quantiles over
    spans), ``aem/gated_frac``, ``aem/response_entropy_mean``, ``aem/neg_adv_frac``, ``aem/nonfinite_entropy_spans``;
    with ``env=``, per-turn ``aem/turn{k}/*`` and ``env/*``; with the memory contexts and ``env_credit``
    (``env_context="summary"``/``"echo"``, ECHO's and GiGPO's credit, ``docs/credit.md``) also
    ``env/rebuilds_per_episode``, ``env/overlong_frac``, ``env/summary_tokens_mean``, ``env/selected_turns_mean``,
    ``env/findings_frac``, ``credit/credited_token_frac`` and ``credit/step_group_size_*``.

    Reporting: PNG plots in ``<output_dir>/plots/`` (``args.aem_plots``, :class:`~trl_aem.callbacks.AEMPlotCallback`);
    on the console a progress bar with loss, episode success (or reward), entropy and alpha std, and a one-line
    summary at the end (:class:`~trl_aem.callbacks.SuccessProgressCallback`; ``log_level="info"`` also prints the
    raw metric dictionaries); with wandb a table of sample trajectories (``args.env_log_trajectories``).
    """

    _tag_names = ["trl", "grpo", "aem", "trl-aem"]
    _name = "AEM-GRPO"
    _paper = {
        "title": "AEM: Adaptive Entropy Modulation for Multi-Turn Agentic Reinforcement Learning",
        "id": "2605.00425",
        "citation": AEM_CITATION,
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        env=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = AEMGRPOConfig(f"{str(model_name).split('/')[-1] or 'model'}-AEM-GRPO")
        elif not isinstance(args, AEMGRPOConfig):
            if not isinstance(args, GRPOConfig):
                raise TypeError(f"args must be an AEMGRPOConfig (or a GRPOConfig), got {type(args).__name__}")
            args = AEMGRPOConfig.from_grpo_config(args)
        if env is not None:
            args = copy.copy(args)  # the env reward's weight is prepended below; leave the caller's config alone
            reward_funcs = self._check_env_arguments(args, train_dataset, reward_funcs, tools, rollout_func,
                                                     environment_factory)
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self.env_runner: EnvRunner | None = None
        if env is not None:
            self.env_runner = EnvRunner(
                make_env_factory(env, self.args.env_kwargs),
                ObservationRenderer(self._tokenizer, self.args.env_system_prompt, self.chat_template_kwargs),
                RolloutLimits(self.args.env_max_turns, self.args.env_max_new_tokens_per_turn,
                              self.args.max_completion_length, self.args.env_max_prompt_length),
                num_workers=self.args.env_num_workers,
                timeout=self.args.env_timeout,
                raise_on_error=self.args.env_raise_on_error,
                context=context_policy_from_args(self.args),
                invalid_action_penalty=self.args.env_invalid_action_penalty,
            )
            self.rollout_func = self._env_rollout
        #: With env= and a segment context ("window", "summary", "echo"): every segment is one training row.
        self._env_window = env is not None and self.args.env_context in SEGMENT_CONTEXTS
        if self._env_window and self.args.env_rows_per_forward is not None:
            self._check_loss_parts()
        self._env_rows: list[dict] | None = None
        self._env_last_rollout: tuple[str, list[dict], list] | None = None  # (mode, rows, episodes), for the table
        if self.args.aem_plots:
            self.add_callback(AEMPlotCallback(every=self.args.aem_plot_every))
        # The console: a progress bar with a few numbers (none with disable_tqdm) and a summary line at the end,
        # instead of transformers' printing of every raw metric dictionary (those go to the logs and trackers).
        self.add_callback(SuccessProgressCallback(self.callback_handler.callbacks))
        self.aem_entropy_source = self._resolve_entropy_source()
        self._aem_capture_old_pass = False
        self._aem_token_entropy: torch.Tensor | None = None
        self._aem_generation_entropy: list[torch.Tensor] | None = None
        # The shuffle ablation's random stream: one for training (saved in checkpoints), one for evaluation, so that
        # evaluating never changes which permutations training draws.
        self._aem_generator = torch.Generator().manual_seed(int(self.args.seed))
        self._aem_eval_generator = torch.Generator().manual_seed(int(self.args.seed) + 1)
        self._aem_sequence_token_inputs: dict | None = None  # set while a loss uses GSPO's token form
        self._aem_warned_trajectory_scope = False

    # ------------------------------------------------------------------ set-up
    def _check_loss_parts(self) -> None:
        """Refuse what the loss in parts (``env_rows_per_forward`` with ``env_context="window"``) cannot reproduce."""
        if self.is_deepspeed_enabled:
            raise ValueError("env_rows_per_forward runs the loss's backward pass in parts, which DeepSpeed's engine does "
                             "not allow; with DeepSpeed leave it None (bound the rows with per_device_train_batch_size "
                             "and env_max_turns) or use DDP")
        unsupported = {
            "entropy_coef (an entropy bonus, a per-call token mean)": self._entropy_bonus_enabled,
            "top_entropy_quantile < 1 (its threshold is per call)": self.top_entropy_quantile < 1.0,
            "a router auxiliary loss (router_aux_loss_coef with a mixture-of-experts model)": self.aux_loss_enabled,
            "optim lomo/adalomo (its backward needs the learning rate)": "lomo" in str(self.args.optim).lower(),
        }
        refused = [name for name, active in unsupported.items() if active]
        if refused:
            raise ValueError("env_rows_per_forward splits the loss into parts weighted by the policy loss's normaliser, "
                             "which does not reproduce " + "; ".join(refused) + ". Leave env_rows_per_forward None, or "
                             "switch these off")

    @staticmethod
    def _check_env_arguments(args, train_dataset, reward_funcs, tools, rollout_func, environment_factory):
        """Validate ``env=`` against the other arguments; return the reward functions with ``env_return`` first."""
        for name, value in (("tools", tools), ("rollout_func", rollout_func),
                            ("environment_factory", environment_factory)):
            if value:
                raise ValueError(f"env= runs its own multi-turn rollouts and cannot be combined with {name}=")
        columns = getattr(train_dataset, "column_names", None)
        if columns is not None and "prompt" not in columns:
            raise ValueError(
                "With env=, the training dataset needs a 'prompt' column (a generic instruction; the environment's "
                "first observation is appended to it) and usually a 'seed' column. trl_aem.make_env_dataset builds one."
            )
        if reward_funcs is None:
            user_funcs = []
        elif isinstance(reward_funcs, list):
            user_funcs = list(reward_funcs)
        else:
            user_funcs = [reward_funcs]
        if args.reward_weights is not None and len(args.reward_weights) == len(user_funcs):
            args.reward_weights = [1.0] + list(args.reward_weights)
        return [env_return] + user_funcs

    def _old_logps_pass_runs(self) -> bool:
        """Whether GRPOTrainer computes ``old_per_token_logps`` in its scoring step (mirrors its own condition)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _generation_recordable(self) -> bool:
        """Whether completions come from ``transformers`` ``generate`` calls we can hook (ours or TRL's)."""
        if self.env_runner is not None:
            return not self.use_vllm
        return not (self.use_vllm or self.use_transformers_continuous_batching or self.tools or self.rollout_func)

    def _resolve_entropy_source(self) -> str:
        requested = self.args.aem_entropy_source
        old_pass, recordable = self._old_logps_pass_runs(), self._generation_recordable()
        if requested == "old_logps" and not old_pass:
            raise ValueError(
                "aem_entropy_source='old_logps' needs the old-log-probability pass, which GRPOTrainer runs only with "
                "use_vllm=True (importance sampling correction) or when gradient_accumulation_steps is not a multiple "
                "of steps_per_generation * num_iterations. Allowed here: 'auto', 'generation', 'extra_pass'."
            )
        if requested == "generation" and not recordable:
            raise ValueError(
                "aem_entropy_source='generation' records entropies from transformers.generate, which this configuration "
                "does not use (vLLM, continuous batching, tools or rollout_func). Use 'auto', 'old_logps' or "
                "'extra_pass'."
            )
        if requested != "auto":
            return requested
        if old_pass:
            return "old_logps"
        return "generation" if recordable else "extra_pass"

    # ------------------------------------------------------------------ entropy capture hooks
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, *args, **kwargs):
        """GRPOTrainer's scoring pass; when AEM asks for it, it also keeps the entropies of the old-logps pass."""
        if self._aem_sequence_token_inputs is not None:
            # The loss's own forward pass (its first call): rewrite the old log-probabilities of the batch being
            # scored so that TRL's token-level ratio computes GSPO's token form (see compute_loss).
            inputs, self._aem_sequence_token_inputs = self._aem_sequence_token_inputs, None
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs
            )
            mask = loss_mask_of(inputs)
            inputs["old_per_token_logps"], inputs["aem_sequence_log_ratio"] = sequence_token_old_logps(
                logps, inputs.get("old_per_token_logps"), mask
            )
            return logps, entropies, aux_loss
        if not self._aem_capture_old_pass:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs
            )
        self._aem_capture_old_pass = False  # only the first pass of a scoring step is the old-policy pass
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, True, *args, **kwargs
        )
        self._aem_token_entropy = entropies.detach()
        return logps, (entropies if compute_entropy else None), aux_loss

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        """GRPOTrainer's generation; with the ``"generation"`` entropy source it records per-step entropies."""
        if not (self.args.use_aem and self.aem_entropy_source == "generation"):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        recorder = GenerationEntropyRecorder(self.temperature)
        with recorder.attached(causal_lm_module(self.accelerator.unwrap_model(self.model))):
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        # TRL left-pads the prompts (to a multiple of pad_to_multiple_of) and cuts each completion after its first
        # EOS; generation ran until the longest completion ended, so that one has the generated width.
        prefill_width = max((len(ids) for ids in prompt_ids), default=0)
        if self.pad_to_multiple_of:
            prefill_width = -(-prefill_width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        longest = max((len(ids) for ids in completion_ids), default=0)
        recorded = recorder.entropies(prefill_width=prefill_width, generated_width=longest,
                                      trailing_steps=self._sharded_processes())
        if recorded is None or recorded.size(0) != len(completion_ids):
            warnings.warn("AEM could not match the entropies recorded during generation to the completions; falling "
                          "back to an extra forward pass for this batch.")
            self._aem_generation_entropy = None
        else:
            self._aem_generation_entropy = [recorded[i, : len(ids)] for i, ids in enumerate(completion_ids)]
        return completion_ids, logprobs

    # ------------------------------------------------------------------ scoring
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """GRPOTrainer's generation and scoring, then AEM: advantages become ``(B, T)`` ``alpha * A_base``."""
        self._env_rows = inputs  # the environment rollout reads the rows' seed/task columns
        self._aem_token_entropy = None
        self._aem_generation_entropy = None
        # (in window mode TRL scores one placeholder row per episode; the real passes run on the segment rows)
        self._aem_capture_old_pass = (self.args.use_aem and self.aem_entropy_source == "old_logps"
                                      and not self._env_window)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._aem_capture_old_pass = False
        self._env_log_metrics(inputs)
        row_episode, credit_mask = None, None
        if self._env_window:
            output, span_ids, row_episode = self._env_segment_batch(inputs, output)
            output, credit_mask = self._env_credit(inputs, output, span_ids, row_episode)
        if not self.args.use_aem:
            return self._env_apply_credit_mask(output, credit_mask)
        token_entropy = self._aem_collect_token_entropy(output)
        if self._env_window:
            pass  # span_ids: the turn index of every generated token of every segment row
        elif self.env_runner is not None:
            span_ids = self._env_span_ids(inputs, output["completion_ids"])
        elif "tool_mask" in output:  # TRL's tool/environment_factory loops or a rollout_func's env_mask: turns
            span_ids = span_ids_from_mask(loss_mask_of(output))
        else:
            span_ids = None
        failed = self._env_failed_rows(inputs, token_entropy.device)
        if failed is not None and row_episode is not None:
            failed = failed[row_episode]
        output["advantages"] = self._aem_modulate(output, token_entropy, span_ids=span_ids, excluded_rows=failed,
                                                  row_episode=row_episode, num_episodes=len(inputs))
        return self._env_apply_credit_mask(output, credit_mask)

    # ------------------------------------------------------------------ credit over segment rows (ECHO, SUPO, GiGPO)
    def _env_credit(self, inputs: list[dict], output: dict[str, Any], span_ids: torch.Tensor,
                    row_episode: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The per-row advantages and token mask of ``env_credit`` (``trl_aem.credit``), before AEM.

        GiGPO (``"gigpo"``) adds ``env_gigpo_omega`` times the step-level advantage to every row (one step each);
        overlong episodes (out of rebuilds) get advantage 0; with ``env_positive_only`` only the positive part is
        kept. Returns the batch and, for ``"echo"``, the ``(M, T)`` bool mask of credited tokens, which
        :meth:`_env_apply_credit_mask` applies after AEM (so that AEM's alphas are computed over all spans).
        """
        mode = "train" if self.model.training else "eval"
        method = self.args.env_credit_method
        episodes = [row["env_episode"] for row in inputs]
        advantages = output["advantages"]
        if method == "gigpo":
            advantages = self._gigpo_row_advantages(inputs, advantages, span_ids, row_episode, mode)
        overlong = torch.tensor([e.overlong for e in episodes], dtype=torch.bool, device=advantages.device)
        if bool(overlong.any()):
            advantages = mask_overlong(advantages, overlong[row_episode])
        if self.args.env_positive_only:
            advantages = positive_part(advantages)
        output["advantages"] = advantages
        self._env_memory_metrics(mode, episodes)
        if method != "echo":
            return output, None
        final_row = torch.ones_like(row_episode, dtype=torch.bool)
        final_row[:-1] = row_episode[:-1] != row_episode[1:]  # rows are grouped by episode, segments in order
        pairs = []
        for index, episode in enumerate(episodes):
            if episode.memories:
                last = len(episode.memories) - 1
                pairs += [(index, turn) for turn in episode.memories[last].selected or []]
                pairs.append((index, MEMORY_SPAN_OFFSET + last))
        credited = torch.tensor(pairs, dtype=torch.long, device=span_ids.device).reshape(-1, 2)
        mask = echo_credit_mask(span_ids, row_episode, final_row, credited)
        generated = loss_mask_of(output).bool()
        totals = self.accelerator.gather(torch.tensor([float((mask & generated).sum()), float(generated.sum())],
                                                      device=advantages.device)).view(-1, 2).sum(0)
        self._metrics[mode]["credit/credited_token_frac"].append((totals[0] / totals[1].clamp(min=1)).item())
        return output, mask

    def _env_apply_credit_mask(self, output: dict[str, Any], credit_mask: torch.Tensor | None) -> dict[str, Any]:
        """Take the uncredited tokens out of the loss (``tool_mask``, so out of the loss's normaliser too)."""
        if credit_mask is None:
            return output
        output["tool_mask"] = output["tool_mask"] * credit_mask.to(output["tool_mask"].dtype)
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask_of(output).sum()).sum()
        return output

    def _gigpo_row_advantages(self, inputs: list[dict], advantages: torch.Tensor, span_ids: torch.Tensor,
                              row_episode: torch.Tensor, mode: str) -> torch.Tensor:
        """GiGPO on window rows (one step each): episode advantage + omega x step advantage over anchor states,
        step groups gathered over processes (a task's episodes may sit on several)."""
        device = advantages.device
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        rank, num_episodes = self.accelerator.process_index, len(inputs)
        row_turn = span_ids.masked_fill(span_ids >= MEMORY_SPAN_OFFSET, -1).max(dim=1).values.tolist()
        rewards, states, valid = [], [], []
        for row, (episode_index, turn) in enumerate(zip(row_episode.tolist(), row_turn)):
            episode = inputs[episode_index]["env_episode"]
            ok = episode.error is None and 0 <= turn < len(episode.rewards) and turn < len(episode.observations)
            valid.append(ok)
            rewards.append(float(episode.rewards[turn]) if ok else float("nan"))
            states.append(episode.observations[turn] if ok else "")
        returns = discounted_returns(torch.tensor(rewards, dtype=torch.float64), row_episode.cpu(),
                                     torch.tensor([max(t, 0) for t in row_turn]), self.args.env_gigpo_gamma)
        returns = torch.where(torch.tensor(valid), returns, torch.full_like(returns, float("nan")))
        group = torch.div(row_episode.cpu() + rank * num_episodes, num_generations, rounding_mode="floor")
        local = torch.stack([returns, group.double(), anchor_state_ids(states).double(),
                             torch.full_like(returns, float(rank)), torch.ones_like(returns)], dim=1).to(device)
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local.reshape(-1, 5), dim=0))
        gathered = gathered[gathered[:, 4] > 0]
        step_advantage, size = gigpo_step_advantages(gathered[:, 0], gathered[:, 1].long(), gathered[:, 2].long(),
                                                     scale=self.args.env_gigpo_step_scale)
        metrics = self._metrics[mode]
        counted = size > 0
        if counted.any():
            metrics["credit/step_group_size_mean"].append(size[counted].double().mean().item())
            metrics["credit/step_group_size_max"].append(float(size[counted].max().item()))
            metrics["credit/step_shared_frac"].append((size[counted] > 1).double().mean().item())
            metrics["credit/step_adv_std"].append(step_advantage[counted].double().std(unbiased=False).item())
        mine = step_advantage[gathered[:, 3].long() == rank].to(device=device, dtype=advantages.dtype)
        return gigpo_advantages(advantages, mine, self.args.env_gigpo_omega)

    def _env_memory_metrics(self, mode: str, episodes: list) -> None:
        """``env/rebuilds_per_episode``, ``env/overlong_frac`` and, per context, ``env/summary_tokens_mean`` or
        ``env/selected_turns_mean``, ``env/selection_tokens_mean`` and ``env/findings_frac``, over all processes."""
        if self.args.env_context not in ("summary", "echo"):
            return
        memories = [m for e in episodes for m in e.memories]
        turns = sum(e.num_turns for e in episodes)
        local = torch.tensor([float(len(episodes)), float(sum(len(e.memories) for e in episodes)),
                              float(sum(e.overlong for e in episodes)), float(len(memories)),
                              float(sum(m.num_tokens for m in memories)),
                              float(sum(len(m.selected or []) for m in memories)), float(turns),
                              float(sum(bool(f) for e in episodes for f in e.findings))],
                             dtype=torch.float64, device=self.accelerator.device)
        totals = self.accelerator.gather(local).view(-1, local.numel()).sum(0).tolist()
        count, rebuilds, overlong, num_memories, memory_tokens, selected, num_turns, findings = totals
        metrics = self._metrics[mode]
        metrics["env/rebuilds_per_episode"].append(rebuilds / max(count, 1.0))
        metrics["env/overlong_frac"].append(overlong / max(count, 1.0))
        if num_memories:
            name = "summary" if self.args.env_context == "summary" else "selection"
            metrics[f"env/{name}_tokens_mean"].append(memory_tokens / num_memories)
            if self.args.env_context == "echo":
                metrics["env/selected_turns_mean"].append(selected / num_memories)
        if self.args.env_context == "echo":
            metrics["env/findings_frac"].append(findings / max(num_turns, 1.0))

    # ------------------------------------------------------------------ windowed context: segment rows
    def _env_segment_batch(self, inputs: list[dict], output: dict[str, Any]):
        """Replace TRL's one placeholder row per episode by the episodes' segment rows (``env_context="window"``).

        Every segment carries its episode's base advantage; the old-policy and reference log-probabilities (when
        TRL's configuration needs them) and AEM's entropies are computed on the segment rows, exactly the contexts
        the model sampled in, at most ``env_rows_per_forward`` rows per forward pass.

        Returns ``(batch, span_ids, row_episode)``: the scored batch of the segment rows, the ``(M, T)`` turn index of
        every generated token, and the ``(M,)`` local episode index of every row.
        """
        mode = "train" if self.model.training else "eval"
        device = output["advantages"].device
        episode_of_row, segments = [], []
        for index, row in enumerate(inputs):
            for segment in row["env_segments"]:
                episode_of_row.append(index)
                segments.append(segment)
        padded = pad_segments(segments, self._tokenizer.pad_token_id, self.eos_token_ids,
                              pad_to_multiple_of=self.pad_to_multiple_of,
                              mask_truncated=self.mask_truncated_completions)
        padded = {key: value.to(device) for key, value in padded.items()}
        span_ids, recorded_entropy = padded.pop("span_ids"), padded.pop("token_entropy")
        row_episode = torch.tensor(episode_of_row, dtype=torch.long, device=device)
        loss_mask = padded["completion_mask"] * padded["tool_mask"]
        batch = dict(padded, advantages=output["advantages"][row_episode],
                     num_items_in_batch=self.accelerator.gather(loss_mask.sum()).sum())

        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].size(1)
        want_entropy = self.args.use_aem and self.aem_entropy_source == "old_logps"
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self._old_logps_pass_runs():
                logps, entropies = self._segment_forward(self.model, input_ids, attention_mask, width, want_entropy)
                batch["old_per_token_logps"] = logps
                if want_entropy:
                    self._aem_token_entropy = entropies
            if self.beta != 0.0:
                batch["ref_per_token_logps"] = self._env_reference_logps(input_ids, attention_mask, width)
        if self.args.use_aem and self.aem_entropy_source == "generation":
            self._aem_generation_entropy = list(recorded_entropy)
        self._env_segment_metrics(mode, segments, row_episode, len(inputs))
        return batch, span_ids, row_episode

    def _env_reference_logps(self, input_ids, attention_mask, width: int) -> torch.Tensor:
        """The reference model's log-probabilities on segment rows (TRL's choice of reference: a reference model, or
        the policy with its adapter disabled, or the initial adapter ``ref``)."""
        if self.ref_model is not None:
            return self._segment_forward(self.ref_model, input_ids, attention_mask, width)[0]
        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._segment_forward(self.model, input_ids, attention_mask, width)[0]

    def _segment_forward(self, model, input_ids, attention_mask, width: int, compute_entropy: bool = False):
        """No-grad log-probabilities (and entropies) of segment rows, at most ``env_rows_per_forward`` rows per
        forward. Under ZeRO-3/FSDP, where every forward is a collective, processes holding fewer rows run extra
        forwards on copies of their first row (discarded), so that all run the same number."""
        rows, count = self.args.env_rows_per_forward, input_ids.size(0)
        if rows is not None and self._sharded_processes():
            chunks = -(-count // rows)
            most = self._max_over_processes(chunks)
            if most > chunks:
                extra = (most - 1) * rows + 1 - count
                input_ids = torch.cat([input_ids, input_ids[:1].expand(extra, -1)])
                attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(extra, -1)])
        logps, entropies, _ = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, width, batch_size=rows, compute_entropy=compute_entropy)
        return logps[:count], (entropies[:count] if entropies is not None else None)

    def _env_segment_metrics(self, mode: str, segments, row_episode: torch.Tensor, num_episodes: int) -> None:
        """Completion metrics of the segment rows (replacing TRL's, computed on placeholders) and
        ``env/segments_per_episode``; tokens seen counts the segments' tokens."""
        device = row_episode.device
        lengths = torch.tensor([sum(s.env_mask) for s in segments], dtype=torch.float32, device=device)
        ends = set(self.eos_token_ids) | {self._tokenizer.pad_token_id}
        truncated = torch.tensor([not s.completion_ids or s.completion_ids[-1] not in ends for s in segments],
                                 device=device)
        local = torch.stack([lengths, truncated.float(), torch.ones_like(lengths)], dim=1).reshape(-1, 3)
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=0))
        gathered = gathered[gathered[:, 2] > 0]  # the processes hold different numbers of rows
        all_lengths, all_truncated = gathered[:, 0], gathered[:, 1] > 0
        metrics = self._metrics[mode]
        terminated = all_lengths[~all_truncated] if (~all_truncated).any() else torch.zeros(1, device=device)
        for name, value in (("completions/mean_length", all_lengths.mean()), ("completions/min_length", all_lengths.min()),
                            ("completions/max_length", all_lengths.max()),
                            ("completions/clipped_ratio", all_truncated.float().mean()),
                            ("completions/mean_terminated_length", terminated.mean()),
                            ("completions/min_terminated_length", terminated.min()),
                            ("completions/max_terminated_length", terminated.max())):
            if metrics.get(name):
                metrics[name][-1] = value.item()
            else:
                metrics[name].append(value.item())
        counts = self.accelerator.gather(torch.tensor([float(len(segments)), float(num_episodes)], device=device))
        counts = counts.view(-1, 2).sum(0)
        metrics["env/segments_per_episode"].append((counts[0] / counts[1].clamp(min=1)).item())
        if mode == "train":  # TRL counted the placeholders (one prompt and one completion token per episode)
            tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in segments) - 2 * num_episodes
            self.state.num_input_tokens_seen += self.accelerator.gather(
                torch.tensor([tokens], device=device)).sum().item()
            metrics["num_tokens"] = [self.state.num_input_tokens_seen]

    def _prepare_inputs(self, generation_batch):
        """GRPOTrainer's batching; with ``env_context="window"`` the rollout's variable number of segment rows is
        shuffled and split into ``steps_per_generation`` micro-batches without dropping a row (sizes differ by at
        most one; a micro-batch left empty gets one fully masked row)."""
        if not (self._env_window and self.model.training):
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            rows = batch["prompt_ids"].size(0)
            order = torch.randperm(rows, device=batch["prompt_ids"].device)
            chunks = [take_rows(batch, order[part]) for part in split_rows(rows, self.args.steps_per_generation)]
            self._buffered_inputs = [chunk if chunk["prompt_ids"].size(0) else self._masked_row(batch)
                                     for chunk in chunks]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    @staticmethod
    def _masked_row(batch: dict[str, Any]) -> dict[str, Any]:
        """One row that takes no part in the loss (every token masked, advantage 0), shaped like ``batch``'s rows."""
        row = take_rows(batch, slice(0, 1))
        for key, value in row.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                row[key] = torch.zeros_like(value) if key != "prompt_mask" else torch.ones_like(value)
        return row

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """GRPOTrainer's rewards (gathered over processes); an episode ended by an environment fault gets NaN from
        every reward function, so that TRL leaves it out of its group's baseline and gives it zero advantage."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        failed = self._env_failed_rows(inputs, rewards_per_func.device)
        if failed is not None:
            failed = self.accelerator.gather(failed.long()).bool()
            rewards_per_func = rewards_per_func.masked_fill(failed.unsqueeze(1), float("nan"))
        return rewards_per_func

    def _env_failed_rows(self, inputs: list[dict], device) -> torch.Tensor | None:
        """``(B,)`` bool, True for the local episodes that ended by an environment fault (None without ``env=``)."""
        if self.env_runner is None or not inputs or "env_error" not in inputs[0]:
            return None
        return torch.tensor([x["env_error"] is not None for x in inputs], dtype=torch.bool, device=device)

    def _aem_collect_token_entropy(self, output: dict[str, Any]) -> torch.Tensor:
        """``(B, T)`` entropies of the completion tokens under the sampling policy, from the cheapest source."""
        completion_ids = output["completion_ids"]
        recorded = self._aem_generation_entropy
        usable = recorded is not None and not any(torch.isnan(values).any() for values in recorded)
        if self._aem_token_entropy is None and self.aem_entropy_source == "generation":
            usable = self._all_processes_agree(usable)  # a fallback pass is a collective under ZeRO-3/FSDP
        if self._aem_token_entropy is not None:
            entropy = self._aem_token_entropy
        elif usable:
            entropy = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
            for row, values in enumerate(recorded):
                width = min(values.numel(), entropy.size(1))
                entropy[row, :width] = values[:width].to(entropy.device)
        else:  # no cheaper source, or a recording that could not be matched on some process: all fall back
            entropy = self._aem_entropy_pass(output)
        self._aem_token_entropy, self._aem_generation_entropy = None, None
        return entropy

    def _aem_entropy_pass(self, output: dict[str, Any]) -> torch.Tensor:
        """One extra no-grad forward pass for entropies (only where no existing pass or generation can give them)."""
        prompt_completion_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        forward_kwargs = {key: output[key] for key in _FORWARD_KEYS if key in output}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self._env_window:
                return self._segment_forward(self.model, prompt_completion_ids, attention_mask,
                                             output["completion_ids"].size(1), compute_entropy=True)[1]
            _, entropy, _ = self._get_per_token_logps_and_entropies(
                self.model, prompt_completion_ids, attention_mask, output["completion_ids"].size(1),
                batch_size=batch_size, compute_entropy=True, **forward_kwargs,
            )
        return entropy

    def _aem_modulate(self, output: dict[str, Any], token_entropy: torch.Tensor,
                      span_ids: torch.Tensor | None = None, excluded_rows: torch.Tensor | None = None,
                      row_episode: torch.Tensor | None = None, num_episodes: int | None = None) -> torch.Tensor:
        """Apply AEM to ``output["advantages"]`` over whole groups gathered from all processes; log metrics.

        ``excluded_rows`` (``(B,)`` bool) marks rows whose spans take no part in AEM's statistics (episodes ended by
        an environment fault); they keep alpha 1. A batch, or a process's shard, may have no span at all (every
        completion masked): the gathered statistics are then those of the other processes' spans, and a batch
        with no valid span anywhere leaves the advantages unchanged and logs no span statistics.

        ``row_episode`` (``(B,)`` long, with ``num_episodes``) maps rows to this process's episodes when an episode
        spans several rows (``env_context="window"``): groups, trajectories and the completions table are then
        per episode; ``None`` means one row per episode.
        """
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = output["advantages"]
        self.aem_base_advantages = advantages.detach().clone()  # GRPO's (B,) advantages of the last scored batch
        if advantages.dim() != 1:
            raise ValueError("AEM expects one base advantage per trajectory (a (B,) tensor) from GRPOTrainer")
        if span_ids is None and self.args.aem_scope == "trajectory" and not self._aem_warned_trajectory_scope:
            self._aem_warned_trajectory_scope = True
            warnings.warn(
                'aem_scope="trajectory" on single-turn completions: every trajectory is one span, so every scope unit '
                'is gated and alpha is 1 everywhere (plain GRPO). Use aem_scope="group" (the paper\'s) or "batch".',
                stacklevel=2,
            )
        table = span_mean_entropy(token_entropy, loss_mask_of(output), span_ids)
        if excluded_rows is None:
            excluded_rows = torch.zeros(advantages.size(0), dtype=torch.bool, device=advantages.device)

        # Gather every process's spans: a group's completions may sit on several processes.
        if row_episode is None:
            row_episode = torch.arange(advantages.size(0), device=table.row.device)
            num_episodes = advantages.size(0)
        rank = self.accelerator.process_index
        global_episode = row_episode.to(table.row.device)[table.row] + rank * num_episodes
        local = torch.stack(
            [table.response_entropy.double(), global_episode.double(), table.num_tokens.double(),
             advantages.detach().double()[table.row], table.span_id.double(),
             torch.ones_like(global_episode, dtype=torch.float64),
             excluded_rows.to(table.row.device)[table.row].double(),
             torch.full_like(global_episode, rank, dtype=torch.float64)],
            dim=1,
        ).reshape(-1, 8)
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=0))
        gathered = gathered[gathered[:, 5] > 0]
        all_entropy, all_row = gathered[:, 0].float(), gathered[:, 1].long()
        all_tokens, all_adv, all_turn = gathered[:, 2].long(), gathered[:, 3], gathered[:, 4].long()
        all_excluded, all_rank = gathered[:, 6] > 0, gathered[:, 7].long()
        nonempty = (all_tokens > 0) & ~all_excluded
        nonfinite = nonempty & ~torch.isfinite(all_entropy)
        # Spans with no loss tokens carry no gradient, and failed episodes no signal: keep both out of the
        # statistics (NaN entropy = invalid, alpha 1).
        all_entropy = torch.where(nonempty, all_entropy, torch.full_like(all_entropy, float("nan")))

        result = aem_modulation(
            all_entropy,
            torch.div(all_row, num_generations, rounding_mode="floor"),
            lam=self.args.aem_lambda,
            min_range=self.args.aem_min_entropy_range,
            scope=self.args.aem_scope,
            direction=self.args.aem_direction,
            trajectory_index=all_row,
            generator=self._aem_generator if mode == "train" else self._aem_eval_generator,
        )
        self._aem_log_metrics(mode, result, all_entropy, all_adv, nonempty, nonfinite)
        if span_ids is not None:
            self._aem_log_turn_metrics(mode, result, all_entropy, all_turn)
        self._aem_log_row_alpha(result.alpha, all_row, all_tokens, num_episodes * self.accelerator.num_processes)

        local_alpha = result.alpha[all_rank == rank].to(advantages.device)  # this process's spans, in local order
        token_alpha = broadcast_span_values(local_alpha, table.span_index)
        self.aem_last_token_alpha = token_alpha  # (B, T) alpha of the last scored batch, for inspection
        return modulate_advantages(advantages, token_alpha)

    def _aem_log_row_alpha(self, alpha: torch.Tensor, row: torch.Tensor, tokens: torch.Tensor, num_rows: int) -> None:
        """Add ``aem_alpha`` (each episode's token-weighted mean alpha, 1 without loss tokens) to TRL's completions
        table, beside its ``advantage`` column, which holds the base (pre-AEM) advantage."""
        weight = tokens.double()
        total = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, row.cpu(), (alpha.double() * weight).cpu())
        count = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, row.cpu(), weight.cpu())
        row_alpha = torch.where(count > 0, total / count.clamp(min=1.0), torch.ones_like(total))
        self._logs["extra"]["aem_alpha"].extend(row_alpha.tolist())

    def _aem_log_metrics(self, mode, result, span_entropy, span_advantage, nonempty, nonfinite) -> None:
        """Log AEM's span statistics (identical on every process, computed over the gathered batch).

        ``aem/spans`` (spans with loss tokens) and ``aem/nonfinite_entropy_spans`` are logged for every scored
        batch; the alpha, gate and entropy statistics only for batches with at least one valid span (absent, not
        NaN or a stand-in, for a batch whose completions are all masked)."""
        metrics = self._metrics[mode]
        metrics["aem/spans"].append(float(nonempty.sum().item()))
        metrics["aem/nonfinite_entropy_spans"].append(float(nonfinite.sum().item()))
        if nonempty.any():
            metrics["aem/neg_adv_frac"].append((span_advantage[nonempty] < 0).float().mean().item())
        valid = result.valid
        if not valid.any():
            return
        alpha = result.alpha[valid].double()
        metrics["aem/alpha_mean"].append(alpha.mean().item())
        metrics["aem/alpha_std"].append(alpha.std(unbiased=False).item())
        metrics["aem/alpha_min"].append(alpha.min().item())
        metrics["aem/alpha_max"].append(alpha.max().item())
        quantiles = torch.quantile(alpha, alpha.new_tensor([0.1, 0.5, 0.9])).tolist()
        for name, value in zip(("aem/alpha_p10", "aem/alpha_p50", "aem/alpha_p90"), quantiles):
            metrics[name].append(value)
        metrics["aem/gated_frac"].append(result.gated[valid].float().mean().item())
        metrics["aem/response_entropy_mean"].append(span_entropy[valid].double().mean().item())

    def _aem_log_turn_metrics(self, mode, result, span_entropy, turn, max_turns_logged: int = 8) -> None:
        """Per-turn AEM metrics for multi-turn rollouts: ``aem/turn{k}/alpha_mean`` and ``.../response_entropy_mean``."""
        metrics = self._metrics[mode]
        for k in range(min(int(turn.max().item()) + 1 if turn.numel() else 0, max_turns_logged)):
            chosen = (turn == k) & result.valid
            if chosen.any():
                metrics[f"aem/turn{k}/alpha_mean"].append(result.alpha[chosen].double().mean().item())
                metrics[f"aem/turn{k}/response_entropy_mean"].append(span_entropy[chosen].double().mean().item())

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GRPOTrainer's loss on AEM's advantages (see :meth:`_aem_compute_loss`).

        With ``env_context="window"`` and ``env_rows_per_forward``, a micro-batch with more rows than that runs in
        parts: each part's loss is weighted by its share of the normaliser of the ``loss_type`` (rows for grpo, sapo,
        dr_grpo and luspo; loss tokens for bnpo; none for dapo, cispo and vespo, which already divide by the
        generation batch's tokens), every part but the last is back-propagated here (without gradient
        synchronisation), and the last one is returned for the Trainer's backward pass. The gradient equals the
        unsplit micro-batch's; processes agree on the number of parts (a process with fewer runs masked parts).
        """
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        bound = self.args.env_rows_per_forward if self._env_window else None
        rows = inputs["prompt_ids"].size(0)
        parts = row_parts(rows, bound)
        count = len(parts)
        if bound is not None and self.accelerator.num_processes > 1:
            count = self._max_over_processes(count)
        if count == 1:
            return self._aem_compute_loss(model, inputs)
        mask = loss_mask_of(inputs)
        tokens = mask.sum().clamp(min=1)
        done = None
        for k in range(count):
            part = take_rows(inputs, parts[k]) if k < len(parts) else self._masked_row(inputs)
            if self.loss_type in ("dapo", "cispo", "vespo"):
                weight = 1.0
            elif self.loss_type == "bnpo":
                weight = (mask[parts[k]].sum() / tokens).item() if k < len(parts) else 0.0
            else:
                weight = (parts[k].stop - parts[k].start) / rows if k < len(parts) else 0.0
            if k == count - 1:
                last = self._aem_compute_loss(model, part) * weight
                return last if done is None else last + done
            if not torch.is_grad_enabled():  # evaluation (prediction_step): the parts' losses, no backward
                loss = self._aem_compute_loss(model, part) * weight
            else:
                with self.accelerator.no_sync(model):
                    loss = self._aem_compute_loss(model, part) * weight
                    self.accelerator.backward(loss)
            done = loss.detach() if done is None else done + loss.detach()

    def _aem_compute_loss(self, model, inputs):
        """GRPOTrainer's loss on AEM's advantages, so that every span's alpha reaches the gradient.

        * Where every row's advantage is one value over its loss tokens (single-turn, aem off or gated, one alpha
          per row), TRL gets ``(B,)`` advantages: its loss and its metrics are exactly the base method's.
        * Otherwise, at ``importance_sampling_level="sequence"`` TRL's one ratio per row would see only the row's
          mean advantage: the loss then runs in GSPO's token form (same ratio value on every token, one gradient
          path per token), and the clip metrics are recomputed per sequence, as TRL reports them for GSPO.
        * At token level, TRL takes the ``(B, T)`` advantages as they are.
        """
        advantages = inputs["advantages"]
        if advantages.dim() != 2:
            return super().compute_loss(model, inputs)
        mask = loss_mask_of(inputs)
        per_row = row_constant_values(advantages, mask)
        if self.importance_sampling_level == "sequence" and self.accelerator.num_processes > 1:
            # The two paths make different collective calls: every process must take the same one.
            flag = torch.tensor([0 if per_row is None else 1], device=advantages.device)
            if int(self.accelerator.reduce(flag, reduction="sum").item()) < self.accelerator.num_processes:
                per_row = None
        if per_row is not None:
            return super().compute_loss(model, {**inputs, "advantages": per_row})
        if self.importance_sampling_level != "sequence":
            return super().compute_loss(model, inputs)
        scored = dict(inputs)  # the buffered batch is reused by later iterations: leave it unchanged
        self._aem_sequence_token_inputs = scored
        self.importance_sampling_level = "token"
        try:
            loss = super().compute_loss(model, scored)
        finally:
            self.importance_sampling_level = "sequence"
            self._aem_sequence_token_inputs = None
        self._aem_sequence_clip_metrics(scored["aem_sequence_log_ratio"], advantages, mask)
        return loss

    def _aem_sequence_clip_metrics(self, sequence_log_ratio: torch.Tensor, advantages: torch.Tensor,
                                   mask: torch.Tensor) -> None:
        """Replace the clip metrics TRL just logged from token-form ratios by its per-sequence definitions."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        with torch.no_grad():
            row_advantage = torch.where(mask.bool(), advantages, torch.zeros_like(advantages)).sum(-1)  # sign only
            ratio = torch.exp(sequence_log_ratio)
            if self.loss_type == "cispo":
                clipped = ((ratio > self.epsilon_high) & (row_advantage > 0)).float()
                metrics["cispo_clip_ratio"][-1] = self._aem_global_row_mean(clipped)
                return
            if self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
                return
            if self.args.delta is not None:
                ratio = torch.clamp(ratio, max=self.args.delta)
            low = ((ratio < 1 - self.epsilon_low) & (row_advantage < 0)).float()
            high = ((ratio > 1 + self.epsilon_high) & (row_advantage > 0)).float()
            metrics["clip_ratio/low_mean"][-1] = self._aem_global_row_mean(low)
            metrics["clip_ratio/high_mean"][-1] = self._aem_global_row_mean(high)
            metrics["clip_ratio/region_mean"][-1] = self._aem_global_row_mean(torch.maximum(low, high))
            metrics["clip_ratio/low_min"][-1] = nanmin(self.accelerator.gather(low)).item()
            metrics["clip_ratio/high_max"][-1] = nanmax(self.accelerator.gather(high)).item()

    def _aem_global_row_mean(self, values: torch.Tensor) -> float:
        """Mean of one value per row over the rows of every process."""
        local = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    # ------------------------------------------------------------------ multi-turn environments
    def _env_rollout(self, prompts: list, trainer=None) -> dict[str, list]:
        """TRL ``rollout_func``: play one episode per prompt in the environment, with batched generation per turn."""
        rows = self._env_rows
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("internal: environment rows and prompts are out of step")
        if self.use_vllm:
            # TRL syncs the vLLM weights before calling a rollout_func; every process calls generate once per turn
            # until all processes are done, since vLLM's generate gathers prompts across processes.
            episodes = self.env_runner.run(rows, prompts, self._vllm_generate_fn(), sync=self._max_over_processes)
            return self._env_rollout_output(episodes, record=False, with_logprobs=True)
        record = self.args.use_aem and self.aem_entropy_source == "generation"
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            # With ZeRO-3 or FSDP on several processes, transformers' generate synchronises every decoding step
            # across processes: every process must make the same number of generate calls (with a dummy context
            # once its own episodes are done).
            synced = self.accelerator.num_processes > 1 and (self.is_deepspeed_enabled or self.is_fsdp_enabled)
            generate = make_hf_generate_fn(
                unwrapped_model, self._tokenizer.pad_token_id, self.eos_token_ids, self.generation_config,
                temperature=self.temperature, record_entropy=record, run_when_empty=synced,
                max_batch_size=self.args.env_generation_chunk_size,
                sync_calls=self._max_over_processes if synced else None,
                reuse_kv_cache=self.args.env_reuse_kv_cache,
            )
            episodes = self.env_runner.run(rows, prompts, generate, sync=self._max_over_processes if synced else None)
        return self._env_rollout_output(episodes, record=record, with_logprobs=False)

    def _env_rollout_output(self, episodes, record: bool, with_logprobs: bool) -> dict[str, list]:
        """TRL's rollout_func output for played episodes (plus the episode fields reward functions receive)."""
        if self.args.env_log_trajectories > 0 and "wandb" in (self.args.report_to or []):
            self._env_last_rollout = ("train" if self.model.training else "eval", list(self._env_rows), episodes)
        fields = {
            "env_return": [e.episode_return for e in episodes],
            "env_success": [bool(e.success) for e in episodes],
            "env_turns": [e.num_turns for e in episodes],
            "env_invalid_actions": [e.invalid_actions for e in episodes],
            "env_truncated": [bool(e.truncated) for e in episodes],
            "env_error": [e.error for e in episodes],
            "env_actions": [list(e.actions) for e in episodes],
        }
        eos = self.eos_token_ids[0] if self.eos_token_ids else self._tokenizer.pad_token_id
        if self._env_window:
            # TRL gets one placeholder row per episode (a pad prompt token and a masked EOS) for its rewards and
            # group advantages; the segment rows replace them after scoring (_env_segment_batch).
            pad = self._tokenizer.pad_token_id
            return dict(fields, prompt_ids=[[pad] for _ in episodes], completion_ids=[[eos] for _ in episodes],
                        logprobs=None, env_mask=[[0] for _ in episodes], aem_span_ids=[[-1] for _ in episodes],
                        env_segments=[e.segments() for e in episodes], env_episode=list(episodes),
                        env_rebuilds=[len(e.memories) for e in episodes],
                        env_overlong=[bool(e.overlong) for e in episodes])
        completion_ids, env_mask, span_ids, logprobs = [], [], [], []
        for episode in episodes:
            if episode.completion_ids:
                completion_ids.append(episode.completion_ids)
                env_mask.append(episode.env_mask)
                span_ids.append(episode.span_ids)
                logprobs.append(episode.token_logprobs)
            else:  # no turn was played (reset failed): one masked token, so TRL's batch stays well-formed
                completion_ids.append([eos])
                env_mask.append([0])
                span_ids.append([-1])
                logprobs.append([float("nan")])
        if record:
            self._aem_generation_entropy = [
                torch.tensor(e.token_entropy if e.completion_ids else [0.0], dtype=torch.float32) for e in episodes
            ]
        return dict(fields, prompt_ids=[e.prompt_ids for e in episodes], completion_ids=completion_ids,
                    logprobs=logprobs if with_logprobs else None, env_mask=env_mask, aem_span_ids=span_ids)

    # ------------------------------------------------------------------ checkpoints
    #: File, in a checkpoint folder, with the state of AEM's training random stream (the shuffle ablation's).
    AEM_RNG_STATE_FILE = "aem_rng_state.pth"

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's random states, plus AEM's training generator (identical on every process)."""
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            torch.save({"aem_generator": self._aem_generator.get_state()},
                       os.path.join(output_dir, self.AEM_RNG_STATE_FILE))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The Trainer's random states, plus AEM's training generator when the checkpoint has it."""
        super()._load_rng_state(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, self.AEM_RNG_STATE_FILE)
        if path is not None and os.path.isfile(path):
            self._aem_generator.set_state(torch.load(path, weights_only=True)["aem_generator"])

    # ------------------------------------------------------------------ reporting
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """GRPOTrainer's logging, then (with wandb) a table of sample trajectories of the latest rollout."""
        super().log(logs, start_time)
        if self._env_last_rollout is not None:
            try:
                self._env_log_trajectory_table()
            except Exception as exc:  # noqa: BLE001 - a display nicety; never stop training for it
                warnings.warn(f"could not log the trajectory table: {type(exc).__name__}: {exc}", stacklevel=2)
            self._env_last_rollout = None

    def _env_log_trajectory_table(self) -> None:
        """Log ``args.env_log_trajectories`` episodes of the last rollout as ``{mode}/env/trajectories`` to wandb.

        The rollout is only kept (``_env_rollout_output``) when ``report_to`` includes wandb."""
        if not self.accelerator.is_main_process:
            return
        import wandb

        if wandb.run is None:
            return
        mode, rows, episodes = self._env_last_rollout
        table = wandb.Table(columns=list(TRAJECTORY_COLUMNS))
        for record in trajectory_records(rows, episodes, self.args.env_log_trajectories, self.state.global_step):
            table.add_data(*(record[column] for column in TRAJECTORY_COLUMNS))
        wandb.log({f"{mode}/env/trajectories": table, "train/global_step": self.state.global_step})

    def _vllm_generate_fn(self):
        """A rollout ``GenerateFn`` over TRL's vLLM generation (server or colocate), one turn per call."""
        vllm_generation = self.vllm_generation
        eos = set(self.eos_token_ids)

        def generate(contexts: list[list[int]], max_new_tokens: int):
            collective = vllm_generation.mode == "server" or vllm_generation.tensor_parallel_size > 1
            if not contexts and not collective:
                return [], None, []
            # TRL slices vLLM's answers by process assuming every process sent as many prompts: pad with dummies.
            real = len(contexts)
            count = self._max_over_processes(real) if collective else real
            padded = list(contexts) + [[self._tokenizer.pad_token_id]] * (count - real)
            saved = vllm_generation.max_completion_length
            vllm_generation.max_completion_length = max_new_tokens  # read by generate() as the turn's max_tokens
            try:
                _, completion_ids, logprobs, _ = vllm_generation.generate(
                    prompts=padded, images=None, num_generations=1,
                    profiler=profiling_context(self, "vLLM.generate"),
                )
            finally:
                vllm_generation.max_completion_length = saved
            tokens, token_logprobs = [], []
            for ids, lps in zip(completion_ids[:real], logprobs[:real]):
                turn = tokens_through_eos(ids, eos)
                tokens.append(turn)
                token_logprobs.append([float("nan") if lp[0] is None else float(lp[0]) for lp in lps[: len(turn)]])
            return tokens, None, token_logprobs

        return generate

    def _sharded_processes(self) -> bool:
        """Several processes with sharded weights (ZeRO-3 or FSDP): every forward is a collective."""
        return self.accelerator.num_processes > 1 and (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _all_processes_agree(self, flag: bool) -> bool:
        """True only if ``flag`` is True on every process (one collective with several processes)."""
        if self.accelerator.num_processes == 1:
            return flag
        return self._max_over_processes(0 if flag else 1) == 0

    def _max_over_processes(self, value: int) -> int:
        """The largest ``value`` over all processes (keeps collective generation calls in step)."""
        local = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        return int(self.accelerator.gather(local).max().item())

    @staticmethod
    def _env_span_ids(inputs: list[dict], completion_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` turn index of every completion token (-1 for observation tokens and padding)."""
        span_ids = torch.full(completion_ids.shape, -1, dtype=torch.long, device=completion_ids.device)
        for row, example in enumerate(inputs):
            values = example["aem_span_ids"][: span_ids.size(1)]
            span_ids[row, : len(values)] = torch.tensor(values, dtype=torch.long)
        return span_ids

    def _env_log_metrics(self, inputs: list[dict]) -> None:
        """Log ``env/*`` metrics of the episodes just played, over all processes."""
        if self.env_runner is None or not inputs or "env_return" not in inputs[0]:
            return
        mode = "train" if self.model.training else "eval"
        local = torch.tensor(
            [[float(x["env_success"]), float(x["env_return"]), float(x["env_turns"]), float(x["env_invalid_actions"]),
              float(x["env_truncated"]), float(x["env_error"] is not None)] for x in inputs],
            dtype=torch.float64, device=self.accelerator.device,
        )
        stats = self.accelerator.gather(local)
        turns = stats[:, 2].sum().item()
        metrics = self._metrics[mode]
        metrics["env/success_rate"].append(stats[:, 0].mean().item())
        metrics["env/return_mean"].append(stats[:, 1].mean().item())
        metrics["env/turns_mean"].append(stats[:, 2].mean().item())
        metrics["env/invalid_action_rate"].append(stats[:, 3].sum().item() / turns if turns else 0.0)
        metrics["env/truncated_frac"].append(stats[:, 4].mean().item())
        metrics["env/episode_errors"].append(stats[:, 5].sum().item())


def env_return(completions, env_return=None, env_error=None, **kwargs) -> list[float | None]:
    """Reward function used with ``env=``: the episode return (sum of the environment's rewards).

    Episodes that ended because the environment failed get ``None``. ``AEMGRPOTrainer`` then sets every reward
    function's value of such an episode to NaN (whatever the others returned), so TRL treats it as unscorable: it
    takes no part in its group's mean and std, its advantage is 0, and its spans take no part in AEM's group
    statistics. An environment fault never teaches the policy anything, nor shifts the other episodes' baselines.
    """
    if env_return is None:
        raise ValueError("env_return reward needs the env_return column that AEMGRPOTrainer(env=...) provides")
    errors = env_error if env_error is not None else [None] * len(env_return)
    return [None if error is not None else float(value) for value, error in zip(env_return, errors)]
