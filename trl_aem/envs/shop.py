"""``Shop``: a small, offline, WebShop-like shopping text environment."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import TextEnv, split_words, words_of

__all__ = ["Shop", "ShopGoal", "Product", "CATEGORIES", "ATTRIBUTES", "OPTION_TYPES", "score_purchase"]

CATEGORIES: tuple[str, ...] = (
    "shirt", "pants", "shoes", "hat", "jacket", "dress", "socks", "bag", "scarf", "gloves",
)
ATTRIBUTES: tuple[str, ...] = (
    "cotton", "wool", "leather", "denim", "silk", "polyester", "waterproof", "lightweight",
    "organic", "vintage", "casual", "formal", "warm", "soft", "breathable", "stretch",
)
#: Option types in the order they are used (``num_options`` takes a prefix) with their values.
OPTION_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("color", ("red", "blue", "black", "white", "green", "gray", "brown", "pink")),
    ("size", ("xs", "s", "m", "l", "xl")),
    ("fit", ("regular", "slim", "loose")),
)
_OPTION_VALUES = dict(OPTION_TYPES)
#: Prices are integers in [1, MAX_PRICE]; budgets are multiples of 10 up to 90.
MAX_PRICE = 99
#: Score factor applied when the bought product is of the wrong category.
WRONG_CATEGORY_FACTOR = 0.1

# Observation templates (the vocabulary is derived from these).
_T_INSTRUCTION = "instruction : {goal} ."
_T_GOAL = "i need a {attrs} {category} , {opt} {val} , under {price} dollars"
_T_SEARCH_PAGE = "page : search ."
_T_RESULTS_PAGE = "page : results {i} of {n} ."
_T_NO_RESULTS = "no results ."
_T_RESULT = "item {id} : {title} , {price} dollars ."
_T_PRODUCT_PAGE = "page : item {id} ."
_T_TITLE = "title : {title} ."
_T_PRICE = "price : {price} dollars ."
_T_OPTION = "{opt} : {values} ."
_T_SELECTED = "selected : {opt} {val} , {opt} {val} ."
_T_SELECTED_NONE = "selected : none ."
_T_INVALID = "nothing happens ."
_T_BOUGHT = "you bought item {id} . score : {score} ."
_T_ACTIONS = "actions : search {q} , click item {id} , choose {opt} {val} , back , buy , next page , previous page"
_TEMPLATES = (
    _T_INSTRUCTION, _T_GOAL, _T_SEARCH_PAGE, _T_RESULTS_PAGE, _T_NO_RESULTS, _T_RESULT, _T_PRODUCT_PAGE,
    _T_TITLE, _T_PRICE, _T_OPTION, _T_SELECTED, _T_SELECTED_NONE, _T_INVALID, _T_BOUGHT, _T_ACTIONS,
)


@dataclass(frozen=True)
class ShopGoal:
    """What the shopper wants.

    Attributes:
        category: product type, e.g. ``"shirt"``.
        attributes: wanted attributes, e.g. ``("cotton", "soft")``.
        options: wanted option values, e.g. ``{"color": "red", "size": "m"}``.
        max_price: the product must cost strictly less than this (dollars).
    """

    category: str
    attributes: tuple[str, ...]
    options: dict[str, str]
    max_price: int

    @property
    def instruction(self) -> str:
        """The instruction sentence, e.g. ``i need a soft cotton shirt , color red , under 30 dollars``."""
        parts = [" ".join(["i need a", *self.attributes, self.category])]
        parts += [f"{k} {v}" for k, v in self.options.items()]
        parts.append(f"under {self.max_price} dollars")
        return " , ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, accepted back as ``options["goal"]``."""
        return {
            "category": self.category,
            "attributes": list(self.attributes),
            "options": dict(self.options),
            "max_price": self.max_price,
        }


@dataclass(frozen=True)
class Product:
    """A catalogue entry.

    Attributes:
        pid: item number (the product is addressed as ``item <pid>``).
        category: product type.
        attributes: the product's attributes (its title is ``<attributes> <category>``).
        options: option type -> offered values.
        price: integer price in dollars.
    """

    pid: int
    category: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    price: int = 10

    @property
    def title(self) -> str:
        """``<attributes> <category>``."""
        return " ".join([*self.attributes, self.category])

    def words(self) -> set[str]:
        """Words a search query can match: category, attributes and offered option values."""
        out = {self.category, *self.attributes}
        for values in self.options.values():
            out.update(values)
        return out


def score_purchase(goal: ShopGoal, product: Product, chosen: dict[str, str]) -> float:
    """WebShop-style purchase score in ``[0, 1]`` (the env's reward is ``10 *`` this).

    ``score = type_factor * (attr_hits + option_hits + price_ok) / (n_attributes + n_options + 1)``

    where ``attr_hits`` counts the goal attributes the product has, ``option_hits`` the goal options
    whose chosen value (via ``choose``) equals the wanted one, ``price_ok`` is 1 when
    ``product.price < goal.max_price``, and ``type_factor`` is 1 for the right category and
    :data:`WRONG_CATEGORY_FACTOR` (0.1) otherwise. The score is exactly 1.0 iff everything matches.

    Args:
        goal: the shopper's goal.
        product: the bought product.
        chosen: option type -> value selected on the product page.
    """
    attr_hits = len(set(goal.attributes) & set(product.attributes))
    option_hits = sum(1 for k, v in goal.options.items() if chosen.get(k) == v)
    price_ok = 1 if product.price < goal.max_price else 0
    type_factor = 1.0 if product.category == goal.category else WRONG_CATEGORY_FACTOR
    hits = attr_hits + option_hits + price_ok
    total = len(goal.attributes) + len(goal.options) + 1
    if hits == total and type_factor == 1.0:
        return 1.0
    return type_factor * hits / total


def _format_score(score: float) -> str:
    # "0 . 75" style would break the one-token-per-number rule; report percent as an integer
    return str(int(round(score * 100)))


class Shop(TextEnv):
    """WebShop-like shopping: search a generated catalogue, open a product, choose its options and
    buy it.

    **Task.** An instruction such as ``i need a soft cotton shirt , color red , size m , under 30
    dollars``. The catalogue (``catalogue_size`` products, a guaranteed matching one plus near
    misses and random products) and the goal are drawn from ``seed``; ``options["goal"]`` may fix
    the goal as an instruction string or a dict ``{"category", "attributes", "options",
    "max_price"}`` (the catalogue is then built around it). Other ``options`` keys are ignored.

    **Pages and actions.** Products are addressed as ``item <n>`` (two word tokens).

    * search page: ``search <words>`` (any words; results rank products by how many distinct query
      words match their category, attributes and option values, ties by item number);
    * results page: ``click item <n>`` (for a listed item; ``click <n>`` is accepted too),
      ``next page``, ``previous page``,
      ``back`` (to the search page);
    * product page: ``choose <option> <value>`` (e.g. ``choose size m``), ``buy``, ``back``.

    Every observation starts with the instruction and, except the final one after ``buy``, ends
    with ``actions : ...``; on the search page it lists ``search <category>`` for each category
    (any query is accepted).

    **Reward.** On ``buy`` (terminates): ``10 * score`` with the WebShop-style score of
    :func:`score_purchase`; ``info["success"]`` iff the score is perfect (reward exactly 10.0).
    Invalid actions (unparsable, not available on the page) give ``-invalid_action_penalty``
    (default ``-0.1``); all other steps 0.

    Args:
        catalogue_size: number of products (1 .. 99).
        num_attributes: attributes per product and in the goal (1 .. 4).
        num_options: option types in the goal (0 .. 3: color, size, fit).
        values_per_option: values offered per option type (1 .. 3).
        results_per_page: results shown per page.
        near_miss_fraction: fraction of the other products built as near misses of the target.
        invalid_action_penalty: penalty for an invalid action (>= 0).
        max_steps: safety cap on the episode length (truncation).
        list_actions: end observations with the admissible actions (default True).
    """

    TASK_KEY: ClassVar[str] = "goal"
    SUCCESS_REWARD: ClassVar[float] = 10.0
    EASIEST: ClassVar[dict[str, Any]] = {
        "catalogue_size": 3,
        "num_attributes": 1,
        "num_options": 0,
        "results_per_page": 3,
        "near_miss_fraction": 0.0,
    }

    def __init__(
        self,
        catalogue_size: int = 40,
        num_attributes: int = 2,
        num_options: int = 2,
        values_per_option: int = 3,
        results_per_page: int = 5,
        near_miss_fraction: float = 0.5,
        invalid_action_penalty: float = 0.1,
        max_steps: int = 50,
        list_actions: bool = True,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(invalid_action_penalty, max_steps, list_actions, render_mode)
        if not 1 <= catalogue_size <= 99:
            raise ValueError("catalogue_size must be in [1, 99]")
        if not 1 <= num_attributes <= 4:
            raise ValueError("num_attributes must be in [1, 4]")
        if not 0 <= num_options <= len(OPTION_TYPES):
            raise ValueError(f"num_options must be in [0, {len(OPTION_TYPES)}]")
        if not 1 <= values_per_option <= 3:
            raise ValueError("values_per_option must be in [1, 3]")
        if not 1 <= results_per_page <= 20:
            raise ValueError("results_per_page must be in [1, 20]")
        if not 0.0 <= near_miss_fraction <= 1.0:
            raise ValueError("near_miss_fraction must be in [0, 1]")
        self.catalogue_size = int(catalogue_size)
        self.num_attributes = int(num_attributes)
        self.num_options = int(num_options)
        self.values_per_option = int(values_per_option)
        self.results_per_page = int(results_per_page)
        self.near_miss_fraction = float(near_miss_fraction)
        self._goal = ShopGoal("shirt", ("cotton",), {}, 10)
        self._products: dict[int, Product] = {}
        self._page = "search"
        self._results: list[int] = []
        self._result_page = 0
        self._item: int | None = None
        self._chosen: dict[str, str] = {}
        self._score: float | None = None

    # ------------------------------------------------------------------ task generation
    @staticmethod
    def parse_goal(goal: str | dict[str, Any]) -> ShopGoal:
        """Parse an explicit goal (instruction string or dict) into a :class:`ShopGoal`.

        Raises:
            ValueError: unknown words, malformed instruction or an impossible budget.
        """
        if isinstance(goal, ShopGoal):
            g = goal
        elif isinstance(goal, dict):
            g = ShopGoal(
                category=str(goal["category"]),
                attributes=tuple(str(a) for a in goal.get("attributes", ())),
                options={str(k): str(v) for k, v in dict(goal.get("options", {})).items()},
                max_price=int(goal["max_price"]),
            )
        elif isinstance(goal, str):
            words = split_words(goal.lower())
            if words and words[-1] == ".":
                words = words[:-1]
            chunks: list[list[str]] = [[]]
            for w in words:
                if w == ",":
                    chunks.append([])
                else:
                    chunks[-1].append(w)
            head, *middle, tail = chunks if len(chunks) >= 2 else (chunks + [[]])
            if head[:3] != ["i", "need", "a"] or len(head) < 5:
                raise ValueError(f"cannot parse instruction {goal!r}")
            if len(tail) != 3 or tail[0] != "under" or tail[2] != "dollars" or not tail[1].isdigit():
                raise ValueError(f"cannot parse instruction {goal!r}")
            options: dict[str, str] = {}
            for chunk in middle:
                if len(chunk) != 2:
                    raise ValueError(f"cannot parse option {' '.join(chunk)!r}")
                options[chunk[0]] = chunk[1]
            g = ShopGoal(head[-1], tuple(head[3:-1]), options, int(tail[1]))
        else:
            raise ValueError(f"goal must be a str or dict, got {type(goal).__name__}")
        if g.category not in CATEGORIES:
            raise ValueError(f"unknown category {g.category!r}")
        attrs = g.attributes
        if not attrs or any(a not in ATTRIBUTES for a in attrs) or len(set(attrs)) != len(attrs):
            raise ValueError(f"bad attributes {g.attributes!r}")
        for k, v in g.options.items():
            if k not in _OPTION_VALUES or v not in _OPTION_VALUES[k]:
                raise ValueError(f"bad option {k} {v}")
        if not 2 <= g.max_price <= MAX_PRICE + 1:
            raise ValueError(f"max_price must be in [2, {MAX_PRICE + 1}]")
        return g

    def _choice(self, seq: tuple[Any, ...] | list[Any]) -> Any:
        return seq[int(self.np_random.integers(len(seq)))]

    def _sample(self, seq: tuple[Any, ...] | list[Any], k: int) -> list[Any]:
        return [seq[int(i)] for i in self.np_random.permutation(len(seq))[:k]]

    def _random_options(
        self, must: dict[str, str] | None = None, types: list[str] | None = None
    ) -> dict[str, tuple[str, ...]]:
        must = must or {}
        names = types if types is not None else [name for name, _ in OPTION_TYPES[: self.num_options]]
        out: dict[str, tuple[str, ...]] = {}
        for name in names:
            values = _OPTION_VALUES[name]
            chosen = self._sample([v for v in values if v != must.get(name)], self.values_per_option - (name in must))
            if name in must:
                chosen.append(must[name])
            out[name] = tuple(v for v in values if v in chosen)  # canonical value order
        return out

    def _setup_task(self, options: dict[str, Any]) -> None:
        explicit = options.get(self.TASK_KEY)
        if explicit is not None:
            goal = self.parse_goal(explicit)
            n_attr = len(goal.attributes)
            price = int(self.np_random.integers(max(1, goal.max_price - 30), goal.max_price))
        else:
            n_attr = self.num_attributes
            category = self._choice(CATEGORIES)
            attrs = tuple(self._sample(ATTRIBUTES, n_attr))
            wanted = {name: self._choice(values) for name, values in OPTION_TYPES[: self.num_options]}
            price = int(self.np_random.integers(5, 90))
            budget = (price // 10 + 1) * 10
            goal = ShopGoal(category, attrs, wanted, budget)
        option_types = list(goal.options) if explicit is not None else [n for n, _ in OPTION_TYPES[: self.num_options]]
        target = Product(0, goal.category, tuple(self._sample(list(goal.attributes), n_attr)),
                         self._random_options(goal.options, option_types), price)
        products = [target]
        for _ in range(self.catalogue_size - 1):
            if float(self.np_random.random()) < self.near_miss_fraction:
                products.append(self._near_miss(goal, target, option_types))
            else:
                products.append(self._random_product(n_attr, option_types))
        order = self.np_random.permutation(len(products))
        self._products = {}
        for pid, idx in enumerate(order, start=1):
            p = products[int(idx)]
            self._products[pid] = Product(pid, p.category, p.attributes, p.options, p.price)
        self._goal = goal
        self._page = "search"
        self._results = []
        self._result_page = 0
        self._item = None
        self._chosen = {}
        self._score = None

    def _random_product(self, n_attr: int, option_types: list[str]) -> Product:
        return Product(
            0,
            self._choice(CATEGORIES),
            tuple(self._sample(ATTRIBUTES, n_attr)),
            self._random_options(None, option_types),
            int(self.np_random.integers(5, MAX_PRICE + 1)),
        )

    def _near_miss(self, goal: ShopGoal, target: Product, option_types: list[str]) -> Product:
        """Same category as the target but failing at least one requirement."""
        kinds = ["attribute"]
        if goal.max_price <= MAX_PRICE:
            kinds.append("price")
        if goal.options:
            kinds.append("option")
        kind = self._choice(kinds)
        attrs = list(target.attributes)
        price = int(self.np_random.integers(max(1, goal.max_price - 30), goal.max_price))
        must: dict[str, str] = dict(goal.options)
        if kind == "attribute":
            i = int(self.np_random.integers(len(attrs)))
            attrs[i] = self._choice([a for a in ATTRIBUTES if a not in attrs])
        elif kind == "price":
            price = int(self.np_random.integers(goal.max_price, MAX_PRICE + 1))
        else:
            missing = self._choice(list(goal.options))
            del must[missing]
        opts = self._random_options(must, option_types)
        if kind == "option":
            # make sure the wanted value is really absent
            values = [v for v in _OPTION_VALUES[missing] if v != goal.options[missing]]
            keep = [v for v in opts[missing] if v != goal.options[missing]]
            while len(keep) < min(self.values_per_option, len(values)):
                keep.append(self._choice([v for v in values if v not in keep]))
            opts[missing] = tuple(v for v in _OPTION_VALUES[missing] if v in keep)
        self._shuffle(attrs)
        return Product(0, target.category, tuple(attrs), opts, price)

    def _shuffle(self, seq: list[Any]) -> None:
        perm = self.np_random.permutation(len(seq))
        seq[:] = [seq[int(i)] for i in perm]

    # ------------------------------------------------------------------ properties
    @property
    def task_text(self) -> str:
        """The instruction sentence."""
        return self._goal.instruction

    @property
    def goal(self) -> ShopGoal:
        """The current goal."""
        return self._goal

    @property
    def products(self) -> list[Product]:
        """The catalogue, by item number."""
        return [self._products[k] for k in sorted(self._products)]

    # ------------------------------------------------------------------ search
    def search(self, query: str) -> list[int]:
        """Item numbers matching ``query`` (at least one word), best first (ties by item number)."""
        words = set(query.split())
        scored = [(len(words & p.words()), pid) for pid, p in self._products.items()]
        return [pid for s, pid in sorted(scored, key=lambda t: (-t[0], t[1])) if s > 0]

    def _num_result_pages(self) -> int:
        return max(1, math.ceil(len(self._results) / self.results_per_page))

    def _page_items(self) -> list[int]:
        start = self._result_page * self.results_per_page
        return self._results[start : start + self.results_per_page]

    # ------------------------------------------------------------------ rendering
    def _render(self) -> str:
        lines = [_T_INSTRUCTION.format(goal=self._goal.instruction)]
        if self._page == "search":
            lines.append(_T_SEARCH_PAGE)
        elif self._page == "results":
            lines.append(_T_RESULTS_PAGE.format(i=self._result_page + 1, n=self._num_result_pages()))
            items = self._page_items()
            if not items:
                lines.append(_T_NO_RESULTS)
            for pid in items:
                p = self._products[pid]
                lines.append(_T_RESULT.format(id=pid, title=p.title, price=p.price))
        else:
            assert self._item is not None
            p = self._products[self._item]
            lines.append(_T_PRODUCT_PAGE.format(id=p.pid))
            lines.append(_T_TITLE.format(title=p.title))
            lines.append(_T_PRICE.format(price=p.price))
            for name, values in p.options.items():
                lines.append(_T_OPTION.format(opt=name, values=" , ".join(values)))
            if not p.options:
                pass  # nothing to choose
            elif self._chosen:
                sel = " , ".join(f"{k} {v}" for k, v in self._chosen.items())
                lines.append(f"selected : {sel} .")
            else:
                lines.append(_T_SELECTED_NONE)
        return "\n".join(lines)

    def _initial_observation(self) -> str:
        return self._render()

    def admissible_actions(self) -> list[str]:
        """Executable actions on the current page (on the search page: ``search <category>`` for
        every category; any other query is valid too)."""
        if self._score is not None:
            return []
        if self._page == "search":
            return [f"search {c}" for c in sorted(CATEGORIES)]
        if self._page == "results":
            acts = ["back"] + [f"click item {pid}" for pid in self._page_items()]
            if self._result_page + 1 < self._num_result_pages():
                acts.append("next page")
            if self._result_page > 0:
                acts.append("previous page")
            return acts
        assert self._item is not None
        p = self._products[self._item]
        acts = ["back", "buy"]
        for name, values in p.options.items():
            acts += [f"choose {name} {v}" for v in values]
        return acts

    # ------------------------------------------------------------------ dynamics
    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        words = action.split()
        invalid = (f"{_T_INVALID}\n{self._render()}", 0.0, False, True)
        if not words:
            return invalid
        if self._page == "search":
            if words[0] != "search" or len(words) < 2:
                return invalid
            self._results = self.search(" ".join(words[1:]))
            self._result_page = 0
            self._page = "results"
            return self._render(), 0.0, False, False
        if action == "back":
            if self._page == "results":
                self._page = "search"
            else:
                self._page = "results"
                self._item = None
                self._chosen = {}
            return self._render(), 0.0, False, False
        if self._page == "results" and words[0] == "click":
            # lenient item addressing: "click item 3", "click item3", "click 3"
            rest = "".join(words[1:])
            rest = rest[len("item") :] if rest.startswith("item") else rest
            if rest.isdigit():
                action = f"click item {int(rest)}"
                words = action.split()
        if action not in self.admissible_actions():
            return invalid
        if self._page == "results":
            if action == "next page":
                self._result_page += 1
            elif action == "previous page":
                self._result_page -= 1
            else:
                self._item = int(words[2])
                self._chosen = {}
                self._page = "product"
            return self._render(), 0.0, False, False
        # product page
        assert self._item is not None
        if action == "buy":
            product = self._products[self._item]
            score = score_purchase(self._goal, product, self._chosen)
            self._score = score
            self._success = score == 1.0
            text = self._render() + "\n" + _T_BOUGHT.format(id=product.pid, score=_format_score(score))
            return text, self.SUCCESS_REWARD * score, True, False
        _, name, value = words
        self._chosen[name] = value
        # keep the display order of the product's options
        p = self._products[self._item]
        self._chosen = {k: self._chosen[k] for k in p.options if k in self._chosen}
        return self._render(), 0.0, False, False

    def _step_info(self) -> dict[str, Any]:
        return {"score": self._score} if self._score is not None else {}

    # ------------------------------------------------------------------ expert
    def _achievable(self, p: Product) -> float:
        best = {k: v for k, v in self._goal.options.items() if v in p.options.get(k, ())}
        return score_purchase(self._goal, p, best)

    def expert_query(self) -> str:
        """The expert's search query: goal attributes, category and wanted option values."""
        return " ".join([*self._goal.attributes, self._goal.category, *self._goal.options.values()])

    def expert_action(self) -> str:
        """Privileged scripted expert: search with the instruction's key words, page to the best
        achievable product among the results, open it, choose the wanted options and buy."""
        if self._page == "search":
            return f"search {self.expert_query()}"
        if self._page == "results":
            if not self._results:
                return "back"
            ranked = list(enumerate(self._results))
            best = max(ranked, key=lambda t: (self._achievable(self._products[t[1]]), -t[0]))[1]
            best_score = self._achievable(self._products[best])
            overall = max(self._achievable(p) for p in self._products.values())
            if best_score < overall:  # a better product exists but this query did not find it
                return "back"
            page = self._results.index(best) // self.results_per_page
            if page > self._result_page:
                return "next page"
            if page < self._result_page:
                return "previous page"
            return f"click item {best}"
        assert self._item is not None
        p = self._products[self._item]
        overall = max(self._achievable(q) for q in self._products.values())
        if self._achievable(p) < overall:
            return "back"
        for name, value in self._goal.options.items():
            if value in p.options.get(name, ()) and self._chosen.get(name) != value:
                return f"choose {name} {value}"
        return "buy"

    # ------------------------------------------------------------------ vocabulary
    @classmethod
    def vocabulary(cls, **difficulty_kwargs: Any) -> list[str]:
        """All words of observations and valid actions: template words, catalogue words and the
        numbers ``0 .. max(100, catalogue_size)`` (prices, budgets, item and page numbers, score)."""
        words = words_of(*_TEMPLATES)
        words.update(CATEGORIES)
        words.update(ATTRIBUTES)
        for name, values in OPTION_TYPES:
            words.add(name)
            words.update(values)
        top = max(100, int(difficulty_kwargs.get("catalogue_size", 0)))
        words.update(str(i) for i in range(0, top + 1))
        return sorted(words)
