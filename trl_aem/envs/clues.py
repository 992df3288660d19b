"""``ClueRooms``: a long-horizon memory task. A clue seen in an early room decides the answer many turns later."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import TextEnv, words_of

__all__ = ["ClueRooms"]

ITEMS: tuple[str, ...] = ("key", "lamp", "box", "coin", "book", "cup", "bell", "hat")
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
FILLER: tuple[str, ...] = ("dark", "quiet", "old", "dusty", "cold", "warm", "bright", "empty", "small", "large",
                           "long", "narrow", "damp", "still", "grey", "plain")

_T_TASK = "find out the color of the {item} . walk through the {n} rooms , then tell the vault that color ."
_T_ROOM_PLAIN = "room {k} of {n} ."
_T_NOTE = "a note says : the {item} is {color} ."
_T_FILLER = "the room is {words} ."
_T_ENTRANCE = "you stand at the entrance ."
_T_VAULT = "you reach the vault . it asks : what color is the {item} ?"
_T_WIN = "the vault opens ."
_T_LOSE = "the vault stays shut . the {item} was {color} ."
_T_INVALID = "nothing happens ."
_T_GO = "go forward"
_T_SAY = "say {color}"
_T_FINDING_ROOM = "the {item} is {color}"
_T_FINDING_VAULT = "the vault asks for the {item}"
_T_FINDING_ENTRANCE = "find out the color of the {item}"
_T_FINDING_EMPTY = "room {k} has no note"
_TEMPLATES = (_T_TASK, _T_ROOM_PLAIN, _T_NOTE, _T_FILLER, _T_ENTRANCE, _T_VAULT, _T_WIN, _T_LOSE, _T_INVALID, _T_GO,
              _T_SAY, _T_FINDING_ROOM, _T_FINDING_VAULT, _T_FINDING_ENTRANCE, _T_FINDING_EMPTY, "actions : ,")


class ClueRooms(TextEnv):
    """Walk through ``num_rooms`` rooms, then tell the vault the color of the task's item.

    **Task.** The first observation names an item (``find out the color of the key``); the agent stands at the
    entrance, so that no room's note is part of the task's observation (which windowed contexts always keep). One room,
    drawn among the first ``clue_rooms``, has a note ``the <item> is <color>`` about the task's item; with
    ``distractors`` (the default) every other room has a note about another item, else no note. ``filler_words`` extra words describe each room (``the room is
    dark quiet old .``): the knob that makes a context budget bind, since every observation then costs more tokens.
    ``options["item"]`` may fix the task's item; other ``options`` keys are ignored.

    **Actions.** ``go forward`` at the entrance or in a room (the next room; after the last one, the vault);
    ``say <color>`` at the
    vault. Anything else is invalid (``nothing happens .``, penalty ``invalid_action_penalty``) and changes nothing.

    **Reward.** ``10.0`` for the right color (success); a wrong color ends the episode with reward 0. An agent that
    walks straight through plays ``num_rooms + 2`` turns (turn ``k`` sees room ``k``); at the vault the clue is
    ``num_rooms - clue room + 1`` observations back, so a context that keeps only the last few turns answers at chance (``1 / num_colors``).

    The expert walks forward and says the clue's color (it reads the task's state). :meth:`expert_finding` is the
    one-sentence finding an agent could write about the current observation (``the key is red``), for building warm
    starts in ``env_context="echo"``.

    Args:
        num_rooms: rooms before the vault (1 .. 40).
        num_colors: colors the notes and the vault use (2 .. 8).
        num_items: items the notes talk about (2 .. 8).
        clue_rooms: the clue is in one of the first ``clue_rooms`` rooms (``None``: the first half, rounded up).
        filler_words: extra words describing each room (0 .. 40).
        distractors: notes about other items in the other rooms (``False``: those rooms have no note).
        invalid_action_penalty: penalty of an invalid action (>= 0).
        max_steps: safety cap on the episode length (truncation).
        list_actions: end observations with the ``actions : ...`` line (default True).
    """

    TASK_KEY: ClassVar[str] = "item"
    SUCCESS_REWARD: ClassVar[float] = 10.0
    EASIEST: ClassVar[dict[str, Any]] = {"num_rooms": 3, "num_colors": 2, "num_items": 2, "filler_words": 0}

    def __init__(
        self,
        num_rooms: int = 8,
        num_colors: int = 4,
        num_items: int = 4,
        clue_rooms: int | None = None,
        filler_words: int = 0,
        distractors: bool = True,
        invalid_action_penalty: float = 0.1,
        max_steps: int = 100,
        list_actions: bool = True,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(invalid_action_penalty, max_steps, list_actions, render_mode)
        for name, value, low, high in (("num_rooms", num_rooms, 1, 40), ("num_colors", num_colors, 2, len(COLORS)),
                                       ("num_items", num_items, 2, len(ITEMS)), ("filler_words", filler_words, 0, 40)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if clue_rooms is None:
            clue_rooms = (num_rooms + 1) // 2
        if isinstance(clue_rooms, bool) or not isinstance(clue_rooms, int) or not 1 <= clue_rooms <= num_rooms:
            raise ValueError(f"clue_rooms must be an integer in [1, num_rooms={num_rooms}], or None, got {clue_rooms!r}")
        self.num_rooms, self.num_colors, self.num_items = num_rooms, num_colors, num_items
        if not isinstance(distractors, bool):
            raise ValueError(f"distractors must be True or False, got {distractors!r}")
        self.clue_rooms, self.filler_words, self.distractors = clue_rooms, filler_words, distractors
        self._item, self._answer, self._clue_room, self._room = ITEMS[0], COLORS[0], 1, 1
        self._notes: list[tuple[str, str] | None] = []
        self._fillers: list[list[str]] = []

    # ------------------------------------------------------------------ task
    def _setup_task(self, options: dict[str, Any]) -> None:
        items, colors = ITEMS[: self.num_items], COLORS[: self.num_colors]
        explicit = options.get(self.TASK_KEY)
        if explicit is not None and explicit not in items:
            raise ValueError(f"options[{self.TASK_KEY!r}] must be one of {list(items)}, got {explicit!r}")
        rng = self.np_random
        self._item = explicit if explicit is not None else items[int(rng.integers(len(items)))]
        self._answer = colors[int(rng.integers(len(colors)))]
        self._clue_room = 1 + int(rng.integers(self.clue_rooms))
        others = [i for i in items if i != self._item]
        self._notes = []
        for room in range(1, self.num_rooms + 1):
            if room == self._clue_room:
                self._notes.append((self._item, self._answer))
            else:
                note = (others[int(rng.integers(len(others)))], colors[int(rng.integers(len(colors)))])
                self._notes.append(note if self.distractors else None)
        self._fillers = [[FILLER[int(rng.integers(len(FILLER)))] for _ in range(self.filler_words)]
                         for _ in range(self.num_rooms)]
        self._room = 0  # 0 = the entrance, 1 .. num_rooms, then num_rooms + 1 = the vault

    @property
    def task_text(self) -> str:
        """The task as a short sentence (the item, not its color)."""
        return f"find out the color of the {self._item}"

    @property
    def item(self) -> str:
        """The item whose color the vault asks for."""
        return self._item

    @property
    def answer(self) -> str:
        """The color the vault wants (privileged)."""
        return self._answer

    @property
    def clue_room(self) -> int:
        """The room (1-based) whose note names the task's item (privileged)."""
        return self._clue_room

    @property
    def room(self) -> int:
        """Where the agent stands: 0 at the entrance, 1 .. ``num_rooms`` in a room, ``num_rooms + 1`` at the vault."""
        return min(self._room, self.num_rooms + 1)

    @property
    def at_vault(self) -> bool:
        """Whether the agent stands at the vault."""
        return self._room > self.num_rooms

    # ------------------------------------------------------------------ rendering / dynamics
    def _room_text(self, room: int) -> str:
        text = _T_ROOM_PLAIN.format(k=room, n=self.num_rooms)
        note = self._notes[room - 1]
        if note is not None:
            text += " " + _T_NOTE.format(item=note[0], color=note[1])
        if self.filler_words:
            text += " " + _T_FILLER.format(words=" ".join(self._fillers[room - 1]))
        return text

    def _here(self) -> str:
        if self._room == 0:
            return _T_ENTRANCE
        return _T_VAULT.format(item=self._item) if self.at_vault else self._room_text(self._room)

    def _initial_observation(self) -> str:
        return _T_TASK.format(item=self._item, n=self.num_rooms) + "\n" + self._here()

    def admissible_actions(self) -> list[str]:
        """``go forward`` in a room; ``say <color>`` for every color at the vault; nothing once the episode is over."""
        if self._done:
            return []
        if self.at_vault:
            return [_T_SAY.format(color=c) for c in COLORS[: self.num_colors]]
        return [_T_GO]

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        if action not in self.admissible_actions():
            return _T_INVALID + " " + self._here(), 0.0, False, True
        if action == _T_GO:
            self._room += 1
            return self._here(), 0.0, False, False
        said = action.split()[-1]
        self._done = True  # no actions are listed after the vault's answer
        if said == self._answer:
            self._success = True
            return _T_WIN, self.SUCCESS_REWARD, True, False
        return _T_LOSE.format(item=self._item, color=self._answer), 0.0, True, False

    def _step_info(self) -> dict[str, Any]:
        return {"room": min(self._room, self.num_rooms + 1)}

    # ------------------------------------------------------------------ expert
    def expert_action(self) -> str:
        """Walk forward; at the vault, say the clue's color."""
        return _T_SAY.format(color=self._answer) if self.at_vault else _T_GO

    def expert_finding(self) -> str:
        """A one-sentence finding about the current observation: the room's note (``the key is red``); at the
        entrance the task, at the vault what it asks for."""
        if self._room == 0:
            return _T_FINDING_ENTRANCE.format(item=self._item)
        if self.at_vault:
            return _T_FINDING_VAULT.format(item=self._item)
        note = self._notes[self._room - 1]
        if note is None:
            return _T_FINDING_EMPTY.format(k=self._room)
        return _T_FINDING_ROOM.format(item=note[0], color=note[1])

    # ------------------------------------------------------------------ vocabulary
    @classmethod
    def vocabulary(cls, **difficulty_kwargs: Any) -> list[str]:
        """Every word of observations and valid actions (template words, items, colors, filler words, numbers up to
        ``num_rooms``), plus the words the memory contexts add (``trl_aem.context.memory_vocabulary``), so that a
        tiny agent's word tokenizer can write findings, selections and summaries."""
        from ..context import memory_vocabulary

        words = words_of(*_TEMPLATES) | set(ITEMS) | set(COLORS) | set(FILLER) | set(memory_vocabulary())
        top = max(9, int(difficulty_kwargs.get("num_rooms", 8)))
        words.update(str(i) for i in range(top + 1))
        return sorted(words)
