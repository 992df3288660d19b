"""``AEMGRPOTrainer``: TRL's ``GRPOTrainer`` with Adaptive Entropy Modulation of the advantages.

The glue is thin. GRPOTrainer generates, scores and computes its group-relative advantages as usual; this class
then (1) takes the per-token entropy of every sampled completion under the policy that sampled it, without an
extra forward pass where one can be avoided, (2) averages it per response span, (3) computes AEM's alpha per span
with :func:`trl_aem.aem.aem_modulation` over whole groups gathered from every process, and (4) hands TRL per-token
``(B, T)`` advantages ``alpha * A_base``, which TRL's loss accepts for every loss type.
"""

from __future__ import annotations

import textwrap
import warnings
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .aem import aem_modulation, broadcast_span_values, modulate_advantages, span_mean_entropy, token_entropy_from_logits
from .config import AEMGRPOConfig

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


class _GenerationEntropyRecorder:
    """Forward hook that records the next-token entropy at every ``generate`` step (no extra forward pass)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []

    def __call__(self, module, args, output):
        logits = getattr(output, "logits", None)
        if logits is not None and logits.dim() == 3:
            self.steps.append(token_entropy_from_logits(logits[:, -1, :], self.temperature))

    def entropies(self) -> torch.Tensor | None:
        """``(B, steps)`` entropies recorded so far, or None if nothing was recorded."""
        return torch.stack(self.steps, dim=1) if self.steps else None


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
    ``aem/alpha_std``, ``aem/alpha_min``, ``aem/alpha_max``, ``aem/gated_frac``, ``aem/response_entropy_mean``,
    ``aem/neg_adv_frac``, ``aem/nonfinite_entropy_spans``.
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
    ):
        if args is None:
            model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = AEMGRPOConfig(f"{str(model_name).split('/')[-1] or 'model'}-AEM-GRPO")
        elif not isinstance(args, AEMGRPOConfig):
            if not isinstance(args, GRPOConfig):
                raise TypeError(f"args must be an AEMGRPOConfig (or a GRPOConfig), got {type(args).__name__}")
            args = AEMGRPOConfig.from_grpo_config(args)
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
        self.aem_entropy_source = self._resolve_entropy_source()
        self._aem_capture_old_pass = False
        self._aem_token_entropy: torch.Tensor | None = None
        self._aem_generation_entropy: list[torch.Tensor] | None = None
        self._aem_generator = torch.Generator().manual_seed(int(self.args.seed))

    # ------------------------------------------------------------------ set-up
    def _old_logps_pass_runs(self) -> bool:
        """Whether GRPOTrainer computes ``old_per_token_logps`` in its scoring step (mirrors its own condition)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _generation_recordable(self) -> bool:
        """Whether completions come from one plain ``transformers`` ``generate`` call we can hook."""
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
        recorder = _GenerationEntropyRecorder(self.temperature)
        handle = self._causal_lm().register_forward_hook(recorder)
        try:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        finally:
            handle.remove()
        recorded = recorder.entropies()
        longest = max((len(ids) for ids in completion_ids), default=0)
        if recorded is None or recorded.size(0) != len(completion_ids) or recorded.size(1) < longest:
            warnings.warn("AEM could not record entropies during generation; falling back to an extra forward pass.")
            self._aem_generation_entropy = None
        else:
            self._aem_generation_entropy = [recorded[i, : len(ids)] for i, ids in enumerate(completion_ids)]
        return completion_ids, logprobs

    def _causal_lm(self) -> torch.nn.Module:
        """The transformers causal-LM module whose forward ``generate`` calls (under PEFT/accelerate wrappers)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # ------------------------------------------------------------------ scoring
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """GRPOTrainer's generation and scoring, then AEM: advantages become ``(B, T)`` ``alpha * A_base``."""
        if not self.args.use_aem:
            return super()._generate_and_score_completions(inputs)
        self._aem_token_entropy = None
        self._aem_generation_entropy = None
        self._aem_capture_old_pass = self.aem_entropy_source == "old_logps"
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._aem_capture_old_pass = False
        token_entropy = self._aem_collect_token_entropy(output)
        output["advantages"] = self._aem_modulate(output, token_entropy, span_ids=output.pop("span_ids", None))
        return output

    def _aem_collect_token_entropy(self, output: dict[str, Any]) -> torch.Tensor:
        """``(B, T)`` entropies of the completion tokens under the sampling policy, from the cheapest source."""
        completion_ids = output["completion_ids"]
        if self._aem_token_entropy is not None:
            entropy = self._aem_token_entropy
        elif self._aem_generation_entropy is not None:
            entropy = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
            for row, values in enumerate(self._aem_generation_entropy):
                width = min(values.numel(), entropy.size(1))
                entropy[row, :width] = values[:width].to(entropy.device)
        else:
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
            _, entropy, _ = self._get_per_token_logps_and_entropies(
                self.model, prompt_completion_ids, attention_mask, output["completion_ids"].size(1),
                batch_size=batch_size, compute_entropy=True, **forward_kwargs,
            )
        return entropy

    def _aem_modulate(self, output: dict[str, Any], token_entropy: torch.Tensor,
                      span_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Apply AEM to ``output["advantages"]`` over whole groups gathered from all processes; log metrics."""
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = output["advantages"]
        if advantages.dim() != 1:
            raise ValueError("AEM expects one base advantage per trajectory (a (B,) tensor) from GRPOTrainer")
        loss_mask = output["completion_mask"]
        if "tool_mask" in output:
            loss_mask = loss_mask * output["tool_mask"]
        table = span_mean_entropy(token_entropy, loss_mask, span_ids)

        # Gather every process's spans: a group's completions may sit on several processes.
        local_rows = advantages.size(0)
        row_offset = self.accelerator.process_index * local_rows
        global_row = table.row + row_offset
        local = torch.stack(
            [table.response_entropy.double(), global_row.double(), table.num_tokens.double(),
             advantages.detach().double()[table.row], torch.ones_like(global_row, dtype=torch.float64)],
            dim=1,
        )
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=0))
        gathered = gathered[gathered[:, 4] > 0]
        all_entropy, all_row = gathered[:, 0].float(), gathered[:, 1].long()
        all_tokens, all_adv = gathered[:, 2].long(), gathered[:, 3]
        nonempty = all_tokens > 0
        # Spans with no loss tokens carry no gradient; keep them out of the statistics (NaN entropy = invalid).
        all_entropy = torch.where(nonempty, all_entropy, torch.full_like(all_entropy, float("nan")))

        result = aem_modulation(
            all_entropy,
            torch.div(all_row, num_generations, rounding_mode="floor"),
            lam=self.args.aem_lambda,
            min_range=self.args.aem_min_entropy_range,
            scope=self.args.aem_scope,
            direction=self.args.aem_direction,
            trajectory_index=all_row,
            generator=self._aem_generator,
        )
        self._aem_log_metrics(mode, result, all_entropy, all_adv, nonempty)

        mine = (all_row >= row_offset) & (all_row < row_offset + local_rows)
        local_alpha = result.alpha[mine].to(advantages.device)
        token_alpha = broadcast_span_values(local_alpha, table.span_index)
        return modulate_advantages(advantages, token_alpha)

    def _aem_log_metrics(self, mode, result, span_entropy, span_advantage, nonempty) -> None:
        """Log AEM's span statistics (identical on every process, computed over the gathered batch)."""
        metrics = self._metrics[mode]
        valid = result.valid
        alpha = result.alpha[valid].double()
        if alpha.numel() == 0:
            alpha = torch.ones(1, dtype=torch.float64)
        metrics["aem/alpha_mean"].append(alpha.mean().item())
        metrics["aem/alpha_std"].append(alpha.std(unbiased=False).item())
        metrics["aem/alpha_min"].append(alpha.min().item())
        metrics["aem/alpha_max"].append(alpha.max().item())
        metrics["aem/gated_frac"].append(result.gated[valid].float().mean().item() if valid.any() else 1.0)
        metrics["aem/response_entropy_mean"].append(span_entropy[valid].mean().item() if valid.any() else 0.0)
        metrics["aem/neg_adv_frac"].append((span_advantage[nonempty] < 0).float().mean().item() if nonempty.any() else 0.0)
        metrics["aem/nonfinite_entropy_spans"].append(float((nonempty & ~valid).sum().item()))
