"""``trl_aem/MiniSWE-v0``: fix injected bugs in a small Python repository with shell commands, in a sandbox.

A SWE-bench-like coding task that runs offline in seconds. ``reset(seed=s)`` writes a repository generated from the
seed: a package of ``num_functions`` small functions (drawn from :data:`TEMPLATES`, with seed-dependent names and
constants) in one or more modules, and their pytest tests, with ``num_bugs`` injected bugs of the kinds in
:data:`BUG_KINDS` (wrong operator, off-by-one, wrong default, missing edge case, swapped arguments, wrong return),
each of which makes at least one visible test fail. Every action is one shell command, run in the episode's own
working copy by :class:`trl_aem.sandbox.Sandbox`; the observation is its output (cut to ``max_output_chars``, the cut
stated) and how it ended. The action ``submit`` ends the episode: the package is checked against the full hidden
test suite (every visible test plus more cases of the same functions), in the sandbox; reward 1 when every hidden
test passes, else 0, and ``info["success"]`` accordingly. The episode is truncated after ``max_steps`` commands
without ``submit`` (reward 0).

``info`` holds ``success``, ``invalid_action`` (an empty command, or one longer than ``max_command_chars``),
``task``, ``exit_code``, ``sandbox_event`` (the limit that stopped the command: ``timeout``, ``cpu``, ``output``,
``file_size``, ``launcher``, ``disk_quota``, else None), ``sandbox_level`` and, after ``submit``, ``tests_passed``
and ``tests_total``. :meth:`MiniSWE.expert_action` reads each buggy file (``cat -n``), fixes it with ``sed``, runs the
tests and submits.

The sandbox's level defaults to the strongest, ``namespaces``; where this machine cannot provide it, the environment
refuses to start unless a weaker level is accepted with ``sandbox_level`` (or ``$TRL_AEM_SANDBOX_LEVEL``): see
:mod:`trl_aem.sandbox` and docs/envs/miniswe.md.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import stat
import string
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import TextEnv

__all__ = ["BUG_KINDS", "TEMPLATES", "Bug", "MiniSWE", "Repository", "generate_repository"]

#: The kinds of injected bugs.
BUG_KINDS: tuple[str, ...] = ("wrong_operator", "off_by_one", "wrong_default", "missing_edge_case",
                              "swapped_arguments", "wrong_return")
#: Package and module names the repositories draw from.
PACKAGE_NAMES: tuple[str, ...] = ("toolkit", "mathkit", "listkit", "pyhelpers", "smallib", "utilbox")
MODULE_NAMES: tuple[str, ...] = ("core", "helpers", "tools", "ops", "extras")
#: Functions per module.
FUNCTIONS_PER_MODULE = 3
#: The command that ends the episode.
SUBMIT = "submit"
RESULT_MARKER = "MINISWE-RESULT "


@dataclass(frozen=True)
class Template:
    """One function the repositories can contain: its source (``{name}`` and constants are filled in), the bugs it
    can carry (kind -> line index, buggy line) and a generator of test inputs (typical ones first)."""

    key: str
    names: tuple[str, ...]
    lines: tuple[str, ...]
    bugs: dict[str, tuple[int, str]]
    constants: Any  # (random.Random) -> dict of the constants the lines use
    cases: Any  # (random.Random, constants) -> list of argument tuples


def _ints(rng: random.Random, n: int, low: int = -20, high: int = 20) -> list[int]:
    return [rng.randint(low, high) for _ in range(n)]


def _distinct(rng: random.Random, n: int, low: int = 0, high: int = 50) -> list[int]:
    return rng.sample(range(low, high), n)


def _clamp_cases(rng, c):
    lo = rng.randint(-10, 0)
    hi = lo + rng.randint(5, 20)
    mid = rng.randint(lo + 1, hi - 1)
    return [(mid, lo, hi), (lo - rng.randint(1, 9), lo, hi), (hi + rng.randint(1, 9), lo, hi), (lo, lo, hi),
            (hi, lo, hi), (rng.randint(lo + 1, hi - 1), lo, hi)]


def _count_cases(rng, c):
    t = rng.randint(-5, 5)
    return [(_ints(rng, 5) + [t], t), (_ints(rng, 4), t), ([t, t + 1, t - 1], t), ([], t), (_ints(rng, 6), 0)]


def _leap_cases(rng, c):
    leap = 4 * rng.randint(480, 520) + (4 if rng.random() < 0.5 else 0)
    while leap % 100 == 0:
        leap += 4
    plain = leap + rng.randint(1, 3)
    century = 100 * rng.choice([17, 18, 19, 21, 22, 23])
    return [(leap,), (plain,), (century,), (400 * rng.randint(4, 6),), (leap + 4 if (leap + 4) % 100 else leap + 8,)]


def _index_cases(rng, c):
    items = _distinct(rng, 6)
    return [(items, items[2]), (items, items[-1]), (items, 99), (items + [items[1]], items[1]), ([], 3),
            (items[:3], items[0])]


TEMPLATES: tuple[Template, ...] = (
    Template(
        "clamp", ("clamp", "bound", "limit_to_range"),
        ("def {name}(value, low, high):", '    """Return value limited to the closed range [low, high]."""',
         "    if value < low:", "        return low", "    if value > high:", "        return high",
         "    return value"),
        {"wrong_operator": (2, "    if value > low:"), "wrong_return": (3, "        return high")},
        lambda rng: {}, _clamp_cases),
    Template(
        "mean", ("mean", "average", "arithmetic_mean"),
        ("def {name}(values, default={default!r}):",
         '    """Return the arithmetic mean of values, or default when values is empty."""',
         "    return sum(values) / len(values) if values else default"),
        {"missing_edge_case": (2, "    return sum(values) / len(values)"),
         "wrong_default": (0, "def {name}(values, default=None):"),
         "off_by_one": (2, "    return sum(values) / (len(values) + 1) if values else default"),
         "wrong_operator": (2, "    return sum(values) * len(values) if values else default")},
        lambda rng: {"default": rng.choice([0.0, -1.0, 0])},
        lambda rng, c: [(_ints(rng, 4),), (_ints(rng, 3),), ([],), ([rng.randint(1, 9)],), (_ints(rng, 5),),
                        ([], -5.0)]),
    Template(
        "count_above", ("count_above", "count_greater", "num_above"),
        ("def {name}(values, threshold):",
         '    """Return how many of values are strictly greater than threshold."""', "    count = 0",
         "    for value in values:", "        if value > threshold:", "            count += 1", "    return count"),
        {"wrong_operator": (4, "        if value >= threshold:"), "wrong_return": (6, "    return len(values)")},
        lambda rng: {}, _count_cases),
    Template(
        "running_total", ("running_total", "prefix_sums", "cumulative_sum"),
        ("def {name}(values):",
         '    """Return the running totals of values: item i is the sum of values[0] to values[i]."""',
         "    totals = []", "    total = 0", "    for i in range(len(values)):", "        total += values[i]",
         "        totals.append(total)", "    return totals"),
        {"off_by_one": (4, "    for i in range(1, len(values)):"), "wrong_return": (7, "    return total")},
        lambda rng: {},
        lambda rng, c: [(_ints(rng, 4),), (_ints(rng, 5),), ([],), ([rng.randint(1, 9)],), (_ints(rng, 3),)]),
    Template(
        "last_items", ("last_items", "tail", "take_last"),
        ("def {name}(items, n):", '    """Return the last n items of items (an empty list when n is 0)."""',
         "    return items[-n:] if n > 0 else []"),
        {"missing_edge_case": (2, "    return items[-n:]"),
         "off_by_one": (2, "    return items[-n + 1:] if n > 0 else []")},
        lambda rng: {},
        lambda rng, c: [(_distinct(rng, 6), 2), (_distinct(rng, 5), 0), (_distinct(rng, 4), 1),
                        (_distinct(rng, 3), 3), (_distinct(rng, 6), 4)]),
    Template(
        "power_mod", ("power_mod", "modular_power", "pow_mod"),
        ("def {name}(base, exponent, modulus={modulus}):",
         '    """Return base to the power exponent, modulo modulus."""', "    return pow(base, exponent, modulus)"),
        {"swapped_arguments": (2, "    return pow(exponent, base, modulus)"),
         "wrong_default": (0, "def {name}(base, exponent, modulus={bad_modulus}):")},
        lambda rng: dict(zip(("modulus", "bad_modulus"), rng.sample([7, 11, 13, 97, 101], 2), strict=True)),
        lambda rng, c: [(2, rng.randint(5, 12)), (3, rng.randint(4, 9)), (rng.randint(4, 9), 2),
                        (rng.randint(2, 9), rng.randint(10, 20), 1000), (5, 3)]),
    Template(
        "repeat_word", ("repeat_word", "repeat_text", "join_copies"),
        ("def {name}(word, times, sep={sep!r}):", '    """Return word repeated times times, separated by sep."""',
         "    return sep.join([word] * times)"),
        {"wrong_default": (0, "def {name}(word, times, sep={bad_sep!r}):"),
         "swapped_arguments": (2, "    return word.join([sep] * times)")},
        lambda rng: dict(zip(("sep", "bad_sep"), rng.sample(["-", ", ", " ", "+", ""], 2), strict=True)),
        lambda rng, c: [(rng.choice(["ab", "hey", "go"]), rng.randint(2, 4)), ("x", 1),
                        (rng.choice(["na", "la"]), 3, "/"), ("z", 0), ("ok", 2)]),
    Template(
        "is_leap_year", ("is_leap_year", "leap_year", "is_leap"),
        ("def {name}(year):", '    """Return True when year is a leap year in the Gregorian calendar."""',
         "    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)"),
        {"wrong_operator": (2, "    return year % 4 == 0 or (year % 100 != 0 or year % 400 == 0)"),
         "missing_edge_case": (2, "    return year % 4 == 0 and year % 100 != 0")},
        lambda rng: {}, _leap_cases),
    Template(
        "find_index", ("find_index", "index_of", "position_of"),
        ("def {name}(items, target):",
         '    """Return the index of the first target in items, or -1 when target is not there."""',
         "    for index in range(len(items)):", "        if items[index] == target:", "            return index",
         "    return -1"),
        {"off_by_one": (2, "    for index in range(len(items) - 1):"),
         "wrong_return": (4, "            return items[index]")},
        lambda rng: {}, _index_cases),
    Template(
        "percentage", ("percentage", "percent_of", "as_percent"),
        ("def {name}(part, whole, digits={digits}):",
         '    """Return part as a percentage of whole, rounded to digits decimals."""',
         "    return round(100 * part / whole, digits)"),
        {"swapped_arguments": (2, "    return round(100 * whole / part, digits)"),
         "wrong_default": (0, "def {name}(part, whole, digits={bad_digits}):")},
        lambda rng: dict(zip(("digits", "bad_digits"), rng.sample([0, 1, 2, 3], 2), strict=True)),
        lambda rng, c: [(1, 3), (rng.randint(2, 5), 7), (rng.randint(1, 6), 9, 2), (5, 8), (rng.randint(1, 5), 6)]),
    Template(
        "apply_discount", ("apply_discount", "discounted", "sale_price"),
        ("def {name}(price, rate={rate}):",
         '    """Return price after a discount of rate (a fraction of the price), rounded to cents."""',
         "    return round(price * (1 - rate), 2)"),
        {"wrong_operator": (2, "    return round(price * (1 + rate), 2)"),
         "wrong_default": (0, "def {name}(price, rate={bad_rate}):")},
        lambda rng: dict(zip(("rate", "bad_rate"), rng.sample([0.1, 0.15, 0.2, 0.25, 0.3], 2), strict=True)),
        lambda rng, c: [(100,), (rng.choice([19.99, 49.5, 12.0]),), (80, 0.5), (rng.randint(10, 90), 0.05),
                        (60,)]),
    Template(
        "safe_divide", ("safe_divide", "divide_or", "ratio"),
        ("def {name}(numerator, denominator, default={default!r}):",
         '    """Return numerator / denominator, or default when denominator is 0."""',
         "    return numerator / denominator if denominator != 0 else default"),
        {"missing_edge_case": (2, "    return numerator / denominator"),
         "swapped_arguments": (2, "    return denominator / numerator if denominator != 0 else default")},
        lambda rng: {"default": rng.choice([0.0, None, -1])},
        lambda rng, c: [(rng.randint(5, 20), 4), (7, 2), (rng.randint(1, 9), 0), (0, 3), (9, 3, 1.5)]),
    Template(
        "manhattan", ("manhattan", "manhattan_distance", "grid_distance"),
        ("def {name}(x1, y1, x2, y2):",
         '    """Return the Manhattan distance between the points (x1, y1) and (x2, y2)."""',
         "    return abs(x1 - x2) + abs(y1 - y2)"),
        {"swapped_arguments": (2, "    return abs(x1 - y1) + abs(x2 - y2)"),
         "wrong_operator": (2, "    return abs(x1 - x2) - abs(y1 - y2)")},
        lambda rng: {},
        lambda rng, c: [tuple(_ints(rng, 4, -9, 9)), (0, 0, rng.randint(1, 5), rng.randint(6, 9)),
                        tuple(_ints(rng, 4, -9, 9)), (1, 2, 1, 2), tuple(_ints(rng, 4, -9, 9))]),
    Template(
        "chunk", ("chunk", "batched", "split_every"),
        ("def {name}(items, size):",
         '    """Split items into consecutive lists of size items (the last one may be shorter)."""',
         "    return [items[i:i + size] for i in range(0, len(items), size)]"),
        {"off_by_one": (2, "    return [items[i:i + size - 1] for i in range(0, len(items), size)]")},
        lambda rng: {},
        lambda rng, c: [(_distinct(rng, 6), 2), (_distinct(rng, 7), 3), ([], 2), (_distinct(rng, 3), 5),
                        (_distinct(rng, 4), 1)]),
)


@dataclass(frozen=True)
class Bug:
    """One injected bug: the file, the 1-based line, the correct and the buggy line, its kind and function."""

    path: str
    line: int
    correct: str
    buggy: str
    kind: str
    function: str


@dataclass
class Repository:
    """A generated task: files of the repository (path -> text, with the bugs), the correct text of the files with
    bugs, the hidden test suite (test module name -> its source, and -> its test names), the bugs, and the visible
    tests that fail."""

    package: str
    files: dict[str, str]
    fixed: dict[str, str]
    hidden: dict[str, str]
    hidden_tests: dict[str, list[str]]
    bugs: list[Bug]
    failing_tests: list[str]
    functions: list[str] = field(default_factory=list)

    @property
    def num_hidden_tests(self) -> int:
        """How many tests the hidden suite has."""
        return sum(len(names) for names in self.hidden_tests.values())


def _run_case(namespace: dict, name: str, args: tuple) -> tuple[bool, Any]:
    try:
        return True, namespace[name](*args)
    except Exception as exc:  # noqa: BLE001 - a buggy function may raise; that is a failing test
        return False, type(exc).__name__


def _module_namespace(lines: list[str]) -> dict:
    namespace: dict = {}
    exec(compile("\n".join(lines) + "\n", "<miniswe>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace


def generate_repository(seed: int, num_functions: int = 3, num_bugs: int = 1,
                        bug_kinds: tuple[str, ...] = BUG_KINDS) -> Repository:
    """Generate the repository of ``seed`` (deterministic for the same arguments).

    Every bug makes at least one visible test fail (checked by running the generated functions here, on the tests'
    inputs: the generated code is ours); the correct code passes every hidden test.
    """
    rng = random.Random(f"miniswe-{seed}-{num_functions}-{num_bugs}-{','.join(bug_kinds)}")
    for _attempt in range(100):
        repo = _try_generate(rng, num_functions, num_bugs, bug_kinds)
        if repo is not None:
            return repo
    raise RuntimeError(f"could not generate a repository for seed {seed}")  # pragma: no cover


def _try_generate(rng: random.Random, num_functions: int, num_bugs: int,
                  bug_kinds: tuple[str, ...]) -> Repository | None:
    package = rng.choice(PACKAGE_NAMES)
    hosts = [t for t in TEMPLATES if set(t.bugs) & set(bug_kinds)]
    buggy_templates = rng.sample(hosts, num_bugs)
    others = rng.sample([t for t in TEMPLATES if t not in buggy_templates], num_functions - num_bugs)
    chosen = buggy_templates + others
    rng.shuffle(chosen)
    modules = [MODULE_NAMES[i // FUNCTIONS_PER_MODULE] for i in range(len(chosen))]
    files: dict[str, str] = {}
    fixed_files: dict[str, str] = {}
    hidden: dict[str, str] = {}
    hidden_tests: dict[str, list[str]] = {}
    bugs: list[Bug] = []
    failing: list[str] = []
    functions: list[str] = []
    by_module: dict[str, list[tuple[Template, str, dict, list[str], list[str], list[tuple]]]] = {}
    for template, module in zip(chosen, modules, strict=True):
        name = rng.choice(template.names)
        constants = template.constants(rng)
        correct = [line.format(name=name, **constants) for line in template.lines]
        buggy = list(correct)
        kind = None
        if template in buggy_templates:
            kind = rng.choice(sorted(set(template.bugs) & set(bug_kinds)))
            index, line = template.bugs[kind]
            buggy[index] = line.format(name=name, **constants)
        cases = template.cases(rng, constants)
        by_module.setdefault(module, []).append((template, name, {"kind": kind}, correct, buggy, cases))
        functions.append(name)
    for module, entries in by_module.items():
        path = f"{package}/{module}.py"
        test_path = f"tests/test_{module}.py"
        correct_lines = [f'"""{module.capitalize()} functions of {package}."""', ""]
        buggy_lines = list(correct_lines)
        visible_sources: list[str] = []
        hidden_sources: dict[str, str] = {}
        for template, name, meta, correct, buggy, cases in entries:
            good_ns, bad_ns = _module_namespace(correct), _module_namespace(buggy)
            outcomes = []
            for args in cases:
                ok, expected = _run_case(good_ns, name, args)
                if not ok:
                    return None  # a generated input the correct function rejects: draw again
                bad_ok, got = _run_case(bad_ns, name, args)
                outcomes.append((args, expected, not bad_ok or got != expected or type(got) is not type(expected)))
            exposing = [i for i, (_, _, fails) in enumerate(outcomes) if fails]
            if meta["kind"] is not None and not exposing:
                return None  # this bug hides from every input drawn: draw again
            visible = [0, 1] + ([exposing[0]] if exposing and exposing[0] > 1 else [])
            for position, (args, expected, fails) in enumerate(outcomes):
                test_name = f"test_{name}_{position + 1}"
                call = f"{name}({', '.join(repr(a) for a in args)})"
                source = f"def {test_name}():\n    assert {call} == {expected!r}\n"
                hidden_sources[test_name] = source
                if position in visible:
                    visible_sources.append(source)
                    if fails:
                        failing.append(f"{test_path}::{test_name}")
            if meta["kind"] is not None:
                index = template.bugs[meta["kind"]][0]
                line_number = len(buggy_lines) + index + 1
                bugs.append(Bug(path, line_number, correct[index], buggy[index], meta["kind"], name))
            correct_lines += correct + ["", ""]
            buggy_lines += buggy + ["", ""]
        names = ", ".join(name for _, name, *_ in entries)
        header = f"from {package}.{module} import {names}\n\n\n"
        files[path] = "\n".join(buggy_lines).rstrip("\n") + "\n"
        fixed_files[path] = "\n".join(correct_lines).rstrip("\n") + "\n"
        files[test_path] = header + "\n\n".join(visible_sources)
        hidden[f"test_{module}"] = header + "\n\n".join(hidden_sources.values())
        hidden_tests[f"test_{module}"] = list(hidden_sources)
    files[f"{package}/__init__.py"] = f'"""{package}: small helper functions."""\n'
    files["README.md"] = (f"# {package}\n\nSmall helper functions. Run the tests with `python -m pytest`.\n")
    files["pytest.ini"] = "[pytest]\naddopts = -q -p no:cacheprovider\npythonpath = .\ntestpaths = tests\n"
    fixed = {path: fixed_files[path] for path in sorted({b.path for b in bugs})}
    return Repository(package, dict(sorted(files.items())), fixed, hidden, hidden_tests, bugs, failing, functions)


_RUNNER = '''import importlib, json, sys
sys.dont_write_bytecode = True
sys.path.insert(0, ".")
TESTS = {tests}
results = {{}}
for module, names in TESTS.items():
    try:
        loaded = importlib.import_module("hidden_tests." + module)
    except BaseException as exc:
        results.update({{name: "error: " + type(exc).__name__ for name in names}})
        continue
    for name in names:
        try:
            getattr(loaded, name)()
            results[name] = "passed"
        except BaseException as exc:
            results[name] = "failed: " + type(exc).__name__
sys.stdout.write("\\n{marker}" + json.dumps(results) + "\\n")
sys.stdout.flush()
'''


def _copy_regular_tree(source: str, target: str) -> None:
    """Copy the folders and regular files below ``source`` (no links, FIFOs or devices: never followed or opened)."""
    os.makedirs(target, exist_ok=True)
    for entry in os.scandir(source):
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            _copy_regular_tree(entry.path, os.path.join(target, entry.name))
        elif stat.S_ISREG(mode):
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as src, open(os.path.join(target, entry.name), "wb") as dst:
                shutil.copyfileobj(src, dst)


def _read_text(path: str) -> str | None:
    """A regular file's text (None for a missing file, a link or anything else); never follows links."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fh.read(1 << 20).decode("utf-8", "replace")


def _sed_fix(bug: Bug) -> str:
    replacement = bug.correct.replace("\\", "\\\\").replace("|", "\\|").replace("&", "\\&")
    return f"sed -i {shlex.quote(f'{bug.line}s|.*|{replacement}|')} {bug.path}"


_PRINTABLE = set(string.printable) - set("\x0b\x0c\r")


def printable(text: str) -> str:
    """``text`` in printable ASCII: other characters become ``?`` (observations stay in the Text space's charset)."""
    return "".join(c if c in _PRINTABLE else "?" for c in text)


def _remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


class MiniSWE(TextEnv):
    """Fix the injected bugs of a generated Python repository with shell commands (see the module docstring).

    Args:
        num_functions: functions in the repository (1 .. 14; three per module).
        num_bugs: injected bugs, each in a different function (1 .. num_functions).
        show_failing_tests: list the failing visible tests in the first observation.
        bug_kinds: the kinds of bugs to draw from (default all of :data:`BUG_KINDS`).
        max_steps: commands per episode before it is truncated (reward 0).
        max_output_chars: observation length; longer output shows its first and last halves, the cut stated.
        max_command_chars: longer commands are invalid actions (at most 50000: the command travels in one argument).
        command_timeout: wall-clock seconds per command (its process tree is killed after).
        cpu_seconds: CPU seconds per process of a command.
        memory_mb: address space per process of a command.
        evaluation_timeout: wall-clock seconds for the hidden test suite at ``submit``.
        sandbox_level: the weakest sandbox level accepted (``"namespaces"``, ``"landlock"``, ``"limits"``; default
            ``$TRL_AEM_SANDBOX_LEVEL`` or ``"namespaces"``): the environment refuses to start when this machine offers
            less (:class:`trl_aem.sandbox.SandboxUnavailable`).
        work_dir: where the episodes' working copies go (default the system's temporary folder).
        invalid_action_penalty: subtracted for an empty or over-long command.
    """

    TASK_KEY: ClassVar[str] = "task"
    EXTRA: ClassVar[str | None] = "miniswe"
    #: What the ``miniswe`` extra installs: pytest (the episodes' test runner) and pyseccomp (the sandbox's filter).
    EXTRA_MODULES: ClassVar[tuple[str, ...]] = ("pytest", "pyseccomp")
    EASIEST: ClassVar[dict[str, Any]] = {"num_functions": 2, "num_bugs": 1, "show_failing_tests": True}
    MAX_OBSERVATION_CHARS: ClassVar[int] = 100_000
    MAX_ACTION_CHARS: ClassVar[int] = 100_000
    #: Where the repository is, as commands see it (the ``namespaces`` level; other levels show its real path).
    TASK_TEXT = ("fix the bugs in this python repository so that all its tests pass; one shell command per turn, "
                 "then submit")

    def __init__(self, num_functions: int = 3, num_bugs: int = 1, show_failing_tests: bool = True,
                 bug_kinds: tuple[str, ...] | list[str] | None = None, max_steps: int = 20,
                 max_output_chars: int = 2000, max_command_chars: int = 4000, command_timeout: float = 10.0,
                 cpu_seconds: int = 10, memory_mb: int = 1024, evaluation_timeout: float = 30.0,
                 sandbox_level: str | None = None, work_dir: str | None = None, invalid_action_penalty: float = 0.0,
                 render_mode: str | None = None) -> None:
        from ..sandbox import LEVELS, SandboxLimits, select_level

        super().__init__(invalid_action_penalty, max_steps, False, render_mode)
        if isinstance(num_functions, bool) or not isinstance(num_functions, int) or not (
                1 <= num_functions <= len(TEMPLATES)):
            raise ValueError(f"num_functions must be an integer in [1, {len(TEMPLATES)}], got {num_functions!r}")
        kinds = tuple(BUG_KINDS if bug_kinds is None else bug_kinds)
        if not kinds or any(k not in BUG_KINDS for k in kinds):
            raise ValueError(f"bug_kinds must be a non-empty subset of {BUG_KINDS}, got {bug_kinds!r}")
        hosts = sum(bool(set(t.bugs) & set(kinds)) for t in TEMPLATES)
        if isinstance(num_bugs, bool) or not isinstance(num_bugs, int) or not 1 <= num_bugs <= min(num_functions,
                                                                                                  hosts):
            raise ValueError(f"num_bugs must be an integer in [1, {min(num_functions, hosts)}] (at most num_functions, "
                             f"and {hosts} functions can carry bugs of kinds {kinds}), got {num_bugs!r}")
        for name, value, low, high in (("max_output_chars", max_output_chars, 100, 10**6),
                                       ("max_command_chars", max_command_chars, 1, 50_000)):  # one argv entry
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if sandbox_level is not None and sandbox_level not in LEVELS:
            raise ValueError(f"sandbox_level must be one of {LEVELS} or None, got {sandbox_level!r}")
        self.num_functions, self.num_bugs, self.bug_kinds = num_functions, num_bugs, kinds
        self.show_failing_tests = bool(show_failing_tests)
        self.max_output_chars, self.max_command_chars = max_output_chars, max_command_chars
        self.limits = SandboxLimits(timeout=float(command_timeout), cpu_seconds=int(cpu_seconds),
                                    memory_mb=int(memory_mb))
        self.evaluation_limits = SandboxLimits(timeout=float(evaluation_timeout), cpu_seconds=int(cpu_seconds),
                                               memory_mb=int(memory_mb))
        self.sandbox_level = select_level(sandbox_level)  # refuses here when the machine offers less
        self.work_dir = work_dir
        self.repository: Repository | None = None
        self._episode_dir: str | None = None
        self._sandbox = None
        self._read: set[str] = set()
        self._last_action = ""
        self._finalizer = weakref.finalize(self, _remove, None)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Write the repository of ``seed`` into a fresh working copy (the previous one is removed)."""
        from ..sandbox import Sandbox

        super(TextEnv, self).reset(seed=seed)
        self._cleanup()
        task_seed = int(seed) if seed is not None else int(self.np_random.integers(2**31))
        self.repository = generate_repository(task_seed, self.num_functions, self.num_bugs, self.bug_kinds)
        self._episode_dir = tempfile.mkdtemp(prefix="trl_aem_miniswe_", dir=self.work_dir)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _remove, self._episode_dir)
        os.chmod(self._episode_dir, 0o711)  # the sandbox's user (as root: 65534) must reach the working copy
        workdir = os.path.join(self._episode_dir, "repo")
        for path, text in self.repository.files.items():
            os.makedirs(os.path.dirname(os.path.join(workdir, path)), exist_ok=True)
            with open(os.path.join(workdir, path), "w") as fh:
                fh.write(text)
        self._sandbox = Sandbox(workdir, level=self.sandbox_level, limits=self.limits,
                                env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        self._ready, self._done, self._success, self._steps = True, False, False, 0
        self._read, self._last_action = set(), ""
        observation = self._initial_observation()
        self._last_observation = observation
        return observation, self._info(invalid=False)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Run one shell command in the sandbox (``submit``: run the hidden tests and end the episode)."""
        if not self._ready:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset()")
        self._steps += 1
        command = action.strip() if isinstance(action, str) else ""
        extra: dict[str, Any] = {"exit_code": None, "sandbox_event": None}
        reward, terminated, invalid = 0.0, False, False
        if not command or len(command) > self.max_command_chars or "\x00" in command:
            invalid = True
            observation = ("empty command: answer with one shell command, or submit" if not command else
                           f"invalid command: at most {self.max_command_chars} characters, no NUL bytes")
            reward -= self.invalid_action_penalty
        elif command.lower() == SUBMIT:
            observation, passed, total = self._evaluate()
            self._success = total > 0 and passed == total
            reward, terminated = (1.0 if self._success else 0.0), True
            extra.update(tests_passed=passed, tests_total=total)
        else:
            result = self._sandbox.run(command)
            if result.setup_error:
                raise RuntimeError(f"the sandbox failed to start a command: {result.setup_error}")
            observation = result.observation(self.max_output_chars)
            extra.update(exit_code=result.exit_code, sandbox_event=result.killed)
            if result.over_quota:
                extra["sandbox_event"] = "disk_quota"
                observation += "\nthe episode ends: the working copy is over its disk quota."
                terminated = True
            if command.startswith("cat -n "):
                self._read.add(command[len("cat -n "):].strip())
        self._last_action = command
        truncated = not terminated and self._steps >= self.max_steps
        self._done = terminated or truncated
        if self._done:
            self._cleanup()
        observation = printable(observation)
        self._last_observation = observation
        info = self._info(invalid=invalid)
        info.update(extra)
        return observation, float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        """Remove the current working copy."""
        self._cleanup()

    # ------------------------------------------------------------------ episode
    def _cleanup(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
        _remove(self._episode_dir)
        self._episode_dir = None

    @property
    def workdir(self) -> str | None:
        """The current working copy on this machine (None between episodes)."""
        return None if self._episode_dir is None else os.path.join(self._episode_dir, "repo")

    @property
    def sandbox(self):
        """The current episode's :class:`trl_aem.sandbox.Sandbox` (None between episodes)."""
        return self._sandbox

    def _initial_observation(self) -> str:
        repo = self.repository
        where = self._sandbox.cwd
        lines = [
            f"You are in a Python repository ({where}, the current folder): the package {repo.package} and its "
            "tests. Some tests fail. Fix the bugs in the package's code, not in the tests, so that every test "
            "passes, also the hidden ones, which check the same functions on more inputs.",
            f"Answer with exactly one shell command per turn; you then see its output. Answer {SUBMIT} when you "
            "are done.",
            "Files: " + ", ".join(repo.files),
            "Run the tests with: python -m pytest",
        ]
        if self.show_failing_tests:
            lines.append("Failing tests: " + ", ".join(repo.failing_tests))
        return "\n".join(lines)

    def _evaluate(self) -> tuple[str, int, int]:
        """Run the hidden test suite on a copy of the package (regular files only) in a fresh sandbox."""
        from ..sandbox import Sandbox

        repo = self.repository
        total = repo.num_hidden_tests
        eval_dir = os.path.join(self._episode_dir, "evaluation")
        _remove(eval_dir)
        _copy_regular_tree(os.path.join(self.workdir, repo.package), os.path.join(eval_dir, repo.package))
        tests_dir = os.path.join(eval_dir, "hidden_tests")
        os.makedirs(tests_dir)
        with open(os.path.join(tests_dir, "__init__.py"), "w"):
            pass
        for module, source in repo.hidden.items():
            with open(os.path.join(tests_dir, f"{module}.py"), "w") as fh:
                fh.write(source)
        with open(os.path.join(eval_dir, "run_hidden_tests.py"), "w") as fh:
            fh.write(_RUNNER.format(tests=repr(repo.hidden_tests), marker=RESULT_MARKER))
        with Sandbox(eval_dir, level=self.sandbox_level, limits=self.evaluation_limits) as box:
            result = box.run([sys.executable, "-I", "-B", "run_hidden_tests.py"])
        if result.setup_error:
            raise RuntimeError(f"the sandbox failed to start the evaluation: {result.setup_error}")
        outcome: dict[str, str] = {}
        for line in reversed(result.output.splitlines()):
            if line.startswith(RESULT_MARKER):
                try:
                    outcome = json.loads(line[len(RESULT_MARKER):])
                except json.JSONDecodeError:
                    outcome = {}
                break
        expected = {name for names in repo.hidden_tests.values() for name in names}
        passed = sum(outcome.get(name) == "passed" for name in expected)
        if set(outcome) != expected:
            passed = min(passed, total - 1)  # a report that does not list exactly the hidden tests is a failure
        verdict = "every hidden test passes" if passed == total else "some hidden tests fail"
        note = "" if result.exit_code == 0 else f" ({result.status_line()})"
        return f"submitted: {passed} of {total} hidden tests pass: {verdict}{note}.", passed, total

    # ------------------------------------------------------------------ TextEnv hooks
    @property
    def task_text(self) -> str:
        """What the agent must do (also ``info["task"]``)."""
        return self.TASK_TEXT

    def _info(self, invalid: bool) -> dict[str, Any]:
        return {"success": bool(self._success), "invalid_action": bool(invalid), "task": self.task_text,
                "sandbox_level": self.sandbox_level}

    def admissible_actions(self) -> list[str]:
        """None are listed: any shell command is an action."""
        return []

    def random_valid_action(self) -> str:
        """A random plausible command (drawn with ``self.np_random``): look around, read a file, run the tests, an
        arbitrary one-character edit of a source line, or submit."""
        repo = self.repository
        sources = [p for p in repo.files if p.startswith(f"{repo.package}/") and not p.endswith("__init__.py")]
        path = sources[int(self.np_random.integers(len(sources)))]
        lines = repo.files[path].count("\n")
        line = int(self.np_random.integers(1, lines + 1))
        old, new = (str(c) for c in self.np_random.choice(list("+-<>=01"), size=2, replace=False))
        options = ["ls", "ls -R", f"cat -n {path}", "python -m pytest", f"grep -n def {path}",
                   f"sed -i '{line}s/{old}/{new}/' {path}", SUBMIT]
        return options[int(self.np_random.integers(len(options)))]

    def expert_action(self) -> str:
        """The scripted expert: ``cat -n`` each file with a bug left, then fix the bug's line with ``sed`` (or, if the
        file was changed elsewhere, rewrite it whole), then ``python -m pytest``, then ``submit``."""
        if self.repository is None or self.workdir is None:
            raise RuntimeError("call reset() before expert_action()")
        for path, fixed in self.repository.fixed.items():
            current = _read_text(os.path.join(self.workdir, path))
            if current == fixed:
                continue
            if path not in self._read:
                return f"cat -n {path}"
            bugs = [b for b in self.repository.bugs if b.path == path]
            lines = (current or "").split("\n")
            expected = fixed.split("\n")
            intact = current is not None and len(lines) == len(expected) and all(
                a == b or any(bug.line == i + 1 and a == bug.buggy for bug in bugs)
                for i, (a, b) in enumerate(zip(lines, expected, strict=True)))
            if intact:
                pending = [b for b in bugs if lines[b.line - 1] != b.correct]
                return _sed_fix(pending[0])
            return f"cat > {path} <<'MINISWE_EOF'\n{fixed}MINISWE_EOF"
        if not self._last_action.startswith("python -m pytest"):
            return "python -m pytest"
        return SUBMIT

    # ------------------------------------------------------------------ vocabulary
    @classmethod
    def vocabulary(cls, **difficulty_kwargs: Any) -> list[str]:
        """Words a word-level tokenizer for this environment needs: commands, the repositories' names and the words
        of the task text (shell output has many more; unknown words map to ``<unk>``)."""
        words = {SUBMIT, "ls", "cat", "-n", "-r", "sed", "-i", "grep", "python", "-m", "pytest", "echo", "head",
                 "tail", "def", "return", "if", "else", "for", "in", "range", "len", "and", "or", "not", "assert",
                 "passed", "failed", "error", "exit", "code", "tests", "test", "py", "md", "ini", "readme",
                 "files", "failing", "true", "false", "none", "import", "from"}
        words.update(PACKAGE_NAMES)
        words.update(MODULE_NAMES)
        words.update(f"test_{m}" for m in MODULE_NAMES)
        for template in TEMPLATES:
            words.update(template.names)
        words.update(w.strip(".,:;()[]") for w in (cls.TASK_TEXT + " you are in a python repository the current "
                                                  "folder package its some fix bugs answer with one command turn "
                                                  "see output when done run hidden").split())
        return sorted(w for w in words if w)
