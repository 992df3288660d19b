"""What the model sees at each turn of an episode: context policies and prompt formats.

A trajectory is a list of **segments**: one training row each, with its own prompt (the context the model actually
saw) and completion (what it generated in that context; observation tokens inside a segment are kept out of the
loss). After every turn a :class:`ContextPolicy` decides whether the next turn continues the current segment or
starts a new segment with a rebuilt prompt:

* :class:`FullContext` (``env_context="full"``): one segment per episode, a growing sequence
  ``prompt, action 1, observation 1, action 2, ...``;
* :class:`WindowContext` (``env_context="window"``): one segment per turn; the prompt shows the task, the last ``k``
  observation/action pairs and the current observation (the step-wise setting AEM was published in).

A :class:`PromptFormat` writes the text of a turn and reads the action out of the model's answer:

* ``"chat"``: the observation is the user message, the whole answer is the action;
* ``"react"``: a step prompt (task, step number, recent history, current observation, admissible actions) asking
  for reasoning in ``<think>...</think>`` and one action in ``<action>...</action>``; an answer without exactly one
  well-formed action tag is malformed (:meth:`PromptFormat.parse_action` returns ``None``).

Two policies rebuild the prompt when the active context passes a token budget (:class:`MemoryContext`); the
runner then asks the policy for a *memory* (one extra generation, its own span) and starts the next segment:

* :class:`SummaryContext` (``env_context="summary"``, SUPO): the policy writes a summary; the next segment starts from
  the task, the summary and the current observation;
* :class:`EchoContext` (``env_context="echo"``, ECHO's selective turn memory): every answer also carries a one-sentence
  finding in ``<finding>...</finding>``; every turn is a source-indexed record (turn id, action, finding, segment);
  at the budget the policy selects earlier turns (``turn N : reason`` lines) and the next segment starts from the task,
  the selected turns' actions and findings, the most recent turns and the current observation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTEXT_POLICIES",
    "MEMORY_SPAN_OFFSET",
    "PROMPT_FORMATS",
    "ContextPolicy",
    "EchoContext",
    "FullContext",
    "Memory",
    "MemoryContext",
    "PromptFormat",
    "SummaryContext",
    "TurnHistory",
    "WindowContext",
    "context_policy_from_args",
    "first_user_message",
    "make_context_policy",
    "memory_vocabulary",
]

#: What the environment is told, and the history records, when an answer has no well-formed action tag.
MALFORMED_ACTION_NOTE = "Your last answer had no valid action. Reply with exactly one action inside <action> </action>."


#: The span id of the memory generation (summary or selection) of rebuild ``k`` is ``MEMORY_SPAN_OFFSET + k``; the
#: answer of turn ``t`` has span id ``t`` (below the offset).
MEMORY_SPAN_OFFSET = 100_000


@dataclass
class Memory:
    """What the policy wrote at one budget boundary of a :class:`MemoryContext` (one rebuild).

    Attributes:
        turn: the number of turns played when it was written (it covers turns ``0 .. turn - 1``).
        text: the generated text (a summary, or a selection).
        selected: for :class:`EchoContext`, the 0-based ids of the turns the selection names (in order, without
            repeats, only earlier turns); ``None`` for a summary.
        num_tokens: how many tokens the generation had.
    """

    turn: int
    text: str
    selected: list[int] | None = None
    num_tokens: int = 0


@dataclass
class TurnHistory:
    """What an episode has shown and done so far, in text (the inputs of a context policy).

    Attributes:
        prompt: the dataset row's prompt (messages or a string): the instruction before the first observation.
        observations: ``observations[t]`` is the observation the model saw at turn ``t`` (``[0]`` from ``reset``).
        actions: ``actions[t]`` is the model's answer at turn ``t`` (the decoded text).
        task: the task as the environment states it (``info["task"]``), if it does.
        admissible_actions: the actions the environment lists for the current observation, if it does.
        findings: ``findings[t]`` is the finding the answer of turn ``t`` carried (``""`` when none; only
            :class:`EchoContext` asks for findings).
        memories: what the policy wrote at each budget boundary so far (:class:`MemoryContext`), oldest first.
    """

    prompt: Any
    observations: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    task: str | None = None
    admissible_actions: list[str] | None = None
    findings: list[str] = field(default_factory=list)
    memories: list[Memory] = field(default_factory=list)

    @property
    def turn(self) -> int:
        """The index of the turn about to be played (the number of answers so far)."""
        return len(self.actions)


class PromptFormat:
    """How a turn is written for the model and how its action is read back (``"chat"`` or ``"react"``)."""

    _ACTION = re.compile(r"<action>(.*?)</action>", re.DOTALL)

    def __init__(self, name: str = "chat"):
        if name not in PROMPT_FORMATS:
            raise ValueError(f"env_prompt_format must be one of {list(PROMPT_FORMATS)}, got {name!r}")
        self.name = name

    def turn_text(self, history: TurnHistory, shown: Sequence[int] = ()) -> str:
        """The user-message text of the current turn.

        Args:
            history: the episode so far.
            shown: for ``"react"``, the earlier turns whose observation and action the text lists (oldest first);
                ``"chat"`` shows history as messages instead, so it ignores this.
        """
        current = history.observations[-1] if history.observations else ""
        if self.name == "chat":
            return current
        lines = []
        task = history.task or (history.observations[0] if history.observations else "")
        if task:
            lines.append(f"Your task: {task}")
        lines.append(f"This is step {history.turn + 1}.")
        if shown:
            lines.append(f"Your previous {len(shown)} step{'s' if len(shown) > 1 else ''}:")
            for t in shown:
                lines.append(f"[step {t + 1}] observation: {history.observations[t]}")
                lines.append(f"[step {t + 1}] your action: {history.actions[t]}")
        lines.append(f"Current observation: {current}")
        if history.admissible_actions:
            lines.append("Admissible actions: " + ", ".join(history.admissible_actions))
        lines.append("First think about what to do inside <think> </think>, then give exactly one action inside "
                     "<action> </action>.")
        return "\n".join(lines)

    def parse_action(self, text: str) -> str | None:
        """The action in an answer: the whole answer (``"chat"``), or the content of its one ``<action>`` tag
        (``"react"``); ``None`` when a react answer has no tag, several, or an empty one."""
        if self.name == "chat":
            return text
        found = self._ACTION.findall(text)
        if len(found) != 1 or not found[0].strip() or "<action>" in found[0]:
            return None
        return found[0].strip()


class ContextPolicy:
    """Decides what the model sees at each turn: continue the current segment, or start a new one.

    Subclasses implement :meth:`starts_new_segment` and :meth:`messages`. The runner renders the messages with the
    tokenizer's chat template (or as plain text) into the segment's prompt ids.
    """

    name = "base"

    def __init__(self, prompt_format: PromptFormat | None = None):
        self.prompt_format = prompt_format or PromptFormat("chat")

    def starts_new_segment(self, history: TurnHistory) -> bool:
        """Whether the turn about to be played starts a new segment (a rebuilt prompt) instead of continuing."""
        raise NotImplementedError

    def messages(self, history: TurnHistory) -> list[dict]:
        """The conversation (chat messages) of a new segment's prompt, for the turn about to be played."""
        raise NotImplementedError

    def observation_text(self, history: TurnHistory) -> str:
        """The user-message text of a turn that continues the current segment (after the previous answer)."""
        return self.prompt_format.turn_text(history)


def first_user_message(prompt: Any, text: str) -> list[dict]:
    """The dataset prompt (messages or a string) as messages, with ``text`` appended (on a new line) to the last user
    message (one is added if the prompt does not end with one)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt] or [{"role": "user", "content": ""}]
    if messages[-1].get("role") != "user":
        messages.append({"role": "user", "content": ""})
    content = messages[-1].get("content") or ""
    separator = "\n" if content and text else ""
    messages[-1] = {**messages[-1], "content": f"{content}{separator}{text}"}
    return messages


class FullContext(ContextPolicy):
    """One segment per episode: every observation is appended to the growing sequence (``env_context="full"``)."""

    name = "full"

    def starts_new_segment(self, history: TurnHistory) -> bool:
        """Only the first turn starts a segment."""
        return history.turn == 0

    def messages(self, history: TurnHistory) -> list[dict]:
        """The first prompt: the dataset prompt with the first turn's text appended."""
        return first_user_message(history.prompt, self.prompt_format.turn_text(history))


class WindowContext(ContextPolicy):
    """One segment per turn; the prompt shows the task, the last ``history_turns`` observation/action pairs and the
    current observation (``env_context="window"``, verl-agent's ``history_length``).

    With the ``"chat"`` format the history is real chat turns: the first user message holds the dataset prompt and
    the first observation (which states the task), a note when earlier turns are left out, then one assistant
    message per shown action and one user message per later observation. With ``"react"`` it is one user message
    written by :meth:`PromptFormat.turn_text`.
    """

    name = "window"

    def __init__(self, history_turns: int = 2, prompt_format: PromptFormat | None = None):
        super().__init__(prompt_format)
        if isinstance(history_turns, bool) or not isinstance(history_turns, int) or history_turns < 0:
            raise ValueError(f"env_history_turns must be an integer >= 0, got {history_turns!r}")
        self.history_turns = history_turns

    def starts_new_segment(self, history: TurnHistory) -> bool:
        """Every turn starts a segment."""
        return True

    def shown_turns(self, history: TurnHistory) -> list[int]:
        """The earlier turns whose observation/action pair the prompt shows (oldest first)."""
        return list(range(max(0, history.turn - self.history_turns), history.turn))

    def messages(self, history: TurnHistory) -> list[dict]:
        """The rebuilt prompt of the turn about to be played."""
        shown = self.shown_turns(history)
        if self.prompt_format.name == "react":
            return first_user_message(history.prompt, self.prompt_format.turn_text(history, shown))
        first = history.observations[0]
        start = shown[0] if shown else history.turn
        if start > 0:  # the first observation (the task) stays; the turns between are left out
            omitted = f"(steps 1 to {start} are not shown)"
            first = f"{first}\n{omitted}\n{history.observations[start]}"
        messages = first_user_message(history.prompt, first)
        for t in shown:
            messages.append({"role": "assistant", "content": history.actions[t]})
            messages.append({"role": "user", "content": history.observations[t + 1]})
        return messages


#: The texts the memory contexts add (in the environments' tiny regular language: lowercase words, separated
#: punctuation), so that a word-level tokenizer can hold them (:func:`memory_vocabulary`).
FINDING_INSTRUCTION = "after your action , write what you learned from the last observation inside <finding> </finding> ."
SUMMARY_REQUEST = ("the context is full . write a short summary of what you know so far . "
                   "it will replace the steps above .")
SUMMARY_HEADER = "summary of steps 1 to {turns} :"
SELECTION_HEADER = "the context is full . your turns so far :"
SELECTION_REQUEST = ("select the turns to keep . write turn and its number , then : and a reason , "
                     "one turn per line .")
KEPT_HEADER = "kept turns :"
RECORD_LINE = "turn {number} : action : {action} , finding : {finding}"
NOT_SHOWN = "( earlier steps are not shown )"
CONTINUE = "continue the task ."

_FINDING = re.compile(r"<\s*finding\s*>", re.IGNORECASE)
_FINDING_END = re.compile(r"<\s*/\s*finding\s*>", re.IGNORECASE)
_TURN_ID = re.compile(r"\bturn\s*_?\s*(\d+)", re.IGNORECASE)


def memory_vocabulary() -> list[str]:
    """Every word of the texts :class:`SummaryContext` and :class:`EchoContext` add to prompts, plus what a finding
    tag and a selection line are made of (sorted; digits excluded): for word-level tokenizers of tiny agents."""
    texts = (FINDING_INSTRUCTION, SUMMARY_REQUEST, SUMMARY_HEADER, SELECTION_HEADER, SELECTION_REQUEST, KEPT_HEADER,
             RECORD_LINE, NOT_SHOWN, CONTINUE, "</finding> none")
    words = set()
    for text in texts:
        text = re.sub(r"\{[^}]*\}", " ", text)
        words.update(w for w in re.sub(r"([^\w\s])", r" \1 ", text).split() if not w.isdigit())
    return sorted(words)


class MemoryContext(ContextPolicy):
    """One segment until the active context (the segment's prompt and completion) would pass ``budget`` tokens with
    the next observation; then the policy writes a memory and the next segment starts from a rebuilt prompt.

    The runner asks :meth:`over_budget` after every turn; at a boundary it appends :meth:`memory_request` (the new
    observation and the request, as a user message) to the segment, generates the memory (at most
    ``memory_max_tokens`` tokens, span id ``MEMORY_SPAN_OFFSET + k``), reads it with :meth:`read_memory` and starts
    the next segment with :meth:`messages`. A boundary after ``max_rebuilds`` rebuilds ends the episode as
    *overlong* (a failure whose advantage is zeroed in training).

    Args:
        budget: tokens of the active context that trigger a rebuild (``env_context_budget``).
        max_rebuilds: most rebuilds per episode (``env_max_rebuilds``).
        memory_max_tokens: most tokens of one memory generation (``env_memory_max_tokens``).
        prompt_format: how turns are written (``"chat"`` or ``"react"``).
    """

    name = "memory"

    def __init__(self, budget: int, max_rebuilds: int = 5, memory_max_tokens: int = 64,
                 prompt_format: PromptFormat | None = None):
        super().__init__(prompt_format)
        for field_name, value, least in (("env_context_budget", budget, 1), ("env_max_rebuilds", max_rebuilds, 0),
                                         ("env_memory_max_tokens", memory_max_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{field_name} must be an integer >= {least}, got {value!r}")
        self.budget, self.max_rebuilds, self.memory_max_tokens = budget, max_rebuilds, memory_max_tokens

    def starts_new_segment(self, history: TurnHistory) -> bool:
        """Only the first turn; later segments start after a memory generation (the runner rebuilds them)."""
        return history.turn == 0

    def over_budget(self, active_tokens: int) -> bool:
        """Whether a segment of ``active_tokens`` tokens (prompt, completion and the next observation) is past the
        budget."""
        return active_tokens > self.budget

    def split_answer(self, text: str) -> tuple[str, str | None]:
        """The part of an answer the prompt format reads the action from, and the finding it carries (``None``)."""
        return text, None

    def memory_request(self, history: TurnHistory) -> str:
        """The user message that asks for the memory: the new observation, then the request."""
        raise NotImplementedError

    def read_memory(self, text: str, history: TurnHistory) -> Memory:
        """The :class:`Memory` of a generated memory text."""
        raise NotImplementedError

    def _first_text(self, history: TurnHistory) -> str:
        return self.prompt_format.turn_text(history)

    def messages(self, history: TurnHistory) -> list[dict]:
        """The first prompt (as :class:`FullContext`), or after a rebuild the prompt the policy rebuilds."""
        if not history.memories:
            return first_user_message(history.prompt, self._first_text(history))
        return self._rebuilt_messages(history, history.memories[-1])

    def _rebuilt_messages(self, history: TurnHistory, memory: Memory) -> list[dict]:
        raise NotImplementedError


class SummaryContext(MemoryContext):
    """Rolling summaries (``env_context="summary"``; SUPO, arXiv:2510.06727).

    At the budget the policy writes a summary of what it knows; the next segment's prompt is the dataset prompt, the
    task (the first observation; ``"react"``: the step prompt's task line), the latest summary and the current
    observation. The summary's tokens are trained like the actions'.
    """

    name = "summary"

    def memory_request(self, history: TurnHistory) -> str:
        """The new observation and the request for a summary."""
        return f"{history.observations[-1]}\n{SUMMARY_REQUEST}"

    def read_memory(self, text: str, history: TurnHistory) -> Memory:
        """The whole generated text is the summary."""
        return Memory(turn=history.turn, text=text.strip())

    def _rebuilt_messages(self, history: TurnHistory, memory: Memory) -> list[dict]:
        block = f"{SUMMARY_HEADER.format(turns=memory.turn)} {memory.text}"
        if self.prompt_format.name == "react":
            return first_user_message(history.prompt, f"{block}\n{self.prompt_format.turn_text(history)}")
        text = "\n".join([history.observations[0], block, CONTINUE, history.observations[-1]])
        return first_user_message(history.prompt, text)


class EchoContext(MemoryContext):
    """Selective turn memory (``env_context="echo"``; ECHO, arXiv:2606.31650).

    Every answer carries a one-sentence finding inside ``<finding>...</finding>`` (the first prompt asks for it); the
    action is read from the rest of the answer. Every turn is a record (turn id, action, finding, the segment it came
    from). At the budget the request lists every record (turn number and finding) and the policy answers with the
    turns to keep, one ``turn N : reason`` per line. The next segment's prompt is the dataset prompt, the finding
    instruction, the task (first observation), the kept turns' actions and findings, then the last ``recent_turns``
    turns in full and the current observation. Turns left out stay selectable at later boundaries.

    Args:
        budget, max_rebuilds, memory_max_tokens, prompt_format: see :class:`MemoryContext`.
        recent_turns: the most recent turns every rebuilt prompt shows in full (``env_echo_recent_turns``).
    """

    name = "echo"

    def __init__(self, budget: int, max_rebuilds: int = 5, memory_max_tokens: int = 64, recent_turns: int = 3,
                 prompt_format: PromptFormat | None = None):
        super().__init__(budget, max_rebuilds, memory_max_tokens, prompt_format)
        if isinstance(recent_turns, bool) or not isinstance(recent_turns, int) or recent_turns < 0:
            raise ValueError(f"env_echo_recent_turns must be an integer >= 0, got {recent_turns!r}")
        self.recent_turns = recent_turns

    def split_answer(self, text: str) -> tuple[str, str | None]:
        """``(answer without the finding, finding)``; the finding is the text inside the first ``<finding>`` tag (to
        the end of the answer when the closing tag is missing), ``None`` without a tag. Tags may hold spaces."""
        start = _FINDING.search(text)
        if start is None:
            return text, None
        end = _FINDING_END.search(text, start.end())
        finding = text[start.end(): end.start() if end else len(text)]
        rest = text[: start.start()] + (text[end.end():] if end else "")
        return rest.strip(), " ".join(finding.split())

    def answer_text(self, history: TurnHistory, turn: int) -> str:
        """Turn ``turn``'s answer as a rebuilt prompt shows it: the action, then its finding in tags."""
        finding = history.findings[turn] if turn < len(history.findings) else ""
        action = history.actions[turn]
        return f"{action} <finding>{finding}</finding>" if finding else action

    def record_line(self, history: TurnHistory, turn: int) -> str:
        """One kept turn as a rebuilt prompt lists it: its number, action and finding."""
        finding = history.findings[turn] if turn < len(history.findings) else ""
        return RECORD_LINE.format(number=turn + 1, action=history.actions[turn], finding=finding or "none")

    def _first_text(self, history: TurnHistory) -> str:
        return f"{FINDING_INSTRUCTION}\n{self.prompt_format.turn_text(history)}"

    def recent(self, history: TurnHistory) -> list[int]:
        """The turns a rebuilt prompt shows in full (the last ``recent_turns``, oldest first)."""
        return list(range(max(0, history.turn - self.recent_turns), history.turn))

    def kept(self, history: TurnHistory, memory: Memory) -> list[int]:
        """The selected turns a rebuilt prompt lists as records (those not among the recent turns)."""
        recent = set(self.recent(history))
        return [t for t in (memory.selected or []) if t < history.turn and t not in recent]

    def memory_request(self, history: TurnHistory) -> str:
        """The new observation, every turn's record (number and finding, or the action without one), the request."""
        lines = [history.observations[-1], SELECTION_HEADER]
        for t in range(history.turn):
            finding = history.findings[t] if t < len(history.findings) else ""
            lines.append(f"turn {t + 1} : {finding or history.actions[t]}")
        lines.append(SELECTION_REQUEST)
        return "\n".join(lines)

    def read_memory(self, text: str, history: TurnHistory) -> Memory:
        """The turns a selection names (``turn N``, ``turn_N``; 1-based in the text), earlier turns only, in order,
        without repeats."""
        selected: list[int] = []
        for match in _TURN_ID.finditer(text):
            turn = int(match.group(1)) - 1
            if 0 <= turn < history.turn and turn not in selected:
                selected.append(turn)
        return Memory(turn=history.turn, text=text.strip(), selected=selected)

    def _rebuilt_messages(self, history: TurnHistory, memory: Memory) -> list[dict]:
        recent = self.recent(history)
        head = [FINDING_INSTRUCTION]
        if self.prompt_format.name != "react":
            head.append(history.observations[0])
        kept = self.kept(history, memory)
        if kept:
            head.append(KEPT_HEADER)
            head.extend(self.record_line(history, t) for t in kept)
        head.append(CONTINUE)
        if self.prompt_format.name == "react":
            head.append(self.prompt_format.turn_text(history, recent))
            return first_user_message(history.prompt, "\n".join(head))
        first = recent[0] if recent else history.turn
        if first > 0:  # the first observation (the task) is already there
            head.extend([NOT_SHOWN, history.observations[first]])
        messages = first_user_message(history.prompt, "\n".join(head))
        for t in recent:
            messages.append({"role": "assistant", "content": self.answer_text(history, t)})
            messages.append({"role": "user", "content": history.observations[t + 1]})
        return messages


#: ``env_context`` values and ``env_prompt_format`` values.
CONTEXT_POLICIES = ("full", "window", "summary", "echo")
PROMPT_FORMATS = ("chat", "react")


def make_context_policy(context: str = "full", history_turns: int = 2, prompt_format: str = "chat", *,
                        budget: int | None = None, max_rebuilds: int = 5, memory_max_tokens: int = 64,
                        recent_turns: int = 3) -> ContextPolicy:
    """The context policy for ``env_context`` / ``env_history_turns`` / ``env_prompt_format`` and, for
    ``"summary"`` and ``"echo"``, ``env_context_budget`` (``budget``, required), ``env_max_rebuilds``,
    ``env_memory_max_tokens`` and ``env_echo_recent_turns``."""
    fmt = PromptFormat(prompt_format)
    if context == "full":
        return FullContext(fmt)
    if context == "window":
        return WindowContext(history_turns, fmt)
    if context in ("summary", "echo"):
        if budget is None:
            raise ValueError(f"env_context={context!r} rebuilds the prompt when the context passes a token budget: set "
                             "env_context_budget (an integer >= 1)")
        if context == "summary":
            return SummaryContext(budget, max_rebuilds, memory_max_tokens, fmt)
        return EchoContext(budget, max_rebuilds, memory_max_tokens, recent_turns, fmt)
    raise ValueError(f"env_context must be one of {list(CONTEXT_POLICIES)}, got {context!r}")


def context_policy_from_args(args: Any) -> ContextPolicy:
    """The context policy an :class:`~trl_aem.AEMGRPOConfig` (or any object with its ``env_*`` fields) describes."""
    return make_context_policy(
        args.env_context, args.env_history_turns, args.env_prompt_format,
        budget=getattr(args, "env_context_budget", None), max_rebuilds=getattr(args, "env_max_rebuilds", 5),
        memory_max_tokens=getattr(args, "env_memory_max_tokens", 64),
        recent_turns=getattr(args, "env_echo_recent_turns", 3))
