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

Later policies (rolling summaries, selective turn memory) implement the same two methods.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTEXT_POLICIES",
    "PROMPT_FORMATS",
    "ContextPolicy",
    "FullContext",
    "PromptFormat",
    "TurnHistory",
    "WindowContext",
    "first_user_message",
    "make_context_policy",
]

#: What the environment is told, and the history records, when an answer has no well-formed action tag.
MALFORMED_ACTION_NOTE = "Your last answer had no valid action. Reply with exactly one action inside <action> </action>."


@dataclass
class TurnHistory:
    """What an episode has shown and done so far, in text (the inputs of a context policy).

    Attributes:
        prompt: the dataset row's prompt (messages or a string): the instruction before the first observation.
        observations: ``observations[t]`` is the observation the model saw at turn ``t`` (``[0]`` from ``reset``).
        actions: ``actions[t]`` is the model's answer at turn ``t`` (the decoded text).
        task: the task as the environment states it (``info["task"]``), if it does.
        admissible_actions: the actions the environment lists for the current observation, if it does.
    """

    prompt: Any
    observations: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    task: str | None = None
    admissible_actions: list[str] | None = None

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


#: ``env_context`` values and ``env_prompt_format`` values.
CONTEXT_POLICIES = ("full", "window")
PROMPT_FORMATS = ("chat", "react")


def make_context_policy(context: str = "full", history_turns: int = 2, prompt_format: str = "chat") -> ContextPolicy:
    """The context policy for ``env_context`` / ``env_history_turns`` / ``env_prompt_format``."""
    fmt = PromptFormat(prompt_format)
    if context == "full":
        return FullContext(fmt)
    if context == "window":
        return WindowContext(history_turns, fmt)
    raise ValueError(f"env_context must be one of {list(CONTEXT_POLICIES)}, got {context!r}")
