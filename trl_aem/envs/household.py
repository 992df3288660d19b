"""``Household``: a small, offline, ALFWorld-like household text environment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import TextEnv, split_words, words_of

__all__ = ["Household", "TASK_TYPES", "RECEPTACLES", "OBJECTS"]

#: Goal types: plain pick-and-place, or pick, change the object's state, then place.
TASK_TYPES: tuple[str, ...] = ("pick", "clean", "heat", "cool")
_ADJECTIVE = {"pick": "", "clean": "clean", "heat": "hot", "cool": "cool"}
_APPLIANCE = {"clean": "sinkbasin 1", "heat": "microwave 1", "cool": "fridge 1"}
_VERB = {"clean": "clean", "heat": "heat", "cool": "cool"}

#: Receptacle kind -> (how many instances exist, "surface" | "container", openable).
RECEPTACLES: dict[str, tuple[int, str, bool]] = {
    "desk": (2, "surface", False),
    "shelf": (3, "surface", False),
    "countertop": (1, "surface", False),
    "diningtable": (1, "surface", False),
    "sidetable": (1, "surface", False),
    "dresser": (1, "surface", False),
    "coffeetable": (1, "surface", False),
    "drawer": (3, "container", True),
    "cabinet": (2, "container", True),
    "garbagecan": (1, "container", False),
    "sinkbasin": (1, "container", False),
    "microwave": (1, "container", True),
    "fridge": (1, "container", True),
}
_ALL_RECEPTACLES: tuple[str, ...] = tuple(f"{k} {i}" for k, (n, _, _) in RECEPTACLES.items() for i in range(1, n + 1))
_APPLIANCES = frozenset(_APPLIANCE.values())
#: Receptacles a goal may name as destination (everything except the appliances and the garbage can).
_TARGETS: tuple[str, ...] = tuple(
    r for r in _ALL_RECEPTACLES if r not in _APPLIANCES and not r.startswith("garbagecan")
)

#: Object kind -> (cleanable, heatable, coolable).
OBJECTS: dict[str, tuple[bool, bool, bool]] = {
    "mug": (True, True, True),
    "cup": (True, True, True),
    "apple": (True, True, True),
    "tomato": (True, True, True),
    "potato": (True, True, True),
    "plate": (True, True, True),
    "bowl": (True, True, True),
    "egg": (False, True, True),
    "bread": (False, True, True),
    "lettuce": (True, False, True),
    "fork": (True, False, False),
    "spoon": (True, False, False),
    "book": (False, False, False),
    "pen": (False, False, False),
    "keychain": (False, False, False),
    "candle": (False, False, False),
}
_CAPABILITY = {"pick": None, "clean": 0, "heat": 1, "cool": 2}
#: Object instance numbers are drawn from 1..MAX_INSTANCE.
MAX_INSTANCE = 3

# Observation templates (the vocabulary is derived from these).
_T_ROOM = "you are in the middle of a room . looking quickly around you , you see {list} ."
_T_TASK = "your task is to : {goal} ."
_T_GOAL = "put a {adj} {obj} {prep} {target}"
_T_AT = "you are at {r} ."
_T_ARRIVE = "you arrive at {r} ."
_T_CLOSED = "the {r} is closed ."
_T_OPEN_SEE = "the {r} is open . in it , you see {list} ."
_T_ON_SEE = "on the {r} , you see {list} ."
_T_IN_SEE = "in the {r} , you see {list} ."
_T_OPENED = "you open the {r} . in it , you see {list} ."
_T_CLOSED_IT = "you close the {r} ."
_T_TAKE = "you pick up the {o} from the {r} ."
_T_PUT = "you put the {o} {prep} the {r} ."
_T_USE = "you {verb} the {o} using the {r} ."
_T_INV = "you are carrying : a {o} ."
_T_INV_EMPTY = "you are not carrying anything ."
_T_INVALID = "nothing happens ."
_T_ACTIONS = (
    "actions : go to {r} , open {r} , close {r} , take {o} from {r} , put {o} in {r} , put {o} on {r} , "
    "clean {o} with {r} , heat {o} with {r} , cool {o} with {r} , inventory , look"
)
_T_MISC = "a nothing in on"
_TEMPLATES = (
    _T_ROOM, _T_TASK, _T_GOAL, _T_AT, _T_ARRIVE, _T_CLOSED, _T_OPEN_SEE, _T_ON_SEE, _T_IN_SEE, _T_OPENED,
    _T_CLOSED_IT, _T_TAKE, _T_PUT, _T_USE, _T_INV, _T_INV_EMPTY, _T_INVALID, _T_ACTIONS, _T_MISC,
)


def _kind(name: str) -> str:
    return name.rsplit(" ", 1)[0]


def _is_openable(receptacle: str) -> bool:
    return RECEPTACLES[_kind(receptacle)][2]


def _prep(receptacle: str) -> str:
    return "on" if RECEPTACLES[_kind(receptacle)][1] == "surface" else "in"


def _goal_text(task_type: str, obj: str, target: str) -> str:
    adj = _ADJECTIVE[task_type]
    return " ".join(f"put a {adj} {obj} {_prep(target)} {target}".split())


@dataclass
class _Obj:
    name: str  # "mug 1"
    kind: str  # "mug"
    loc: str | None  # receptacle, or None when held
    clean: bool = False
    hot: bool = False
    cool: bool = False


class Household(TextEnv):
    """ALFWorld-like household task: find an object, optionally clean / heat / cool it, and put it
    in or on a target receptacle.

    **Task.** ``put a [clean|hot|cool] <object> in|on <receptacle>``, e.g. ``put a clean mug on
    desk 1``. Cleaning uses ``sinkbasin 1``, heating ``microwave 1`` and cooling ``fridge 1`` (the
    agent must hold the object at the appliance). Drawers, cabinets, the microwave and the fridge
    start closed (unless ``open_containers``) and show their content only when open. The room, the
    object placement and the goal are drawn from ``seed``; ``options["goal"]`` may fix the goal,
    either as the goal sentence (``"put a hot apple on countertop 1"``) or as a dict
    ``{"task_type": "heat", "object": "apple", "target": "countertop 1"}`` (the rest of the room
    still comes from ``seed``). Other ``options`` keys are ignored.

    **Actions** (lowercase, punctuation-free): ``go to <r>``, ``open <r>``, ``close <r>``,
    ``take <o> from <r>``, ``put <o> in <r>`` / ``put <o> on <r>`` (``in/on`` and either preposition
    are accepted), ``clean <o> with <r>``, ``heat <o> with <r>``, ``cool <o> with <r>``, ``look``,
    ``inventory``; ``<r>``/``<o>`` are names such as ``desk 1`` / ``mug 2``. An action is valid iff
    it is in the admissible list.

    **Observations.** After reset: the room, then ``your task is to : <goal> .``. Every observation
    ends with ``actions : <a> , <b> , ...`` listing the admissible actions (sorted).

    **Reward.** ``10.0`` on the step that puts a qualifying object on the target (``terminated=True``,
    ``info["success"]=True``); ``-invalid_action_penalty`` (default ``-0.1``) on an invalid step;
    ``0`` otherwise. Truncation happens only at the ``max_steps`` safety cap.

    Args:
        num_locations: number of receptacles in the room (2 .. 19; the target and the needed
            appliance are always among them).
        num_distractors: number of other objects scattered over the receptacles (0 .. 15).
        task_types: the goal types to draw from (subset of ``("pick", "clean", "heat", "cool")``).
        start_at_object: start at the goal object's receptacle instead of the middle of the room.
        open_containers: all openable receptacles start open.
        invalid_action_penalty: penalty for an invalid action (>= 0).
        max_steps: safety cap on the episode length (truncation).
        list_actions: end observations with the admissible actions (default True).
    """

    TASK_KEY: ClassVar[str] = "goal"
    SUCCESS_REWARD: ClassVar[float] = 10.0
    EASIEST: ClassVar[dict[str, Any]] = {
        "num_locations": 2,
        "num_distractors": 0,
        "task_types": ("pick",),
        "start_at_object": True,
        "open_containers": True,
    }

    def __init__(
        self,
        num_locations: int = 8,
        num_distractors: int = 4,
        task_types: tuple[str, ...] | list[str] = TASK_TYPES,
        start_at_object: bool = False,
        open_containers: bool = False,
        invalid_action_penalty: float = 0.1,
        max_steps: int = 50,
        list_actions: bool = True,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(invalid_action_penalty, max_steps, list_actions, render_mode)
        if not 2 <= num_locations <= len(_ALL_RECEPTACLES):
            raise ValueError(f"num_locations must be in [2, {len(_ALL_RECEPTACLES)}]")
        if not 0 <= num_distractors <= len(OBJECTS) - 1:
            raise ValueError(f"num_distractors must be in [0, {len(OBJECTS) - 1}]")
        task_types = tuple(task_types)
        if not task_types or any(t not in TASK_TYPES for t in task_types):
            raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}")
        self.num_locations = int(num_locations)
        self.num_distractors = int(num_distractors)
        self.task_types = task_types
        self.start_at_object = bool(start_at_object)
        self.open_containers = bool(open_containers)
        self._receptacles: list[str] = []
        self._objects: list[_Obj] = []
        self._opened: dict[str, bool] = {}
        self._at: str | None = None
        self._held: _Obj | None = None
        self._goal: tuple[str, str, str] = ("pick", "mug", "desk 1")
        self._goal_obj: _Obj | None = None

    # ------------------------------------------------------------------ task generation
    @staticmethod
    def parse_goal(goal: str | dict[str, Any]) -> tuple[str, str, str]:
        """Parse an explicit goal into ``(task_type, object_kind, target_receptacle)``.

        Args:
            goal: a goal sentence such as ``"put a clean mug on desk 1"`` or a dict with keys
                ``task_type``, ``object`` and ``target``.

        Raises:
            ValueError: unknown object/receptacle, incompatible object and task type, or a
                target that cannot be a destination.
        """
        if isinstance(goal, dict):
            task_type = str(goal.get("task_type", "pick"))
            obj = str(goal["object"])
            target = " ".join(str(goal["target"]).lower().split())
        elif isinstance(goal, str):
            words = split_words(goal.lower())
            if words and words[-1] == ".":
                words = words[:-1]
            if len(words) < 6 or words[:2] != ["put", "a"]:
                raise ValueError(f"cannot parse goal {goal!r}")
            rest = words[2:]
            task_type = "pick"
            for tt, adj in _ADJECTIVE.items():
                if adj and rest[0] == adj:
                    task_type, rest = tt, rest[1:]
                    break
            if len(rest) != 4 or rest[1] not in ("in", "on"):
                raise ValueError(f"cannot parse goal {goal!r}")
            obj, target = rest[0], f"{rest[2]} {rest[3]}"
        else:
            raise ValueError(f"goal must be a str or dict, got {type(goal).__name__}")
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown task type {task_type!r}")
        if obj not in OBJECTS:
            raise ValueError(f"unknown object {obj!r}")
        cap = _CAPABILITY[task_type]
        if cap is not None and not OBJECTS[obj][cap]:
            raise ValueError(f"a {obj} cannot be used for a {task_type} task")
        if target not in _TARGETS:
            raise ValueError(f"{target!r} cannot be a goal destination")
        return task_type, obj, target

    def _choice(self, seq: list[Any] | tuple[Any, ...]) -> Any:
        return seq[int(self.np_random.integers(len(seq)))]

    def _sample(self, seq: list[Any] | tuple[Any, ...], k: int) -> list[Any]:
        idx = self.np_random.permutation(len(seq))[:k]
        return [seq[int(i)] for i in idx]

    def _setup_task(self, options: dict[str, Any]) -> None:
        explicit = options.get(self.TASK_KEY)
        if explicit is not None:
            task_type, kind, target = self.parse_goal(explicit)
        else:
            task_type = self._choice(self.task_types)
            cap = _CAPABILITY[task_type]
            kinds = [k for k, caps in OBJECTS.items() if cap is None or caps[cap]]
            kind = self._choice(kinds)
            target = self._choice(_TARGETS)
        self._goal = (task_type, kind, target)
        required = [target] + ([_APPLIANCE[task_type]] if task_type in _APPLIANCE else [])
        others = [r for r in _ALL_RECEPTACLES if r not in required]
        extra = self._sample(others, max(0, self.num_locations - len(required)))
        self._receptacles = sorted(required + extra)
        self._opened = {r: (self.open_containers or not _is_openable(r)) for r in self._receptacles}
        # the goal object never starts on the target
        sources = [r for r in self._receptacles if r != target]
        goal_obj = _Obj(f"{kind} {int(self.np_random.integers(1, MAX_INSTANCE + 1))}", kind, self._choice(sources))
        self._objects = [goal_obj]
        other_kinds = [k for k in OBJECTS if k != kind]
        for dk in self._sample(other_kinds, self.num_distractors):
            name = f"{dk} {int(self.np_random.integers(1, MAX_INSTANCE + 1))}"
            self._objects.append(_Obj(name, dk, self._choice(self._receptacles)))
        self._goal_obj = goal_obj
        self._held = None
        self._at = goal_obj.loc if self.start_at_object else None
        if self._at is not None and _is_openable(self._at):
            self._opened[self._at] = True  # starting "in view" of the object

    # ------------------------------------------------------------------ rendering
    @property
    def task_text(self) -> str:
        """The goal sentence, e.g. ``put a clean mug on desk 1``."""
        return _goal_text(*self._goal)

    @property
    def goal(self) -> dict[str, str]:
        """The goal as a dict (``task_type``, ``object``, ``target``); accepted back as ``options["goal"]``."""
        return {"task_type": self._goal[0], "object": self._goal[1], "target": self._goal[2]}

    def _contents(self, r: str) -> list[str]:
        return sorted(o.name for o in self._objects if o.loc == r)

    @staticmethod
    def _listing(names: list[str]) -> str:
        return " , ".join(f"a {n}" for n in names) if names else "nothing"

    def _describe(self, r: str) -> str:
        listing = self._listing(self._contents(r))
        if _is_openable(r):
            if not self._opened[r]:
                return _T_CLOSED.format(r=r)
            return _T_OPEN_SEE.format(r=r, list=listing)
        if RECEPTACLES[_kind(r)][1] == "surface":
            return _T_ON_SEE.format(r=r, list=listing)
        return _T_IN_SEE.format(r=r, list=listing)

    def _look(self) -> str:
        if self._at is None:
            return _T_ROOM.format(list=self._listing(self._receptacles))
        return _T_AT.format(r=self._at) + " " + self._describe(self._at)

    def _initial_observation(self) -> str:
        lines = [_T_ROOM.format(list=self._listing(self._receptacles))]
        if self._at is not None:
            lines.append(self._look())
        lines.append(_T_TASK.format(goal=self.task_text))
        return "\n".join(lines)

    # ------------------------------------------------------------------ dynamics
    def _action_table(self) -> dict[str, tuple[str, ...]]:
        """Canonical admissible action -> (operation, arguments...)."""
        table: dict[str, tuple[str, ...]] = {}
        for r in self._receptacles:
            if r != self._at:
                table[f"go to {r}"] = ("go", r)
        r = self._at
        if r is not None:
            if _is_openable(r):
                if self._opened[r]:
                    table[f"close {r}"] = ("close", r)
                else:
                    table[f"open {r}"] = ("open", r)
            if self._opened[r]:
                if self._held is None:
                    for name in self._contents(r):
                        table[f"take {name} from {r}"] = ("take", name, r)
                else:
                    table[f"put {self._held.name} {_prep(r)} {r}"] = ("put", self._held.name, r)
            if self._held is not None:
                caps = OBJECTS[self._held.kind]
                for task_type, appliance in _APPLIANCE.items():
                    if r == appliance and caps[_CAPABILITY[task_type]]:
                        verb = _VERB[task_type]
                        table[f"{verb} {self._held.name} with {r}"] = (verb, self._held.name, r)
        table["inventory"] = ("inventory",)
        table["look"] = ("look",)
        return table

    def admissible_actions(self) -> list[str]:
        """The executable actions in the current state, sorted alphabetically."""
        return sorted(self._action_table())

    def _lookup(self, action: str) -> tuple[str, ...] | None:
        table = self._action_table()
        action = action.replace("in / on", "in/on")
        if action in table:
            return table[action]
        words = action.split()
        if len(words) >= 2 and words[0] == "put":
            for i, w in enumerate(words):
                if w in ("in", "on", "in/on"):
                    for prep in ("in", "on"):
                        alt = " ".join(words[:i] + [prep] + words[i + 1 :])
                        if alt in table:
                            return table[alt]
        return None

    def _is_solved(self) -> bool:
        task_type, kind, target = self._goal
        for o in self._objects:
            if o.kind == kind and o.loc == target:
                if task_type == "pick" or (task_type == "clean" and o.clean) or (task_type == "heat" and o.hot) or (
                    task_type == "cool" and o.cool
                ):
                    return True
        return False

    def _obj(self, name: str) -> _Obj:
        return next(o for o in self._objects if o.name == name)

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        op = self._lookup(action)
        if op is None:
            return _T_INVALID, 0.0, False, True
        kind = op[0]
        if kind == "go":
            self._at = op[1]
            return _T_ARRIVE.format(r=op[1]) + " " + self._describe(op[1]), 0.0, False, False
        if kind == "open":
            self._opened[op[1]] = True
            return _T_OPENED.format(r=op[1], list=self._listing(self._contents(op[1]))), 0.0, False, False
        if kind == "close":
            self._opened[op[1]] = False
            return _T_CLOSED_IT.format(r=op[1]), 0.0, False, False
        if kind == "take":
            obj = self._obj(op[1])
            obj.loc = None
            self._held = obj
            return _T_TAKE.format(o=op[1], r=op[2]), 0.0, False, False
        if kind == "put":
            obj = self._obj(op[1])
            obj.loc = op[2]
            self._held = None
            text = _T_PUT.format(o=op[1], prep=_prep(op[2]), r=op[2])
            if self._is_solved():
                self._success = True
                return text, self.SUCCESS_REWARD, True, False
            return text, 0.0, False, False
        if kind in ("clean", "heat", "cool"):
            obj = self._obj(op[1])
            if kind == "clean":
                obj.clean = True
            elif kind == "heat":
                obj.hot, obj.cool = True, False
            else:
                obj.cool, obj.hot = True, False
            return _T_USE.format(verb=kind, o=op[1], r=op[2]), 0.0, False, False
        if kind == "inventory":
            if self._held is None:
                return _T_INV_EMPTY, 0.0, False, False
            return _T_INV.format(o=self._held.name), 0.0, False, False
        return self._look(), 0.0, False, False  # look

    # ------------------------------------------------------------------ expert
    def _needs_state(self, obj: _Obj) -> bool:
        task_type = self._goal[0]
        return (
            (task_type == "clean" and not obj.clean)
            or (task_type == "heat" and not obj.hot)
            or (task_type == "cool" and not obj.cool)
        )

    def expert_action(self) -> str:
        """Privileged scripted expert: fetch the goal object, use the appliance if the goal needs
        it, then bring the object to the target (opening closed receptacles on the way)."""
        task_type, kind, target = self._goal
        held = self._held
        if held is not None and held.kind != kind:
            # put the wrong object down where we stand (or go somewhere we can put it)
            if self._at is not None:
                if not self._opened[self._at]:
                    return f"open {self._at}"
                return f"put {held.name} {_prep(self._at)} {self._at}"
            return f"go to {target}"
        if held is not None:
            if self._needs_state(held):
                appliance = _APPLIANCE[task_type]
                if self._at != appliance:
                    return f"go to {appliance}"
                return f"{_VERB[task_type]} {held.name} with {appliance}"
            if self._at != target:
                return f"go to {target}"
            if not self._opened[target]:
                return f"open {target}"
            return f"put {held.name} {_prep(target)} {target}"
        obj = self._goal_obj
        assert obj is not None and obj.loc is not None
        if self._at != obj.loc:
            return f"go to {obj.loc}"
        if not self._opened[obj.loc]:
            return f"open {obj.loc}"
        return f"take {obj.name} from {obj.loc}"

    # ------------------------------------------------------------------ vocabulary
    @classmethod
    def vocabulary(cls, **difficulty_kwargs: Any) -> list[str]:
        """All words of observations and valid actions (independent of the difficulty knobs)."""
        words = words_of(*_TEMPLATES)
        words.update(RECEPTACLES)
        words.update(OBJECTS)
        words.update(a for a in _ADJECTIVE.values() if a)
        words.update(str(i) for i in range(1, max(MAX_INSTANCE, max(n for n, _, _ in RECEPTACLES.values())) + 1))
        return sorted(words)
