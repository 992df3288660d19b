"""``CodeBreaker``: a Mastermind-like code-breaking text game (credit assignment across turns)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from .base import TextEnv, words_of

__all__ = ["CodeBreaker", "feedback_counts", "feedback_marks"]

FEEDBACK_MODES: tuple[str, ...] = ("counts", "marks")

_T_INTRO = "crack the secret code . it has {L} symbols , each a number from 1 to {n} ( repeats allowed ) ."
_T_RULES_COUNTS = (
    "after each guess you learn how many symbols are exact ( right symbol , right place ) "
    "and partial ( right symbol , wrong place ) ."
)
_T_RULES_MARKS = (
    "after each guess you get one mark per position : hit ( right symbol , right place ) , "
    "near ( in the code , wrong place ) or miss ( not in the code ) ."
)
_T_BUDGET = "you have {g} guesses . to guess , say guess followed by {L} numbers ."
_T_GUESS = "guess {k} : {code} ."
_T_COUNTS = "exact : {e} , partial : {p} ."
_T_MARKS = "marks : {marks} ."
_T_LEFT = "guesses left : {g} ."
_T_WIN = "you cracked the code ."
_T_LOSE = "no guesses left . the code was {code} ."
_T_INVALID = "invalid guess . say guess followed by {L} numbers from 1 to {n} ."
_T_ACTIONS = "actions : guess {code} , hit near miss"
_TEMPLATES = (
    _T_INTRO, _T_RULES_COUNTS, _T_RULES_MARKS, _T_BUDGET, _T_GUESS, _T_COUNTS, _T_MARKS, _T_LEFT, _T_WIN,
    _T_LOSE, _T_INVALID, _T_ACTIONS,
)


def feedback_counts(secret: Sequence[int], guess: Sequence[int]) -> tuple[int, int]:
    """Mastermind feedback: ``(exact, partial)`` where ``exact`` counts positions with the right
    symbol and ``partial`` counts further symbols present in the secret at another position
    (multiset intersection minus exact hits)."""
    exact = sum(a == b for a, b in zip(secret, guess))
    common = sum((Counter(secret) & Counter(guess)).values())
    return exact, common - exact


def feedback_marks(secret: Sequence[int], guess: Sequence[int]) -> tuple[str, ...]:
    """Wordle feedback: per position ``hit`` (right place), ``near`` (in the code elsewhere, counted
    with multiplicity, hits first, left to right) or ``miss``."""
    marks = ["miss"] * len(guess)
    remaining: Counter[int] = Counter()
    for i, (s, g) in enumerate(zip(secret, guess)):
        if s == g:
            marks[i] = "hit"
        else:
            remaining[s] += 1
    for i, g in enumerate(guess):
        if marks[i] != "hit" and remaining[g] > 0:
            marks[i] = "near"
            remaining[g] -= 1
    return tuple(marks)


def _fmt(code: Sequence[int]) -> str:
    return " ".join(str(s) for s in code)


class CodeBreaker(TextEnv):
    """Mastermind-like game: find a secret code of ``code_length`` symbols, each a number in
    ``1 .. num_symbols`` (repeats allowed), within ``max_guesses`` guesses.

    **Task.** The secret comes from ``seed``, or from ``options["secret"]`` (``"3 1 2"`` or
    ``[3, 1, 2]``). Other ``options`` keys are ignored.

    **Actions.** ``guess <s1> <s2> ...`` (e.g. ``guess 3 1 2``; ``guess 312`` is accepted too).
    Anything else, a wrong length or an out-of-range symbol is invalid and does not use a guess.

    **Feedback** after every valid guess, as ``guess <k> : <code> .`` followed by

    * ``feedback="counts"`` (default, Mastermind): ``exact : <e> , partial : <p> .`` (see
      :func:`feedback_counts`);
    * ``feedback="marks"`` (Wordle): ``marks : hit miss near .`` (see :func:`feedback_marks`);

    then ``guesses left : <g> .``. When the code space has at most ``max_listed_actions`` codes,
    every observation ends with ``actions : guess ... , ...`` listing all guesses; otherwise the
    actions line is omitted.

    **Reward.** ``10.0`` on the guess that cracks the code (``terminated=True``, success); the episode
    also terminates, with reward 0, when ``max_guesses`` guesses are used up. Invalid actions give
    ``-invalid_action_penalty`` (default 0.0, i.e. the reward is 0 on every non-winning step).

    The expert plays the first code (in lexicographic order) consistent with all feedback so far;
    it needs at most 3 guesses at the easiest setting and 6 at the default (``counts``, 3 x 4).

    Args:
        code_length: number of symbols in the code (1 .. 6).
        num_symbols: symbols are the numbers ``1 .. num_symbols`` (2 .. 9).
        max_guesses: guesses allowed before the episode fails.
        feedback: ``"counts"`` or ``"marks"``.
        max_listed_actions: list all guesses when there are at most this many codes.
        invalid_action_penalty: penalty for an invalid action (>= 0).
        max_steps: safety cap on the episode length (truncation).
        list_actions: allow the actions line at all (default True).
    """

    TASK_KEY: ClassVar[str] = "secret"
    SUCCESS_REWARD: ClassVar[float] = 10.0
    EASIEST: ClassVar[dict[str, Any]] = {"code_length": 1, "num_symbols": 3, "max_guesses": 3}

    def __init__(
        self,
        code_length: int = 3,
        num_symbols: int = 4,
        max_guesses: int = 8,
        feedback: str = "counts",
        max_listed_actions: int = 27,
        invalid_action_penalty: float = 0.0,
        max_steps: int = 50,
        list_actions: bool = True,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(invalid_action_penalty, max_steps, list_actions, render_mode)
        if not 1 <= code_length <= 6:
            raise ValueError("code_length must be in [1, 6]")
        if not 2 <= num_symbols <= 9:
            raise ValueError("num_symbols must be in [2, 9]")
        if max_guesses < 1:
            raise ValueError("max_guesses must be >= 1")
        if feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback must be one of {FEEDBACK_MODES}")
        self.code_length = int(code_length)
        self.num_symbols = int(num_symbols)
        self.max_guesses = int(max_guesses)
        self.feedback = feedback
        self.max_listed_actions = int(max_listed_actions)
        self._secret: tuple[int, ...] = (1,) * self.code_length
        self._history: list[tuple[tuple[int, ...], Any]] = []

    # ------------------------------------------------------------------ task
    def parse_secret(self, secret: str | Sequence[int]) -> tuple[int, ...]:
        """Validate an explicit secret (``"3 1 2"``, ``"312"`` or ``[3, 1, 2]``) for this env's knobs."""
        if isinstance(secret, str):
            parts = secret.split()
            if len(parts) == 1 and len(parts[0]) == self.code_length:
                parts = list(parts[0])
            try:
                code = tuple(int(p) for p in parts)
            except ValueError as e:
                raise ValueError(f"cannot parse secret {secret!r}") from e
        else:
            code = tuple(int(s) for s in secret)
        if len(code) != self.code_length or any(not 1 <= s <= self.num_symbols for s in code):
            raise ValueError(f"secret {secret!r} must have {self.code_length} symbols in 1..{self.num_symbols}")
        return code

    def _setup_task(self, options: dict[str, Any]) -> None:
        explicit = options.get(self.TASK_KEY)
        if explicit is not None:
            self._secret = self.parse_secret(explicit)
        else:
            draws = self.np_random.integers(1, self.num_symbols + 1, size=self.code_length)
            self._secret = tuple(int(s) for s in draws)
        self._history = []

    @property
    def task_text(self) -> str:
        """A description of the game (the secret is not revealed)."""
        return f"crack a code of {self.code_length} symbols from 1 to {self.num_symbols}"

    @property
    def secret(self) -> tuple[int, ...]:
        """The secret code (privileged)."""
        return self._secret

    @property
    def guesses_left(self) -> int:
        """Remaining guesses."""
        return self.max_guesses - len(self._history)

    # ------------------------------------------------------------------ helpers
    def _feedback(self, secret: Sequence[int], guess: Sequence[int]) -> Any:
        return feedback_counts(secret, guess) if self.feedback == "counts" else feedback_marks(secret, guess)

    def _all_codes(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(range(1, self.num_symbols + 1), repeat=self.code_length)

    def _parse_guess(self, action: str) -> tuple[int, ...] | None:
        words = action.split()
        if len(words) < 2 or words[0] != "guess":
            return None
        parts = words[1:]
        if len(parts) == 1 and len(parts[0]) == self.code_length > 1:
            parts = list(parts[0])
        if len(parts) != self.code_length or not all(p.isdigit() and len(p) == 1 for p in parts):
            return None
        code = tuple(int(p) for p in parts)
        if any(not 1 <= s <= self.num_symbols for s in code):
            return None
        return code

    # ------------------------------------------------------------------ rendering / dynamics
    def _initial_observation(self) -> str:
        rules = _T_RULES_COUNTS if self.feedback == "counts" else _T_RULES_MARKS
        return "\n".join(
            [
                _T_INTRO.format(L=self.code_length, n=self.num_symbols),
                rules,
                _T_BUDGET.format(g=self.max_guesses, L=self.code_length),
            ]
        )

    def admissible_actions(self) -> list[str]:
        """All guesses in lexicographic order when there are at most ``max_listed_actions`` codes,
        else ``[]`` (any well-formed guess is valid)."""
        if self.num_symbols**self.code_length > self.max_listed_actions:
            return []
        return [f"guess {_fmt(c)}" for c in self._all_codes()]

    def random_valid_action(self) -> str:
        """A uniformly random well-formed guess (drawn with ``self.np_random``)."""
        code = self.np_random.integers(1, self.num_symbols + 1, size=self.code_length)
        return f"guess {_fmt(int(s) for s in code)}"

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        guess = self._parse_guess(action)
        if guess is None:
            return _T_INVALID.format(L=self.code_length, n=self.num_symbols), 0.0, False, True
        fb = self._feedback(self._secret, guess)
        self._history.append((guess, fb))
        lines = [_T_GUESS.format(k=len(self._history), code=_fmt(guess))]
        if self.feedback == "counts":
            lines.append(_T_COUNTS.format(e=fb[0], p=fb[1]))
        else:
            lines.append(_T_MARKS.format(marks=" ".join(fb)))
        if guess == self._secret:
            self._success = True
            lines.append(_T_WIN)
            return " ".join(lines), self.SUCCESS_REWARD, True, False
        if self.guesses_left <= 0:
            lines.append(_T_LOSE.format(code=_fmt(self._secret)))
            return " ".join(lines), 0.0, True, False
        lines.append(_T_LEFT.format(g=self.guesses_left))
        return " ".join(lines), 0.0, False, False

    def _step_info(self) -> dict[str, Any]:
        return {"guesses_left": self.guesses_left}

    # ------------------------------------------------------------------ expert
    def consistent_codes(self) -> Iterator[tuple[int, ...]]:
        """Codes (lexicographic order) consistent with all feedback received so far."""
        for code in self._all_codes():
            if all(self._feedback(code, g) == fb for g, fb in self._history):
                yield code

    def expert_action(self) -> str:
        """Consistent-hypothesis expert: guess the first code, in lexicographic order, that is
        consistent with all feedback so far (uses no privileged information)."""
        code = next(self.consistent_codes(), None)
        if code is None:  # pragma: no cover - impossible while the secret is consistent
            code = self._secret
        return f"guess {_fmt(code)}"

    # ------------------------------------------------------------------ vocabulary
    @classmethod
    def vocabulary(cls, **difficulty_kwargs: Any) -> list[str]:
        """All words of observations and valid actions: template words and the numbers
        ``0 .. max(9, max_guesses)``."""
        words = words_of(*_TEMPLATES)
        top = max(9, int(difficulty_kwargs.get("max_guesses", 8)))
        words.update(str(i) for i in range(0, top + 1))
        return sorted(words)
