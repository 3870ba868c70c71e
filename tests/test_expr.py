"""The puzzle grammar, solver, shared reward and split cut (retain.tasks.expr), with hand-worked numbers."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retain.tasks.expr import (
    CORRECT,
    ILLEGAL,
    MAX_CHARS,
    REWARDS,
    WRONG_NUMBERS,
    WRONG_VALUE,
    ExprError,
    hash_partition,
    parse,
    parse_with_numbers,
    reachable,
    reaches,
    score,
    solve,
)

HOSTILE = [
    "__import__('os').system('x')",
    "lambda: 1",
    "(lambda x: x)(3)",
    "exec('1')",
    "eval('2+2')",
    "open('/etc/passwd').read()",
    "2**3",
    "2**999999",
    "9" * 500,
    "(" * 1000,
    "(" * 1000 + "1" + ")" * 1000,
    ")" * 1000,
    "1/0",
    "1/(3-3)",
    "0/0",
    "1e9",
    "1.5",
    "0x10",
    "-3",
    "+3",
    "3 4",
    "()",
    "",
    " ",
    "\x00",
    "٣+1",  # an Arabic-Indic digit: str.isdigit() says yes, the grammar says no
    "2²",
    "１+２",  # fullwidth digits
    "3−4",  # unicode minus
    "\u202e1+2",
    "1+2\n3",
]


# --------------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8-3-2", 3),  # left-associative: (8-3)-2, not 8-(3-2) = 7
        ("12/4/3", 1),  # (12/4)/3, not 12/(4/3) = 9
        ("2+3*4", 14),  # * binds tighter than +
        ("(2+3)*4", 20),
        ("2*3-4/8", Fraction(11, 2)),  # 6 - 1/2
        ("(1/3)*9", 3),  # exact: no float rounding
        ("1/3*9", 3),
        ("8/(3-8/3)", 24),  # 3 - 8/3 = 1/3, 8 / (1/3) = 24
        ("10-7*8", -46),  # negative results are legal, negative literals are not
        (" 2 +\t3 ", 5),
        ("3x4", 12),
        ("3×4", 12),
        ("8÷2", 4),
        ("0x10", 0),  # x is multiply, so this is 0 times 10, not hex
        ("007", 7),
        ("0", 0),
        ("999999", 999999),
        ("(((((((((((((((( 1 ))))))))))))))))", 1),  # depth 16 is the limit, still allowed
    ],
)
def test_parse_values(text: str, value: Fraction) -> None:
    result = parse(text)
    assert isinstance(result, Fraction)
    assert result == value


def test_parse_with_numbers_lists_literals_in_reading_order() -> None:
    assert parse_with_numbers("(10-7)*8") == (24, [10, 7, 8])
    assert parse_with_numbers("8*(10-7)") == (24, [8, 10, 7])
    assert parse_with_numbers("((5))") == (5, [5])


@pytest.mark.parametrize(
    "text",
    [
        "1/0",
        "1/(3-3)",
        "5/(2*2-4)",
        "1" + "+1" * 32,  # 65 characters
        "(" * 17 + "1" + ")" * 17,  # depth 17
        "1234567",  # 7 digits
        "",
        "   ",
        "2+",
        "+2",
        "-3",
        "2 3",
        "()",
        "(2",
        "2)",
        ")(",
        "2**3",
        "abc",
        "٣",
        "2²",
        "1.5",
        "1e3",
        "3−4",
        "24=24",
        "(10-7)*8 = 24",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ExprError):
        parse(text)


def test_parse_limits_are_exact() -> None:
    assert MAX_CHARS == 64
    assert parse("10" + "+1" * 31) == 41  # exactly 64 characters
    with pytest.raises(ExprError):
        parse("10" + "+1" * 31 + " ")  # 65, even if the extra is a space


def test_parse_rejects_non_strings_and_disallowed_ops() -> None:
    for bad in (None, 12, b"1+2", ["1"]):
        with pytest.raises(ExprError):
            parse(bad)  # type: ignore[arg-type]
    with pytest.raises(ExprError):
        parse("8/2", ops="+-*")
    assert parse("8*2", ops="+-*") == 16
    assert issubclass(ExprError, ValueError)


@settings(max_examples=10_000, deadline=None)
@given(st.one_of(st.text(), st.sampled_from(HOSTILE), st.text(alphabet="0123456789+-*/() x×÷")))
def test_parse_never_raises_anything_but_expr_error(text: str) -> None:
    try:
        value, numbers = parse_with_numbers(text)
    except ExprError:
        return
    assert isinstance(value, Fraction)
    assert all(isinstance(n, int) and 0 <= n < 10**6 for n in numbers)


# A reference: random trees rendered with every bracket, valued by Fraction arithmetic directly.
_leaf = st.integers(0, 99).map(lambda n: (str(n), Fraction(n)))


def _node(children: st.SearchStrategy) -> st.SearchStrategy:
    def build(args: tuple) -> tuple[str, Fraction | None]:
        (ls, lv), op, (rs, rv) = args
        if lv is None or rv is None or (op == "/" and rv == 0):
            return f"({ls}{op}{rs})", None
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
        return f"({ls}{op}{rs})", value

    return st.tuples(children, st.sampled_from("+-*/"), children).map(build)


@settings(max_examples=500, deadline=None)
@given(st.recursive(_leaf, _node, max_leaves=6))
def test_parse_matches_reference_on_bracketed_trees(tree: tuple[str, Fraction | None]) -> None:
    text, value = tree
    if len(text) > MAX_CHARS:
        with pytest.raises(ExprError):
            parse(text)
    elif value is None:
        with pytest.raises(ExprError):
            parse(text)
    else:
        assert parse(text) == value


# --------------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3*5+8", CORRECT),
        ("8+5*3", CORRECT),
        ("(3*5)+8", CORRECT),  # redundant brackets are fine
        ("3+5+8", WRONG_VALUE),  # 16: the right numbers, the wrong value
        ("3*5+9", WRONG_NUMBERS),  # 24: a 9 where the 8 should be
        ("23", WRONG_NUMBERS),  # the right value without the numbers
        ("3*5+8+0", WRONG_NUMBERS),  # an extra number
        ("3*5", WRONG_NUMBERS),  # a missing number
        ("3*5+8=23", ILLEGAL),
        ("3*5+8/0", ILLEGAL),
        ("three times five", ILLEGAL),
        ("", ILLEGAL),
    ],
)
def test_score(completion: str, expected: float) -> None:
    assert score(completion, (3, 5, 8), 23) == expected


def test_score_compares_numbers_as_a_multiset() -> None:
    assert score("2*6", [6, 2], 12) == CORRECT
    assert score("2*6*1", [6, 2], 12) == WRONG_NUMBERS
    assert score("3+3", [3, 3], 6) == CORRECT
    assert score("3*2", [3, 3], 6) == WRONG_NUMBERS
    assert score("6/2", [6, 2], 3, ops="+-*") == ILLEGAL
    assert REWARDS == (0.0, 0.1, 0.2, 1.0)


# --------------------------------------------------------------------------------------------------- solver


def test_solve_finds_known_solutions() -> None:
    found = solve([10, 7, 8], 24)
    assert "(10-7)*8" in found and "8*(10-7)" in found
    assert solve([3, 3, 8, 8], 24) == ["8/(3-8/3)"]  # the classic: needs a fraction on the way
    # 23 from 3 5 8 with + - *: only 3*5+8, in its four commuted spellings, shortest first then alphabetical
    assert solve([3, 5, 8], 23, "+-*") == ["3*5+8", "5*3+8", "8+3*5", "8+5*3"]


def test_solve_finds_nothing_for_unsolvable_sets() -> None:
    assert solve([1, 1, 1], 24) == []  # at most 3
    assert solve([3, 5, 8], 31, "+-*") == []
    assert solve([0, 0], 0, "/") == []  # 0/0 is not a value


def test_solve_brackets_minimally_and_safely() -> None:
    # a-(b-c) keeps its brackets; a+(b-c) prints as a+b-c (same value); a*(b+c) keeps them
    assert "9-(5-2)" in solve([9, 5, 2], 6, "-")
    assert "9+5-2" in solve([9, 5, 2], 12, "+-") and "9+(5-2)" not in solve([9, 5, 2], 12, "+-")
    assert "5-(2-9)" in solve([9, 5, 2], 12, "+-")  # here the brackets matter: 5-2-9 is -6
    assert "2*(5+9)" in solve([9, 5, 2], 28, "+*")
    assert "12/(6/3)" in solve([12, 6, 3], 6, "/")


def test_solve_handles_zero() -> None:
    found = solve([0, 5, 5], 0)
    assert "0*5*5" in found and "5-5+0" in found
    assert all(parse(text) == 0 for text in found)


def test_solve_limit_order_and_uniqueness() -> None:
    full = solve([1, 2, 3, 4], 10, limit=10_000)
    assert len(full) == len(set(full)) > 32
    assert full == sorted(full, key=lambda s: (len(s), s))
    assert solve([1, 2, 3, 4], 10) == full[:32]
    assert solve([1, 2, 3, 4], 10, limit=2) == full[:2]


def test_reachable() -> None:
    # 1+2, 1-2, 2-1, 1*2, 1/2, 2/1
    assert reachable([1, 2]) == {3, -1, 1, 2, Fraction(1, 2)}
    assert reachable([1, 2], "+") == {3}
    assert 24 in reachable([3, 3, 8, 8]) and 24 not in reachable([3, 3, 8, 8], "+-*")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 13), min_size=1, max_size=4),
    st.sampled_from(["+-*/", "+-*", "+", "*/", "-"]),
    st.integers(-30, 60) | st.fractions(min_value=-5, max_value=5, max_denominator=6),
)
def test_reaches_is_membership_in_reachable(numbers, ops, target) -> None:
    assert reaches(numbers, target, ops) == (target in reachable(numbers, ops))


def test_reaches_by_hand() -> None:
    assert reaches([3, 3, 8, 8], 24) and not reaches([3, 3, 8, 8], 24, "+-*")  # 8/(3-8/3)
    assert reaches([5], 5) and not reaches([5], 4)
    assert reaches([0, 7], 0, "*") and not reaches([0, 7], 1, "/")


def test_solve_rejects_bad_arguments() -> None:
    for numbers in ([], [-1, 2], [1.5, 2]):
        with pytest.raises(ValueError):
            solve(numbers, 3)  # type: ignore[arg-type]
    for ops in ("", "^", "+%"):
        with pytest.raises(ValueError):
            solve([1, 2], 3, ops)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 13), min_size=1, max_size=4), st.data())
def test_every_solution_parses_back_to_the_target(numbers: list[int], data: st.DataObject) -> None:
    ops = data.draw(st.sampled_from(["+-*/", "+-*", "+*", "-/"]))
    target = data.draw(st.sampled_from(sorted(reachable(numbers, ops))))
    found = solve(numbers, target, ops, limit=10_000)
    assert found
    for text in found:
        value, used = parse_with_numbers(text, ops)
        assert value == target and sorted(used) == sorted(numbers)


# --------------------------------------------------------------------------------------------------- splits


def test_hash_partition_is_exact_and_stable() -> None:
    keys = list(range(100))
    first = hash_partition(keys, salt="s")
    assert first == hash_partition(list(reversed(keys)), salt="s")  # order of the input does not matter
    counts = {name: sum(1 for v in first.values() if v == name) for name in ("pretrain", "train", "test")}
    assert counts == {"pretrain": 30, "train": 40, "test": 30}
    assert first != hash_partition(keys, salt="other")


def test_hash_partition_weights() -> None:
    # 100 keys weighing 1..5 (total 300): each split's mass lands within one key's weight of its share
    weights = {k: float(1 + k % 5) for k in range(100)}
    parts = hash_partition(list(weights), salt="w", weight=weights.__getitem__)
    assert set(parts) == set(weights)
    for name, share in (("pretrain", 0.3), ("train", 0.4), ("test", 0.3)):
        mass = sum(weights[k] for k, v in parts.items() if v == name)
        assert abs(mass - share * 300) <= 5
    # equal weights cut exactly like no weights
    assert hash_partition(list(weights), salt="w", weight=lambda k: 2.0) == hash_partition(list(weights), salt="w")
