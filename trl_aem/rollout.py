"""Multi-turn rollouts of a language-model agent in gymnasium text environments.

One trajectory is one training sequence: ``prompt, action 1, observation 1, action 2, ..., action K``. Generated
tokens are kept exactly as sampled (never re-tokenised); observation tokens are rendered with the tokenizer's chat
template (observations as user messages, actions as assistant messages) or as plain text, attended to but kept out
of the loss (``env_mask`` 0, ``span_ids`` -1). Every generated turn is one AEM span (``span_ids`` = turn index).

All active episodes generate their next turn in ONE batched call per turn; environment ``reset``/``step`` calls of
a turn run in a small pool of daemon threads, each with an optional time-out.

Limits and the rule for hitting them: a turn generates at most ``max_new_tokens_per_turn`` tokens (a turn cut by
this limit is still sent to the environment, and is still one whole span); the whole trajectory (actions and
observations) holds at most ``max_completion_length`` tokens: the next turn may only use what is left, and an
observation that does not fit ends the episode (it is not appended). An episode that reaches ``max_turns`` without
terminating, or runs out of token budget, ends *truncated* and counts as a failure (``success=False``), its return
being the sum of the rewards it got so far.

Memory contexts (:class:`~trl_aem.context.MemoryContext`: ``env_context="summary"`` or ``"echo"``): when the active
segment would pass the policy's token budget, the observation and a request are appended (masked), the episode's next
generation is a memory (a summary or a selection; its own span, ``MEMORY_SPAN_OFFSET + k``, not a turn: no
environment step), and the next segment starts from the prompt the policy rebuilds. A boundary after the policy's
``max_rebuilds`` rebuilds ends the episode as overlong (``Episode.overlong``, truncated, a failure).

Faults: an exception or a time-out in ``reset``/``step`` ends that episode as a failure with ``error`` set (unless
``raise_on_error``); the other episodes go on. An environment returning a malformed result raises
:class:`EnvironmentProtocolError` naming the environment and what it returned.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium

from .context import (
    MALFORMED_ACTION_NOTE,
    MEMORY_SPAN_OFFSET,
    ContextPolicy,
    FullContext,
    Memory,
    MemoryContext,
    TurnHistory,
    first_user_message,
)
from .envs import resolve_env_id

logger = logging.getLogger(__name__)

#: ``generate(contexts, max_new_tokens) -> (tokens, entropies)`` or ``(tokens, entropies, logprobs)``: for every
#: context (a list of token ids), the sampled continuation (up to and including its EOS token, if any), the entropy
#: at each sampled position (``None`` when the backend does not provide entropies) and, optionally, the sampling
#: log-probability of each sampled token (vLLM gives them; TRL's importance-sampling correction needs them).
#: A function with the attribute ``accepts_keys = True`` is also given ``keys=``: one key per context, stable across
#: the turns of one rollout and unique to it, so that it can keep per-episode state such as a KV cache between turns;
#: a ``release()`` attribute, if any, is called when the rollout ends.
GenerateFn = Callable[[list[list[int]], int], tuple]


class EnvironmentProtocolError(TypeError):
    """An environment returned something that breaks the text-environment convention."""


class EnvironmentTimeout(TimeoutError):
    """An environment call did not return within the time-out."""


@dataclass
class RolloutLimits:
    """Limits of one episode: turns, generated tokens per turn, tokens in a segment's completion (with the full
    context: the whole trajectory) and, optionally, in a segment's prompt (a longer prompt ends the episode as
    truncated; the windowed context's memory bound)."""

    max_turns: int = 10
    max_new_tokens_per_turn: int = 64
    max_completion_length: int = 1024
    max_prompt_length: int | None = None

    def __post_init__(self):
        for name in ("max_turns", "max_new_tokens_per_turn", "max_completion_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is None and name == "max_prompt_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def prompt_fits(self, prompt_ids) -> bool:
        """Whether a segment's prompt is within ``max_prompt_length``."""
        return self.max_prompt_length is None or len(prompt_ids) <= self.max_prompt_length


@dataclass
class Segment:
    """One training row of a trajectory: a prompt (the context the model saw) and what followed it in that context."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)  # 1 for generated tokens, 0 for observation tokens
    span_ids: list[int] = field(default_factory=list)  # turn index for generated tokens, -1 for observations
    token_entropy: list[float] = field(default_factory=list)  # entropy of generated tokens, 0 for observations
    token_logprobs: list[float] = field(default_factory=list)  # sampling logprob of generated tokens, NaN otherwise


@dataclass
class Episode(Segment):
    """One multi-turn trajectory and its outcome.

    The :class:`Segment` fields (``prompt_ids`` ... ``token_logprobs``) hold the episode's current (with
    ``env_context="full"``: only) segment; ``closed_segments`` the earlier ones (``env_context="window"``);
    :meth:`segments` lists them all.
    """

    actions: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)  # observations[0] is the one from reset
    rewards: list[float] = field(default_factory=list)
    success: bool = False
    terminated: bool = False
    truncated: bool = False
    invalid_actions: int = 0
    error: str | None = None
    done: bool = False
    closed_segments: list[Segment] = field(default_factory=list)
    task: str | None = None  # info["task"] from reset, if the environment states it
    admissible_actions: list[str] | None = None  # info["admissible_actions"] of the latest observation
    malformed_actions: int = 0  # react answers without a well-formed action tag
    env_observation: str = ""  # the environment's latest observation (a malformed answer's reminder is not one)
    findings: list[str] = field(default_factory=list)  # findings[t]: the finding turn t's answer carried ("" if none)
    turn_segments: list[int] = field(default_factory=list)  # turn_segments[t]: the segment turn t was generated in
    memories: list[Memory] = field(default_factory=list)  # what the policy wrote at each rebuild (memory contexts)
    memory_pending: bool = False  # the next generation is a memory (a summary or a selection), not an action
    overlong: bool = False  # ended at a budget boundary after env_max_rebuilds rebuilds (memory contexts)

    def segments(self) -> list[Segment]:
        """Every segment of the episode, in order (the current one last)."""
        current = Segment(self.prompt_ids, self.completion_ids, self.env_mask, self.span_ids, self.token_entropy,
                          self.token_logprobs)
        return [*self.closed_segments, current]

    def start_segment(self, prompt_ids: list[int]) -> None:
        """Close the current segment (if it has any generated token) and start a new one with ``prompt_ids``."""
        if self.completion_ids:
            self.closed_segments.append(self.segments()[-1])
        self.prompt_ids, self.completion_ids, self.env_mask, self.span_ids = list(prompt_ids), [], [], []
        self.token_entropy, self.token_logprobs = [], []

    def history(self, prompt: Any) -> TurnHistory:
        """The episode so far in text, for a context policy."""
        return TurnHistory(prompt, list(self.observations), list(self.actions), self.task, self.admissible_actions,
                           list(self.findings), list(self.memories))

    def records(self) -> list[dict]:
        """Every turn as a source-indexed record: ``turn`` (0-based id), ``action``, ``finding`` and ``segment`` (the
        index of the segment it was generated in), oldest first."""
        return [{"turn": t, "action": action, "finding": self.findings[t] if t < len(self.findings) else "",
                 "segment": self.turn_segments[t] if t < len(self.turn_segments) else 0}
                for t, action in enumerate(self.actions)]

    @property
    def episode_return(self) -> float:
        """Sum of the environment's rewards."""
        return float(sum(self.rewards))

    @property
    def num_turns(self) -> int:
        """Number of actions the agent took."""
        return len(self.actions)

    def append_action(self, tokens: Sequence[int], entropies: Sequence[float] | None, text: str,
                      logprobs: Sequence[float] | None = None) -> None:
        """Append one generated turn (a whole span)."""
        turn = len(self.actions)
        self.completion_ids.extend(tokens)
        self.env_mask.extend([1] * len(tokens))
        self.span_ids.extend([turn] * len(tokens))
        self.token_entropy.extend(list(entropies) if entropies is not None else [0.0] * len(tokens))
        self.token_logprobs.extend(list(logprobs) if logprobs is not None else [float("nan")] * len(tokens))
        self.actions.append(text)

    def append_memory(self, tokens: Sequence[int], entropies: Sequence[float] | None,
                      logprobs: Sequence[float] | None = None) -> int:
        """Append one generated memory (a summary or a selection: a whole span, not a turn); returns its span id,
        ``MEMORY_SPAN_OFFSET + k`` for the episode's ``k``-th memory."""
        span = MEMORY_SPAN_OFFSET + len(self.memories)
        self.completion_ids.extend(tokens)
        self.env_mask.extend([1] * len(tokens))
        self.span_ids.extend([span] * len(tokens))
        self.token_entropy.extend(list(entropies) if entropies is not None else [0.0] * len(tokens))
        self.token_logprobs.extend(list(logprobs) if logprobs is not None else [float("nan")] * len(tokens))
        return span

    def append_observation(self, tokens: Sequence[int]) -> None:
        """Append observation tokens (attended to, out of the loss)."""
        self.completion_ids.extend(tokens)
        self.env_mask.extend([0] * len(tokens))
        self.span_ids.extend([-1] * len(tokens))
        self.token_entropy.extend([0.0] * len(tokens))
        self.token_logprobs.extend([float("nan")] * len(tokens))


def make_env_factory(env: str | Callable[[], gymnasium.Env], env_kwargs: dict | None = None) -> Callable[[], Any]:
    """Turn a gymnasium id (``"trl_aem/Household-v0"``, or ``"module:EnvId"``) or a factory into a zero-argument
    factory; an id is checked now (:func:`trl_aem.envs.resolve_env_id`), a ``ValueError`` naming it if unknown."""
    if isinstance(env, str):
        kwargs = dict(env_kwargs or {})
        env_id = resolve_env_id(env, name="env")
        return lambda: gymnasium.make(env_id, **kwargs)
    if callable(env):
        if env_kwargs:
            return lambda: env(**env_kwargs)
        return env
    raise ValueError(f"env must be a gymnasium id or a callable returning a gymnasium.Env, got {type(env).__name__}")


def env_name(env: Any) -> str:
    """A readable name for an environment instance (its spec id, or its class)."""
    spec = getattr(env, "spec", None)
    if spec is not None and getattr(spec, "id", None):
        return spec.id
    return type(getattr(env, "unwrapped", env)).__name__


def row_seed(row: dict) -> int:
    """The task seed of a dataset row: its ``seed`` column, else a stable hash of the row (same for G copies)."""
    seed = row.get("seed")
    if seed is not None:
        return int(seed)
    digest = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in row.items())).encode()).hexdigest()
    return int(digest[:8], 16)


def check_reset_result(env: Any, result: Any) -> tuple[str, dict]:
    """Validate ``reset``'s ``(observation: str, info: dict)``."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise EnvironmentProtocolError(
            f"{env_name(env)}.reset() must return (observation: str, info: dict), got {result!r:.200}"
        )
    observation, info = result
    if not isinstance(observation, str):
        raise EnvironmentProtocolError(
            f"{env_name(env)}.reset() returned a {type(observation).__name__} observation ({observation!r:.100}); "
            "text environments must return a str"
        )
    return observation, dict(info or {})


def check_step_result(env: Any, result: Any) -> tuple[str, float, bool, bool, dict]:
    """Validate ``step``'s ``(observation: str, reward, terminated, truncated, info)``."""
    if not (isinstance(result, tuple) and len(result) == 5):
        raise EnvironmentProtocolError(
            f"{env_name(env)}.step() must return (observation, reward, terminated, truncated, info), "
            f"got {result!r:.200}"
        )
    observation, reward, terminated, truncated, info = result
    if not isinstance(observation, str):
        raise EnvironmentProtocolError(
            f"{env_name(env)}.step() returned a {type(observation).__name__} observation ({observation!r:.100}); "
            "text environments must return a str"
        )
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise EnvironmentProtocolError(f"{env_name(env)}.step() returned a non-numeric reward {reward!r:.100}") from None
    return observation, reward, bool(terminated), bool(truncated), dict(info or {})


def call_all(calls: list[Callable[[], Any]], timeout: float | None, num_workers: int) -> list[tuple[Any, BaseException | None]]:
    """Run zero-argument calls in daemon threads (``num_workers`` at a time), each with a time-out.

    Returns ``(result, exception)`` per call; a call past its time-out yields an :class:`EnvironmentTimeout`
    (its thread is abandoned, never joined, so a hung environment cannot block the run or the interpreter's exit).
    """
    results: list[tuple[Any, BaseException | None]] = [(None, None)] * len(calls)
    if num_workers <= 1 and timeout is None:
        for i, call in enumerate(calls):
            try:
                results[i] = (call(), None)
            except Exception as exc:  # noqa: BLE001 - reported per episode
                results[i] = (None, exc)
        return results
    for start in range(0, len(calls), max(1, num_workers)):
        chunk = list(range(start, min(start + max(1, num_workers), len(calls))))
        boxes: dict[int, list] = {i: [] for i in chunk}

        def runner(i: int) -> None:
            try:
                boxes[i].append((calls[i](), None))
            except BaseException as exc:  # noqa: BLE001 - reported per episode
                boxes[i].append((None, exc))

        threads = {i: threading.Thread(target=runner, args=(i,), daemon=True) for i in chunk}
        for thread in threads.values():
            thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, thread in threads.items():
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if boxes[i]:
                results[i] = boxes[i][0]
            else:
                results[i] = (None, EnvironmentTimeout(f"no answer within {timeout} s"))
    return results


def initial_messages(prompt: Any, observation: str, system_prompt: str | None = None) -> list[dict]:
    """The first-turn conversation: ``prompt`` (messages or a string) with ``observation`` appended to its last
    user message (on a new line), and ``system_prompt`` as a leading system message if it has none."""
    messages = first_user_message(prompt, observation)
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


class ObservationRenderer:
    """Renders prompts and observations to token ids: with the tokenizer's chat template, or as plain text.

    With a chat template, the prompt is the dataset's conversation with the first observation appended to its last
    user message (as TRL does for ``environment_factory``), plus the generation prompt; each later observation is
    the template's text between an assistant message and the next assistant generation prompt, i.e. the end of the
    assistant turn (when the model did not generate it), the observation as a user message, and the assistant
    header. Without one, the prompt is its text plus the observation, and observations are ``"\\n" + text + "\\n"``.
    """

    _MARK = "ACTIONMARK"

    def __init__(self, tokenizer, system_prompt: str | None = None, chat_template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.use_chat_template = getattr(tokenizer, "chat_template", None) is not None
        eos = tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def prompt_text(self, prompt: Any, observation: str) -> str:
        """The prompt text for the first turn (conversation + first observation)."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                initial_messages(prompt, observation, self.system_prompt), tokenize=False, add_generation_prompt=True,
                **self.chat_template_kwargs,
            )
        if not isinstance(prompt, str):
            prompt = "\n".join(str(m.get("content", "")) for m in prompt)
        head = f"{self.system_prompt}\n" if self.system_prompt else ""
        separator = "\n" if prompt and observation else ""
        return f"{head}{prompt}{separator}{observation}\n"

    def prompt_ids(self, prompt: Any, observation: str) -> list[int]:
        """Token ids of :meth:`prompt_text`."""
        return self.tokenizer(self.prompt_text(prompt, observation), add_special_tokens=False)["input_ids"]

    def messages_text(self, messages: list[dict]) -> str:
        """A segment's prompt text from its conversation (the system prompt put first if it has none): the chat
        template with the generation prompt, or the messages' contents one per line (plain text)."""
        if self.system_prompt and messages and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **self.chat_template_kwargs)
        return "".join(f"{m.get('content', '')}\n" for m in messages)

    def messages_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of :meth:`messages_text`."""
        return self.tokenizer(self.messages_text(messages), add_special_tokens=False)["input_ids"]

    def observation_text(self, observation: str, action_ended_with_eos: bool) -> str:
        """The text placed between one generated action and the next."""
        if not self.use_chat_template:
            return f"\n{observation}\n"
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": self._MARK}]
        without = self.tokenizer.apply_chat_template(base, tokenize=False, **self.chat_template_kwargs)
        with_obs = self.tokenizer.apply_chat_template(
            base + [{"role": "user", "content": observation}], tokenize=False, add_generation_prompt=True,
            **self.chat_template_kwargs,
        )
        cut = without.rfind(self._MARK) + len(self._MARK)
        if not with_obs.startswith(without[:cut]):
            raise ValueError("the chat template is not prefix-preserving; multi-turn rollouts need one that is")
        text = with_obs[cut:]
        eos_text = self.tokenizer.eos_token or ""
        if action_ended_with_eos and eos_text and text.startswith(eos_text):
            text = text[len(eos_text):]
        return text

    def observation_ids(self, observation: str, action_ended_with_eos: bool) -> list[int]:
        """Token ids of :meth:`observation_text`."""
        return self.tokenizer(self.observation_text(observation, action_ended_with_eos), add_special_tokens=False)[
            "input_ids"
        ]

    def action_text(self, tokens: Sequence[int]) -> str:
        """The action string sent to the environment: the decoded turn without special tokens."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


class EnvRunner:
    """Runs G-episode groups of a text environment with a batched generator; see the module docstring for rules."""

    def __init__(
        self,
        env_factory: Callable[[], Any],
        renderer: ObservationRenderer,
        limits: RolloutLimits,
        num_workers: int = 8,
        timeout: float | None = 60.0,
        raise_on_error: bool = False,
        context: ContextPolicy | None = None,
        invalid_action_penalty: float = 0.1,
    ):
        self.env_factory = env_factory
        self.context = context or FullContext()
        self.invalid_action_penalty = float(invalid_action_penalty)
        self.renderer = renderer
        self.limits = limits
        self.num_workers = num_workers
        self.timeout = timeout
        self.raise_on_error = raise_on_error
        self._pool: list[Any] = []
        self._logged_errors: set[str] = set()
        self._warned_no_seed = False
        self.last_error_count = 0

    def _segment_prompt_ids(self, history: TurnHistory) -> list[int]:
        """A new segment's prompt for the turn about to be played, as the context policy writes it."""
        return self.renderer.messages_ids(self.context.messages(history))

    def _request_memory(self, episode: Episode, history: TurnHistory, observation: str, ended_with_eos: bool,
                        remaining: int) -> None:
        """A budget boundary of a memory context: end the episode as overlong when it has used all its rebuilds;
        otherwise append the memory request (the new observation and the request) so that the next generation
        writes the memory."""
        if len(episode.memories) >= self.context.max_rebuilds:
            episode.overlong, episode.truncated, episode.done = True, True, True
            return
        request_ids = self.renderer.observation_ids(self.context.memory_request(history), ended_with_eos)
        if len(request_ids) >= remaining:
            episode.truncated, episode.done = True, True  # the request does not fit: a failure
            return
        episode.observations.append(observation)
        episode.append_observation(request_ids)
        episode.memory_pending = True

    def _rebuild(self, episode: Episode, text: str, num_tokens: int, prompt: Any) -> None:
        """Read the memory just generated and start the next segment from the prompt the policy rebuilds."""
        memory = self.context.read_memory(text, episode.history(prompt))
        memory.num_tokens = num_tokens
        episode.memories.append(memory)
        episode.memory_pending = False
        prompt_ids = self._segment_prompt_ids(episode.history(prompt))
        if not self.limits.prompt_fits(prompt_ids):
            episode.truncated, episode.done = True, True  # the rebuilt prompt is over its budget
            return
        episode.start_segment(prompt_ids)

    def _environments(self, count: int) -> list[Any]:
        while len(self._pool) < count:
            self._pool.append(self.env_factory())
        return self._pool[:count]

    def _fail(self, episode: Episode, index: int, env: Any, where: str, exc: BaseException) -> None:
        """End an episode because its environment raised or hung; log each kind of fault once with its traceback."""
        if isinstance(exc, EnvironmentProtocolError) or self.raise_on_error:
            raise exc
        message = f"{env_name(env)}.{where}() failed: {type(exc).__name__}: {exc}"
        key = f"{env_name(env)}.{where}:{type(exc).__name__}"
        if key not in self._logged_errors:
            self._logged_errors.add(key)
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            logger.warning("Episode ended as a failure: %s\n%s", message, trace)
        episode.error = message
        episode.done = True
        episode.success = False
        if isinstance(exc, EnvironmentTimeout):
            self._pool[index] = None  # abandon the hung instance; a fresh one is made next time

    def run(self, rows: Sequence[dict], prompts: Sequence[Any], generate: GenerateFn,
            sync: Callable[[int], int] | None = None) -> list[Episode]:
        """Play one episode per row (rows of one group share their task through ``seed``/``options``).

        ``sync``, for generation backends whose ``generate`` is a collective call across processes (vLLM): given
        this process's largest token budget for the next turn (0 when none of its episodes is active), it returns
        the largest over all processes; every process then calls ``generate`` (possibly with no context) until all
        processes are done, so the calls stay in step.
        """
        for i, env in enumerate(self._pool):
            if env is None:
                self._pool[i] = self.env_factory()
        if rows and any(row.get("seed") is None for row in rows) and not self._warned_no_seed:
            self._warned_no_seed = True
            logger.warning(
                "Dataset rows have no 'seed' column: each task's seed is a hash of its row, so rows that differ only "
                "in a shared prompt all play the same task. Add a 'seed' column (trl_aem.make_env_dataset does)."
            )
        envs = self._environments(len(rows))
        limits = self.limits
        run_key = object()  # episode keys unique to this rollout (a generate function may keep state per key)
        episodes = [Episode(prompt_ids=[]) for _ in rows]

        resets = call_all(
            [lambda e=env, r=row: e.reset(seed=row_seed(r), options=dict(r)) for env, row in zip(envs, rows)],
            self.timeout, self.num_workers,
        )
        for i, ((result, exc), env, prompt) in enumerate(zip(resets, envs, prompts)):
            episode = episodes[i]
            if exc is None:
                try:
                    observation, reset_info = check_reset_result(env, result)
                except EnvironmentProtocolError as protocol_error:
                    exc = protocol_error
            if exc is not None:
                episode.prompt_ids = self.renderer.prompt_ids(prompt, "")
                self._fail(episode, i, env, "reset", exc)
                continue
            episode.observations.append(observation)
            episode.env_observation = observation
            episode.task = reset_info.get("task") if isinstance(reset_info.get("task"), str) else None
            episode.admissible_actions = _listed_actions(reset_info)
            episode.prompt_ids = self._segment_prompt_ids(episode.history(prompt))
            if not limits.prompt_fits(episode.prompt_ids):
                # the task does not fit the prompt budget: a failure, whose row keeps only the dataset prompt
                episode.prompt_ids = self.renderer.prompt_ids(prompt, "")
                episode.truncated, episode.done = True, True

        while True:
            active = [i for i, e in enumerate(episodes) if not e.done]
            budgets = {}
            for i in active:
                episode = episodes[i]
                remaining = limits.max_completion_length - len(episode.completion_ids)
                if episode.memory_pending:  # a budget boundary: this generation is the memory
                    if remaining < 1:
                        episode.truncated, episode.done = True, True
                        continue
                    budgets[i] = min(self.context.memory_max_tokens, remaining)
                    continue
                if episode.num_turns >= limits.max_turns or remaining < 1:
                    episode.truncated, episode.done = True, True
                    continue
                budgets[i] = min(limits.max_new_tokens_per_turn, remaining)
            local_budget = max(budgets.values(), default=0)
            global_budget = sync(local_budget) if sync is not None else local_budget
            if global_budget == 0:
                break
            order = list(budgets)
            contexts = [episodes[i].prompt_ids + episodes[i].completion_ids for i in order]
            if getattr(generate, "accepts_keys", False):  # e.g. a generate that keeps each episode's KV cache
                generated = generate(contexts, global_budget, keys=[(run_key, i) for i in order])
            else:
                generated = generate(contexts, global_budget)
            tokens, entropies = generated[0], generated[1]
            logprobs = generated[2] if len(generated) > 2 else None
            actions = {}
            prompt_format = self.context.prompt_format
            split_answer = getattr(self.context, "split_answer", lambda answer: (answer, None))
            for k, i in enumerate(order):
                turn_tokens = list(tokens[k])[: budgets[i]]
                turn_entropy = None if entropies is None else list(entropies[k])[: len(turn_tokens)]
                turn_logprobs = None if logprobs is None else list(logprobs[k])[: len(turn_tokens)]
                text = self.renderer.action_text(turn_tokens)
                episode = episodes[i]
                if episode.memory_pending:  # the memory: read it, then start the next segment from a rebuilt prompt
                    episode.append_memory(turn_tokens, turn_entropy, turn_logprobs)
                    self._rebuild(episode, text, len(turn_tokens), prompts[i])
                    continue
                answer, finding = split_answer(text)
                action = prompt_format.parse_action(answer)
                episode.turn_segments.append(len(episode.closed_segments))
                episode.findings.append(finding or "")
                episode.append_action(turn_tokens, turn_entropy, text if action is None else action, turn_logprobs)
                actions[i] = (action, bool(turn_tokens) and turn_tokens[-1] in self.renderer.eos_token_ids)
            order = [i for i in order if i in actions]  # the episodes that played a turn (not a memory)
            if not order:
                continue  # this process is done (it joined the collective generate call), or only memories were due

            stepped = [i for i in order if actions[i][0] is not None]
            results = dict(zip(stepped, call_all([lambda e=envs[i], a=actions[i][0]: e.step(a) for i in stepped],
                                                 self.timeout, self.num_workers)))
            for i in order:
                episode, env = episodes[i], envs[i]
                if i not in results:  # a malformed answer: the environment is not stepped
                    episode.malformed_actions += 1
                    result = (f"{MALFORMED_ACTION_NOTE}\n{episode.env_observation}", -self.invalid_action_penalty,
                              False, False, {"invalid_action": True})
                    exc = None
                else:
                    result, exc = results[i]
                if exc is None:
                    try:
                        observation, reward, terminated, truncated, info = check_step_result(env, result)
                    except EnvironmentProtocolError as protocol_error:
                        exc = protocol_error
                if exc is not None:
                    self._fail(episode, i, env, "step", exc)
                    continue
                if i in results:
                    episode.env_observation = observation
                episode.rewards.append(reward)
                episode.invalid_actions += int(bool(info.get("invalid_action", False)))
                if info.get("success", False):
                    episode.success = True
                if terminated or truncated:
                    episode.terminated, episode.truncated = bool(terminated), bool(truncated) and not terminated
                    episode.done = True
                    continue
                listed = _listed_actions(info)
                if listed is not None or "admissible_actions" in info:
                    episode.admissible_actions = listed
                if episode.num_turns >= limits.max_turns:
                    episode.truncated, episode.done = True, True  # a limit ends the episode: a failure
                    continue
                history = episode.history(prompts[i])
                history.observations.append(observation)
                if self.context.starts_new_segment(history):
                    prompt_ids = self._segment_prompt_ids(history)
                    if not limits.prompt_fits(prompt_ids):
                        episode.truncated, episode.done = True, True  # the rebuilt prompt is over its budget
                        continue
                    episode.observations.append(observation)
                    episode.start_segment(prompt_ids)
                    continue
                observation_ids = self.renderer.observation_ids(self.context.observation_text(history), actions[i][1])
                remaining = limits.max_completion_length - len(episode.completion_ids)
                if isinstance(self.context, MemoryContext) and self.context.over_budget(
                        len(episode.prompt_ids) + len(episode.completion_ids) + len(observation_ids)):
                    self._request_memory(episode, history, observation, actions[i][1], remaining)
                    continue
                if len(observation_ids) >= remaining:
                    episode.truncated, episode.done = True, True  # the observation does not fit: a failure
                    continue
                episode.observations.append(observation)
                episode.append_observation(observation_ids)
        getattr(generate, "release", lambda: None)()  # e.g. the episodes' KV caches
        for episode in episodes:
            if episode.truncated or episode.error:
                episode.success = False
        self.last_error_count = sum(e.error is not None for e in episodes)
        return episodes


def _listed_actions(info: dict) -> list[str] | None:
    """``info["admissible_actions"]`` as a list of strings, or None if the environment does not list them."""
    listed = info.get("admissible_actions")
    if isinstance(listed, (list, tuple)) and all(isinstance(a, str) for a in listed):
        return list(listed)
    return None
