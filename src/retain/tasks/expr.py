"""Arithmetic expressions for the card/number puzzles: a safe parser, an exact solver, and the shared reward.

The grammar (never Python ``eval``; completions are hostile text)::

    expr   := term   (("+" | "-") term)*       left-associative: 8-3-2 = 3
    term   := factor (("*" | "/") factor)*     left-associative: 12/4/3 = 1
    factor := NUMBER | "(" expr ")"
    NUMBER := ASCII digits 0-9, at most 6 of them (leading zeros allowed: "07" is 7)

Conventions:
- Spaces and tabs between tokens are ignored. ``x`` and ``×`` are read as ``*`` and ``÷`` as ``/`` (a human's
  habits, harmless); canonical output (``solve``) uses ``*`` and ``/`` only, so it is plain ASCII.
- No unary minus: literals are non-negative, though intermediate values may go negative (``3-5+8``).
- Values are exact ``Fraction``s, so ``(1/3)*9`` is exactly 3 and ``8/(3-8/3)`` is exactly 24.
- Bounded work: more than ``MAX_CHARS`` characters, bracket depth over ``MAX_DEPTH`` or a literal with more than
  ``MAX_DIGITS`` digits is rejected before any arithmetic, so a value never exceeds ~64 decimal digits.
- Every illegal input (junk, unbalanced brackets, division by zero, an operator outside ``ops``, a non-string)
  raises ``ExprError``; nothing else escapes.

Shared by both puzzle tasks (gpoints, countdown), so neither repeats the other:
- ``score``, the reward: ``CORRECT`` 1.0 for exactly the given numbers (as a multiset) reaching the target,
  ``WRONG_VALUE`` 0.2 for exactly the given numbers but another value, ``WRONG_NUMBERS`` 0.1 for a legal expression
  over other numbers (whatever its value), ``ILLEGAL`` 0.0 for anything the grammar rejects.
- ``hash_partition``, the stable pretrain/train/test cut of a puzzle space;
- ``PuzzleTask``, the examples/reward skeleton; a task supplies its puzzles and reads its own prompts back.
"""

from __future__ import annotations

import hashlib
import random
from abc import abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property, lru_cache
from itertools import combinations
from typing import Any, Callable, Hashable, Sequence

from retain.errors import RetainError
from retain.tasks.base import Example, Task, clip_completion

MAX_CHARS = 64
MAX_DEPTH = 16
MAX_DIGITS = 6
ALL_OPS = "+-*/"

CORRECT = 1.0
WRONG_VALUE = 0.2
WRONG_NUMBERS = 0.1
ILLEGAL = 0.0
REWARDS = (ILLEGAL, WRONG_NUMBERS, WRONG_VALUE, CORRECT)

_DIGITS = "0123456789"  # str.isdigit() would also accept "²" and "٣"; the grammar is ASCII digits only
_ALIASES = {"x": "*", "×": "*", "÷": "/"}
_SPACE = " \t"


class ExprError(ValueError):
    """An input the grammar rejects; the message says why (for debugging, never shown as a reward)."""


# --------------------------------------------------------------------------------------------------- parsing


def _tokens(text: str, ops: str) -> list[int | str]:
    """Integers and the one-character symbols ``+ - * / ( )``; checks length, depth and literal size up front."""
    if not isinstance(text, str):
        raise ExprError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ExprError(f"longer than {MAX_CHARS} characters")
    out: list[int | str] = []
    depth = 0
    i = 0
    while i < len(text):
        ch = _ALIASES.get(text[i], text[i])
        if ch in _DIGITS:
            j = i
            while j < len(text) and text[j] in _DIGITS:
                j += 1
            if j - i > MAX_DIGITS:
                raise ExprError(f"a literal longer than {MAX_DIGITS} digits")
            out.append(int(text[i:j]))
            i = j
            continue
        if ch in ALL_OPS:
            if ch not in ops:
                raise ExprError(f"operator {ch!r} not allowed here (allowed: {ops})")
            out.append(ch)
        elif ch == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise ExprError(f"brackets nested deeper than {MAX_DEPTH}")
            out.append(ch)
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ExprError("unbalanced ')'")
            out.append(ch)
        elif ch not in _SPACE:
            raise ExprError(f"unexpected character {ch!r}")
        i += 1
    if depth:
        raise ExprError("unbalanced '('")
    if not out:
        raise ExprError("empty expression")
    return out


class _Parser:
    """Recursive descent over a token list; recursion depth is bounded by MAX_DEPTH (checked by ``_tokens``)."""

    def __init__(self, tokens: list[int | str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> int | str | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor()
            if op == "*":
                value = value * right
            elif right == 0:
                raise ExprError("division by zero")
            else:
                value = value / right
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if isinstance(token, int):
            self.numbers.append(token)
            return Fraction(token)
        if token == "(":
            value = self.expr()
            if self.take() != ")":
                raise ExprError("expected ')'")
            return value
        raise ExprError(f"expected a number or '(', got {token!r}")


def parse_with_numbers(text: str, ops: str = ALL_OPS) -> tuple[Fraction, list[int]]:
    """The exact value of ``text`` and its integer literals in reading order; ``ExprError`` if illegal."""
    parser = _Parser(_tokens(text, ops))
    value = parser.expr()
    if parser.pos != len(parser.tokens):
        raise ExprError(f"unexpected {parser.peek()!r} after a complete expression")
    return value, parser.numbers


def parse(text: str, ops: str = ALL_OPS) -> Fraction:
    """The exact value of ``text``; ``ExprError`` if illegal."""
    return parse_with_numbers(text, ops)[0]


# --------------------------------------------------------------------------------------------------- reward


def score(completion: str, numbers: Sequence[int], target: int | Fraction, ops: str = ALL_OPS) -> float:
    """1.0 / 0.2 / 0.1 / 0.0 as the module docstring says; ``numbers`` is compared as a multiset. Never raises."""
    try:
        value, used = parse_with_numbers(completion, ops)
    except ExprError:
        return ILLEGAL
    if sorted(used) != sorted(numbers):
        return WRONG_NUMBERS
    return CORRECT if value == target else WRONG_VALUE


# --------------------------------------------------------------------------------------------------- solving
#
# A multiset of numbers is a sorted tuple. Every binary tree over it comes from splitting it into two non-empty
# sub-multisets (both orders, for - and /) and combining a value of each. ``_values`` finds every reachable value
# (small sets: tens to a few hundred); ``_exprs`` then builds strings top-down only for the (multiset, value)
# pairs that lead to the target, so the work is proportional to the solutions, not to all trees.

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "": 3}  # "" marks a bare literal


def _check_ops(ops: str) -> str:
    if not ops or any(op not in ALL_OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {ALL_OPS!r}, got {ops!r}")
    return "".join(op for op in ALL_OPS if op in ops)  # one cache key per operator set


# Values are ints while they are whole and Fractions only when not: int arithmetic is ~10x faster, and an int and
# the equal Fraction hash and compare equal, so sets and lookups mix them freely.
Value = int | Fraction


def _whole(x: Value) -> Value:
    # ``type(...) is``, not ``isinstance``: Fraction's ABC metaclass makes isinstance slow, and values are never a
    # subclass of Fraction (they come from Fraction arithmetic)
    return x.numerator if type(x) is Fraction and x.denominator == 1 else x


def _div(a: Value, b: Value) -> Value:
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b
    return _whole(Fraction(a) / b)


def _apply(op: str, a: Value, b: Value) -> Value | None:
    if op == "+":
        return _whole(a + b)
    if op == "-":
        return _whole(a - b)
    if op == "*":
        return _whole(a * b)
    return _div(a, b) if b != 0 else None


@lru_cache(maxsize=None)
def _splits(ms: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Every ordered split of a multiset into two non-empty sub-multisets, without repeats."""
    out: dict[tuple[tuple[int, ...], tuple[int, ...]], None] = {}
    idx = range(len(ms))
    for size in range(1, len(ms)):
        for left in combinations(idx, size):
            a = tuple(ms[i] for i in left)
            b = tuple(ms[i] for i in idx if i not in left)
            out[(a, b)] = None
    return tuple(out)


@lru_cache(maxsize=1 << 14)
def _values(ms: tuple[int, ...], ops: str) -> frozenset[Value]:
    if len(ms) == 1:
        return frozenset(ms)
    if "/" not in ops:  # every value is an int: the same set by plain int arithmetic, without _apply per pair
        return frozenset(_int_values(ms, ops))
    found: set[Value] = set()
    for a_ms, b_ms in _splits(ms):
        b_vals = _values(b_ms, ops)
        for a in _values(a_ms, ops):
            for b in b_vals:
                for op in ops:
                    value = _apply(op, a, b)
                    if value is not None:
                        found.add(value)
    return frozenset(found)


def _int_values(ms: tuple[int, ...], ops: str) -> set[int]:
    """``_values`` without division (``ops`` a subset of ``+-*``), where every value is an int."""
    found: set[int] = set()
    for a_ms, b_ms in _splits(ms):
        a_vals, b_vals = _values(a_ms, ops), _values(b_ms, ops)
        if "+" in ops:
            found.update(a + b for a in a_vals for b in b_vals)
        if "-" in ops:
            found.update(a - b for a in a_vals for b in b_vals)
        if "*" in ops:
            found.update(a * b for a in a_vals for b in b_vals)
    return found


def _join(left: tuple[str, str], op: str, right: tuple[str, str]) -> tuple[str, str]:
    """``left op right`` with the fewest brackets that keep its value when parsed left-associatively.

    The left side needs brackets only if it binds looser than ``op``; the right side also when it binds equally
    and ``op`` is ``-`` or ``/`` (``a-(b-c)``). ``a+(b-c)`` prints as ``a+b-c``: another tree, the same value.
    """
    (ls, lop), (rs, rop) = left, right
    if _PREC[lop] < _PREC[op]:
        ls = f"({ls})"
    if _PREC[rop] < _PREC[op] or (_PREC[rop] == _PREC[op] and op in "-/"):
        rs = f"({rs})"
    return f"{ls}{op}{rs}", op


def _partners(op: str, a: Value, target: Value, b_vals: frozenset[Value]) -> list[Value]:
    """The values b in ``b_vals`` with ``a op b == target`` (solved for b rather than tried one by one)."""
    if op == "+":
        wanted = _whole(target - a)
    elif op == "-":
        wanted = _whole(a - target)
    elif op == "*":
        if a == 0:
            return list(b_vals) if target == 0 else []
        wanted = _div(target, a)
    else:  # a / b == target with b != 0
        if target == 0:
            return [b for b in b_vals if b != 0] if a == 0 else []
        wanted = _div(a, target)
        if wanted == 0:
            return []
    return [wanted] if wanted in b_vals else []


@lru_cache(maxsize=1 << 16)
def _exprs(ms: tuple[int, ...], target: Value, ops: str) -> frozenset[tuple[str, str]]:
    """Every canonical expression over exactly ``ms`` equal to ``target``, as (text, top-level operator)."""
    if len(ms) == 1:
        return frozenset({(str(ms[0]), "")}) if ms[0] == target else frozenset()
    found: set[tuple[str, str]] = set()
    for a_ms, b_ms in _splits(ms):
        b_vals = _values(b_ms, ops)
        for a in _values(a_ms, ops):
            for op in ops:
                for b in _partners(op, a, target, b_vals):
                    for left in _exprs(a_ms, a, ops):
                        for right in _exprs(b_ms, b, ops):
                            found.add(_join(left, op, right))
    return frozenset(found)


def reachable(numbers: Sequence[int], ops: str = ALL_OPS) -> frozenset[int | Fraction]:
    """Every value some expression using each number exactly once reaches (cheap: no strings are built).

    Whole values are ints, others Fractions; ``12 in reachable(...)`` and ``Fraction(1, 2) in ...`` both work.
    """
    return _values(_multiset(numbers), _check_ops(ops))


def reaches(numbers: Sequence[int], target: int | Fraction, ops: str = ALL_OPS) -> bool:
    """``target in reachable(numbers, ops)``, without enumerating every value of the whole set: for each split into
    two sides, each value of one side is paired with the one partner value the other side would need (``_partners``),
    so only the sub-multisets' value sets are built — ~10x less work for four numbers."""
    ms, ops = _multiset(numbers), _check_ops(ops)
    if len(ms) == 1:
        return ms[0] == target
    for a_ms, b_ms in _splits(ms):
        b_vals = _values(b_ms, ops)
        if any(_partners(op, a, target, b_vals) for a in _values(a_ms, ops) for op in ops):
            return True
    return False


def solve(numbers: Sequence[int], target: int | Fraction, ops: str = ALL_OPS, limit: int = 32) -> list[str]:
    """Distinct solutions using each number exactly once, shortest first then alphabetical, at most ``limit``.

    Exact rational arithmetic over every order, operator (from ``ops``) and bracketing. Commuted forms
    (``3+5`` and ``5+3``) count as distinct solutions: both are answers a model may write.
    """
    ms, ops = _multiset(numbers), _check_ops(ops)
    target = _whole(Fraction(target))
    if target not in _values(ms, ops):
        return []
    # one text can come from two trees (a+b-c is (a+b)-c and a+(b-c)): dedupe on the text
    texts = sorted({text for text, _ in _exprs(ms, target, ops)}, key=lambda s: (len(s), s))
    return texts[:limit]


def _multiset(numbers: Sequence[int]) -> tuple[int, ...]:
    ms = tuple(sorted(numbers))
    if not ms or any(not isinstance(n, int) or n < 0 for n in ms):
        raise ValueError(f"numbers must be a non-empty list of non-negative integers, got {numbers!r}")
    return ms


# --------------------------------------------------------------------------------------------------- splits

SHARES = (("pretrain", 0.3), ("train", 0.4), ("test", 0.3))


def hash_partition(
    keys: Sequence[Hashable],
    salt: str,
    shares: Sequence[tuple[str, float]] = SHARES,
    weight: Callable[[Any], float] | None = None,
) -> dict:
    """Assign each key a split name: keys ordered by a salted SHA-256 of ``repr(key)``, then cut by ``shares``.

    Stable on every machine and Python (no ``hash()``). The cut is exact rather than a binomial draw, which
    matters for spaces of a hundred-odd hands: walking the keys in hash order, a key joins the first split whose
    cumulative share of the total ``weight`` its own weight's midpoint has not passed (weight 1 per key unless
    given; gpoints weighs a value multiset by its number of card hands).
    """
    ordered = sorted(set(keys), key=lambda k: hashlib.sha256(f"{salt}|{k!r}".encode()).hexdigest())
    weights = [1.0 if weight is None else float(weight(k)) for k in ordered]
    total = sum(weights)
    out: dict = {}
    bounds = [sum(share for _, share in shares[: i + 1]) * total for i in range(len(shares))]
    running, part = 0.0, 0
    for key, w in zip(ordered, weights):
        while part < len(shares) - 1 and running + w / 2 > bounds[part]:
            part += 1
        out[key] = shares[part][0]
        running += w
    return out


# --------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Puzzle:
    """One prompt before its answers are enumerated: the numbers to use (a multiset) and the target."""

    prompt: str
    numbers: tuple[int, ...]
    target: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class PuzzleTask(Task):
    """Examples and reward for "reach ``target`` from ``numbers``" tasks.

    A subclass lists each split's puzzles (``build_pools``, finite and in a fixed order) and reads its own prompt
    back (``read_prompt``). ``examples`` shuffles a split with ``random.Random(seed)`` (the split's content never
    depends on the seed, only the order) and enumerates answers only for the examples returned. ``reward``
    re-derives numbers and target from the prompt and ignores ``answer``: every correct expression counts.
    """

    splits = ("pretrain", "train", "test", "ood")
    ops: str = ALL_OPS
    limit: int = 32  # answers kept per example

    @abstractmethod
    def build_pools(self) -> dict[str, list[Puzzle]]:
        """Every puzzle of every split, in a fixed order (called once per task object)."""

    @abstractmethod
    def read_prompt(self, prompt: str) -> tuple[tuple[int, ...], int] | None:
        """(numbers, target) from a prompt this task wrote; None if it is not one."""

    @cached_property
    def pools(self) -> dict[str, list[Puzzle]]:
        return self.build_pools()

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        if n is not None and n < 0:
            raise RetainError(f"task {self.name!r}: n must be >= 0, got {n}")
        pool = list(self.pools[split])
        random.Random(seed).shuffle(pool)
        return [self.example(p) for p in (pool if n is None else pool[:n])]

    def example(self, puzzle: Puzzle) -> Example:
        answers = solve(puzzle.numbers, puzzle.target, self.ops, self.limit)
        meta = {**puzzle.meta, "numbers": puzzle.numbers, "target": puzzle.target}
        return Example(prompt=puzzle.prompt, answer=answers[0], answers=tuple(answers), meta=meta)

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return ILLEGAL
        read = self.read_prompt(prompt)
        if read is None:
            return ILLEGAL
        numbers, target = read
        return score(clip_completion(completion), numbers, target, self.ops)
