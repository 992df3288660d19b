"""``AEMGRPOConfig``: TRL's ``GRPOConfig`` plus the fields of Adaptive Entropy Modulation."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from .aem import DIRECTIONS, SCOPES
from .credit import STEP_SCALES

ENTROPY_SOURCES = ("auto", "generation", "old_logps", "extra_pass")
ENV_CONTEXTS = ("full", "window", "summary", "echo")
#: ``env_credit`` values: how the episode's advantage reaches the tokens of its segment rows.
ENV_CREDITS = ("auto", "episode", "echo", "gigpo")
#: The contexts whose episodes are several training rows (segments).
SEGMENT_CONTEXTS = ("window", "summary", "echo")
ENV_PROMPT_FORMATS = ("chat", "react")


def _check_number(name: str, value, *, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


def parse_env_kwargs(value, name: str = "env_kwargs"):
    """``env_kwargs`` as given in Python, YAML or on the command line: a dict, a JSON object string, or ``None``
    (``name``: the field named in the errors)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} must be a JSON object string or a dict, got {value!r}") from exc
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of keyword arguments for gymnasium.make, got {value!r}")
    return value


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass
class AEMGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`AEMGRPOTrainer`]: every field of TRL's `GRPOConfig`, plus the AEM fields below.

    AEM rescales the base (GRPO/DAPO/GSPO/Dr.GRPO/BNPO) advantage of every response span by
    `alpha = exp(-aem_lambda * Htilde) / mean_group(exp(-aem_lambda * Htilde))`, where `Htilde` is the span's mean
    token entropy min-max normalised within its group (see `docs/method.md`).

    Parameters:
        use_aem (`bool`, *optional*, defaults to `True`):
            Switch AEM on. With `False` the trainer is exactly TRL's `GRPOTrainer`.
        aem_lambda (`float`, *optional*, defaults to `1.0`):
            Modulation strength `lambda` (the paper uses 1.0). `0.0` gives alpha = 1 everywhere.
        aem_min_entropy_range (`float`, *optional*, defaults to `0.1`):
            Range gate: a group whose span entropies span less than this (max - min, in nats) keeps alpha = 1.
        aem_scope (`str`, *optional*, defaults to `"group"`):
            Where min-max normalisation and the mean of alpha run: `"group"` (all spans of the G trajectories of one
            prompt; the paper's), `"trajectory"` (the spans of one trajectory) or `"batch"` (all spans of the
            generation batch; an EMPG-style baseline).
        aem_direction (`str`, *optional*, defaults to `"normal"`):
            `"normal"` (low-entropy spans get alpha > 1), `"reverse"` (`exp(+lambda * Htilde)`, an ablation) or
            `"shuffle"` (normal alphas permuted within each group, an ablation; seeded by `seed`).
        aem_entropy_source (`str`, *optional*, defaults to `"auto"`):
            Where per-token entropies come from. `"generation"` records them while `transformers` generates (no
            extra forward pass), `"old_logps"` computes them in the old-log-probability pass TRL already runs (with
            vLLM, or `num_iterations > 1`), `"extra_pass"` runs one more no-grad forward pass. `"auto"` picks the
            first of these that applies to the configuration.

        > Multi-turn environments (used when the trainer gets `env=...`)

        env_max_turns (`int`, *optional*, defaults to `10`):
            Most agent turns per episode. An episode that reaches it without terminating counts as a failure.
        env_max_new_tokens_per_turn (`int`, *optional*, defaults to `64`):
            Most tokens generated in one turn. The whole trajectory (actions and observations) is further limited
            by `max_completion_length`.
        env_generation_chunk_size (`int`, *optional*):
            Most episodes in one `transformers` `generate` call: each turn's contexts (all unfinished episodes of
            the generation batch) are generated in chunks of this size, one after the other. The prefill activations
            and the KV cache grow with chunk x context length, so this bounds the rollout's GPU memory (see
            `benchmarks/memory_plan.py`); sampling is unchanged in distribution. `None`: the whole turn in one call.
            Not used with vLLM, which schedules its own batches.
        env_reuse_kv_cache (`bool`, *optional*, defaults to `False`):
            Keep each episode's KV cache between its turns, so that a turn encodes only the tokens added since the
            episode's previous turn (the observation) instead of re-encoding the whole context. The sampling
            distribution is unchanged (greedy decoding gives the same tokens; tested in float32 on a CPU). Faster
            for long episodes; the caches of all unfinished episodes of the generation batch stay in memory between
            turns, so the rollout's peak memory changes: roughly the KV cache of the whole generation batch plus the prefill of one chunk's new
            tokens, instead of the prefill and KV cache of one chunk's whole contexts. For models whose cache is a
            plain `DynamicCache` (full attention, e.g. Qwen2.5); others fall back to re-encoding with a warning.
            Not used with vLLM (vLLM caches prefixes itself).
        env_context (`str`, *optional*, defaults to `"full"`):
            What the model sees at each turn. `"full"`: one growing sequence per episode (prompt, action 1,
            observation 1, action 2, ...), one training row per episode. `"window"`: the paper's step-wise setting:
            every turn is a fresh prompt (the task, the last `env_history_turns` observation/action pairs and the
            current observation) and one training row (a *segment*); every segment carries its episode's advantage,
            and AEM's group is all turns of the G episodes of one task (see `docs/environments.md`).
            `"summary"` (SUPO) and `"echo"` (ECHO's selective turn memory): one growing segment until the context
            passes `env_context_budget` tokens; then the policy writes a summary (summary) or selects earlier turns
            (echo), and the next segment starts from a rebuilt prompt (see `docs/credit.md`).
        env_history_turns (`int`, *optional*, defaults to `2`):
            With `env_context="window"`, how many earlier observation/action pairs each turn's prompt shows (>= 0;
            verl-agent's `history_length`).
        env_context_budget (`int`, *optional*):
            With `env_context="summary"` or `"echo"` (required there): when the active segment (its prompt, its
            completion so far and the next observation) would pass this many tokens, the policy writes a memory and
            the next segment starts from a rebuilt prompt. A segment's completion then holds about this many tokens
            plus the request and the memory, so keep `max_completion_length` above
            `env_context_budget + env_memory_max_tokens` plus a request's length.
        env_memory_max_tokens (`int`, *optional*, defaults to `64`):
            Most tokens of one summary or selection.
        env_max_rebuilds (`int`, *optional*, defaults to `5`):
            Most rebuilds per episode (summary, echo); a budget boundary after that many ends the episode as
            overlong: a failure whose advantage is set to zero (ECHO's and SUPO's rule).
        env_echo_recent_turns (`int`, *optional*, defaults to `3`):
            With `env_context="echo"`, the most recent turns every rebuilt prompt shows in full (ECHO: 3).
        env_credit (`str`, *optional*, defaults to `"auto"`):
            Which tokens of an episode's segment rows get which advantage. `"episode"`: every generated token gets
            the episode's (group-relative) advantage (with `"summary"` this is SUPO's estimator; with `"echo"` it is
            ECHO's *dense credit* ablation). `"echo"` (needs `env_context="echo"`): ECHO's traceable credit, only the
            final segment and the action, finding and selection tokens of the turns selected in the final rebuild
            keep a gradient. `"gigpo"` (needs `env_context="window"`): GiGPO, every step's advantage is the episode's
            plus `env_gigpo_omega` times a step-level advantage over anchor states (steps of one task's episodes that
            saw the same observation, compared on their discounted returns). `"auto"`: `"echo"` with
            `env_context="echo"`, else `"episode"`. AEM's alpha multiplies whatever this gives.
        env_positive_advantages (`bool`, *optional*):
            Apply only the positive part of the advantage (failed rollouts get no update; ECHO's rule). `None`:
            True with `env_context="echo"`, else False.
        env_gigpo_gamma (`float`, *optional*, defaults to `0.95`):
            With `env_credit="gigpo"`, the discount of the step returns (in [0, 1]; verl-agent's ALFWorld setting).
        env_gigpo_omega (`float`, *optional*, defaults to `1.0`):
            With `env_credit="gigpo"`, the weight of the step-level advantage (>= 0).
        env_gigpo_step_scale (`str`, *optional*, defaults to `"std"`):
            With `env_credit="gigpo"`, `"std"` divides a step's deviation from its step group's mean by the group's
            standard deviation; `"none"` does not (verl-agent's `mean_norm`).
        env_prompt_format (`str`, *optional*, defaults to `"chat"`):
            `"chat"`: observations are user messages and the model's answer is the action. `"react"`: each turn's
            user message is a step prompt (task, step number, recent history, current observation, admissible
            actions when the environment lists them) asking for reasoning in `<think>...</think>` and the action in
            `<action>...</action>`; an answer without exactly one well-formed action tag is an invalid action: the
            environment is not stepped, the turn gets reward `-env_invalid_action_penalty`.
        env_invalid_action_penalty (`float`, *optional*, defaults to `0.1`):
            The reward of a malformed answer with `env_prompt_format="react"` is minus this (paper: 0.1).
        env_max_prompt_length (`int`, *optional*):
            Most tokens in a segment's prompt (with `env_context="window"`, every turn's rebuilt prompt); a turn whose
            prompt would be longer ends the episode as truncated (a failure). Bounds the window's memory, and is the
            prompt length `benchmarks/memory_plan.py` traces for a window recipe. `None`: no limit.
        env_rows_per_forward (`int`, *optional*):
            With a segment context (`"window"`, `"summary"`, `"echo"`), most segment rows in one forward pass (the
            scoring passes, and the loss,
            which then runs its backward pass in parts of this many rows). A rollout of N episodes gives up to
            N x `env_max_turns` rows; this bounds their activation memory. `None`: no bound.
        env_system_prompt (`str`, *optional*):
            A system message put before the dataset's prompt (chat models) or a first line (plain text).
        env_kwargs (`dict`, *optional*):
            Keyword arguments for `gymnasium.make` (or the factory), e.g. difficulty knobs.
        env_num_workers (`int`, *optional*, defaults to `8`):
            Environment `reset`/`step` calls of one turn run in up to this many threads.
        env_timeout (`float`, *optional*, defaults to `60.0`):
            Seconds one `reset`/`step` call may take; past it the episode ends as a failure. `None`: no limit.
        env_raise_on_error (`bool`, *optional*, defaults to `False`):
            Raise when an environment call fails, instead of ending that episode as a failure and going on.
        env_log_trajectories (`int`, *optional*, defaults to `4`):
            With `report_to` containing `"wandb"`, log this many episodes of the latest rollout (step, task seed,
            turns, success, return, transcript of observations and actions, error) as a `wandb.Table` named
            `train/env/trajectories` at every logging step. `0` turns it off.

        > Reporting

        aem_plots (`bool`, *optional*, defaults to `True`):
            Write PNG plots of success, reward, entropy and AEM's alpha distribution against step to
            `<output_dir>/plots/` (see `trl_aem.callbacks.plot_training`), on the main process.
        aem_plot_every (`int`, *optional*, defaults to `10`):
            Also redraw the plots every this many training logs (`0`: only at the end of training).
    """

    use_aem: bool = field(default=True, metadata={"help": "Switch Adaptive Entropy Modulation on (False = plain GRPO)."})
    aem_lambda: float = field(default=1.0, metadata={"help": "AEM strength lambda (paper: 1.0); 0 gives alpha = 1."})
    aem_min_entropy_range: float = field(
        default=0.1,
        metadata={"help": "Range gate: a group whose span-entropy range is below this keeps alpha = 1 (paper: 0.1)."},
    )
    aem_scope: str = field(
        default="group",
        metadata={"help": "Normalisation scope of AEM.", "choices": list(SCOPES)},
    )
    aem_direction: str = field(
        default="normal",
        metadata={"help": "AEM direction: normal, reverse or shuffle (ablations).", "choices": list(DIRECTIONS)},
    )
    aem_entropy_source: str = field(
        default="auto",
        metadata={"help": "Where per-token entropies come from.", "choices": list(ENTROPY_SOURCES)},
    )

    env_max_turns: int = field(default=10, metadata={"help": "Most agent turns per episode."})
    env_max_new_tokens_per_turn: int = field(default=64, metadata={"help": "Most tokens generated in one turn."})
    env_generation_chunk_size: int | None = field(
        default=None, metadata={"help": "Most episodes per transformers generate call in a turn (None = all)."}
    )
    env_reuse_kv_cache: bool = field(
        default=False, metadata={"help": "Keep each episode's KV cache between turns (encode only new tokens)."}
    )
    env_context: str = field(
        default="full",
        metadata={"help": "full: one growing sequence per episode; window: a fresh prompt per turn (step-wise); "
                          "summary / echo: a rebuilt prompt (a summary / selected turns) at a token budget.",
                  "choices": list(ENV_CONTEXTS)},
    )
    env_history_turns: int = field(
        default=2, metadata={"help": "With env_context=window: earlier observation/action pairs shown per turn."}
    )
    env_context_budget: int | None = field(
        default=None,
        metadata={"help": "With env_context=summary/echo: tokens of the active context that trigger a rebuild."},
    )
    env_memory_max_tokens: int = field(default=64, metadata={"help": "Most tokens of one summary or selection."})
    env_max_rebuilds: int = field(
        default=5, metadata={"help": "Most rebuilds per episode (summary/echo); one more ends it as overlong."}
    )
    env_echo_recent_turns: int = field(
        default=3, metadata={"help": "With env_context=echo: recent turns every rebuilt prompt shows in full."}
    )
    env_credit: str = field(
        default="auto",
        metadata={"help": "episode (every token the episode's advantage), echo (ECHO's traceable mask), gigpo "
                          "(episode + step-level advantage); auto = echo with env_context=echo, else episode.",
                  "choices": list(ENV_CREDITS)},
    )
    env_positive_advantages: bool | None = field(
        default=None,
        metadata={"help": "Apply only the positive part of the advantage (None: True with env_context=echo)."},
    )
    env_gigpo_gamma: float = field(default=0.95, metadata={"help": "GiGPO: discount of the step returns."})
    env_gigpo_omega: float = field(default=1.0, metadata={"help": "GiGPO: weight of the step-level advantage."})
    env_gigpo_step_scale: str = field(
        default="std", metadata={"help": "GiGPO: scale step deviations by the step group's std, or none.",
                                 "choices": list(STEP_SCALES)},
    )
    env_prompt_format: str = field(
        default="chat",
        metadata={"help": "chat: observations as messages; react: step prompts with <think>/<action> tags.",
                  "choices": list(ENV_PROMPT_FORMATS)},
    )
    env_invalid_action_penalty: float = field(
        default=0.1, metadata={"help": "With env_prompt_format=react: reward -penalty for a malformed answer."}
    )
    env_max_prompt_length: int | None = field(
        default=None, metadata={"help": "Most tokens in a segment's prompt (longer ends the episode; None = no limit)."}
    )
    env_rows_per_forward: int | None = field(
        default=None, metadata={"help": "With env_context=window: most segment rows per forward pass (None = all)."}
    )
    env_system_prompt: str | None = field(default=None, metadata={"help": "System message for environment episodes."})
    env_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for gymnasium.make (a dict, or a JSON string)."}
    )
    env_num_workers: int = field(default=8, metadata={"help": "Threads for environment reset/step calls."})
    env_timeout: float | None = field(default=60.0, metadata={"help": "Seconds one reset/step call may take."})
    env_raise_on_error: bool = field(
        default=False, metadata={"help": "Raise on an environment failure instead of failing that episode."}
    )
    env_log_trajectories: int = field(
        default=4, metadata={"help": "Episodes logged as a wandb.Table at each logging step (0 = off)."}
    )
    aem_plots: bool = field(
        default=True, metadata={"help": "Write PNG plots of success, entropy and alpha to <output_dir>/plots."}
    )
    aem_plot_every: int = field(
        default=10, metadata={"help": "Redraw the plots every this many logs (0 = only at the end of training)."}
    )

    def __post_init__(self):
        if not isinstance(self.use_aem, bool):
            raise ValueError(f"use_aem must be True or False, got {self.use_aem!r}")
        _check_number("aem_lambda", self.aem_lambda)
        _check_number("aem_min_entropy_range", self.aem_min_entropy_range)
        _check_choice("aem_scope", self.aem_scope, SCOPES)
        _check_choice("aem_direction", self.aem_direction, DIRECTIONS)
        _check_choice("aem_entropy_source", self.aem_entropy_source, ENTROPY_SOURCES)
        for name in ("env_max_turns", "env_max_new_tokens_per_turn", "env_num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        chunk = self.env_generation_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"env_generation_chunk_size must be an integer >= 1, or None for the whole turn in one "
                             f"generate call, got {chunk!r}")
        if self.env_timeout is not None:
            _check_number("env_timeout", self.env_timeout)
            if self.env_timeout == 0:
                raise ValueError("env_timeout must be > 0 seconds, or None for no limit")
        self.env_kwargs = parse_env_kwargs(self.env_kwargs)
        if not isinstance(self.env_reuse_kv_cache, bool):
            raise ValueError(f"env_reuse_kv_cache must be True or False, got {self.env_reuse_kv_cache!r}")
        if self.env_reuse_kv_cache and self.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"env_reuse_kv_cache=True keeps dynamic KV caches between turns; it cannot be combined with "
                             f"cache_implementation={self.cache_implementation!r} (allowed: None or 'dynamic')")
        if self.env_reuse_kv_cache and self.use_vllm:
            raise ValueError("env_reuse_kv_cache=True applies to transformers generation; with use_vllm=True, vLLM "
                             "caches prefixes itself: leave env_reuse_kv_cache False")
        _check_choice("env_context", self.env_context, ENV_CONTEXTS)
        _check_choice("env_prompt_format", self.env_prompt_format, ENV_PROMPT_FORMATS)
        history = self.env_history_turns
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"env_history_turns must be an integer >= 0, got {history!r}")
        _check_number("env_invalid_action_penalty", self.env_invalid_action_penalty)
        for name in ("env_max_prompt_length", "env_rows_per_forward"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, or None for no limit, got {value!r}")
        self._check_memory_and_credit()
        if self.env_context == "window":
            if self.env_reuse_kv_cache:
                raise ValueError("env_reuse_kv_cache=True has nothing to reuse with env_context='window' (every turn is a "
                                 "fresh prompt); leave it False, or use env_context='full'")
            if self.use_vllm:
                raise ValueError("env_context='window' does not support use_vllm=True yet (its importance-sampling "
                                 "correction would need per-segment sampling log-probabilities); use transformers "
                                 "generation (use_vllm=False) or env_context='full'")
        if not isinstance(self.env_raise_on_error, bool):
            raise ValueError(f"env_raise_on_error must be True or False, got {self.env_raise_on_error!r}")
        if not isinstance(self.aem_plots, bool):
            raise ValueError(f"aem_plots must be True or False, got {self.aem_plots!r}")
        for name, meaning in (("env_log_trajectories", "0 = off"), ("aem_plot_every", "0 = only at the end")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 ({meaning}), got {value!r}")
        super().__post_init__()

    def _check_memory_and_credit(self) -> None:
        """Validate the memory-context and credit fields (``env_context_budget`` ... ``env_gigpo_step_scale``)."""
        for name, least in (("env_memory_max_tokens", 1), ("env_max_rebuilds", 0), ("env_echo_recent_turns", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        budget = self.env_context_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"env_context_budget must be an integer >= 1 (tokens), or None, got {budget!r}")
        if self.env_context in ("summary", "echo"):
            if budget is None:
                raise ValueError(f"env_context={self.env_context!r} rebuilds the prompt when the context passes a token "
                                 "budget: set env_context_budget (an integer >= 1)")
            if self.use_vllm:
                raise ValueError(f"env_context={self.env_context!r} does not support use_vllm=True yet (its segment rows "
                                 "would need per-segment sampling log-probabilities); use transformers generation")
        _check_choice("env_credit", self.env_credit, ENV_CREDITS)
        if self.env_positive_advantages is not None and not isinstance(self.env_positive_advantages, bool):
            raise ValueError(f"env_positive_advantages must be True, False or None, got {self.env_positive_advantages!r}")
        if self.env_credit == "echo" and self.env_context != "echo":
            raise ValueError(f"env_credit='echo' credits the turns selected at the final rebuild: it needs "
                             f"env_context='echo', got env_context={self.env_context!r}")
        if self.env_credit == "gigpo" and self.env_context != "window":
            raise ValueError(f"env_credit='gigpo' compares steps (one training row per step, a fresh prompt per turn): "
                             f"it needs env_context='window', got env_context={self.env_context!r}")
        gamma = self.env_gigpo_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"env_gigpo_gamma must be a number in [0, 1], got {gamma!r}")
        _check_number("env_gigpo_omega", self.env_gigpo_omega)
        _check_choice("env_gigpo_step_scale", self.env_gigpo_step_scale, STEP_SCALES)

    @property
    def env_credit_method(self) -> str:
        """``env_credit`` with ``"auto"`` resolved: ``"echo"`` with ``env_context="echo"``, else ``"episode"``."""
        if self.env_credit == "auto":
            return "echo" if self.env_context == "echo" else "episode"
        return self.env_credit

    @property
    def env_positive_only(self) -> bool:
        """``env_positive_advantages`` with ``None`` resolved (True with ``env_context="echo"``)."""
        if self.env_positive_advantages is None:
            return self.env_context == "echo"
        return self.env_positive_advantages

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig, **aem_fields) -> "AEMGRPOConfig":
        """Build an `AEMGRPOConfig` holding every setting of an existing `GRPOConfig` (plus `aem_fields`)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig) if f.init}
        # GRPOConfig.__post_init__ derives one of these two from the other; pass only the one it was derived from.
        values["generation_batch_size"] = None
        values.update(aem_fields)
        return cls(**values)
