"""The puzzle and reverse pools, built faster, are item for item the pools built before.

GeneralPoints finds each hand's targets in one set of reachable values (cached per value multiset) instead of one
solver search per target; Countdown's values without division are plain int arithmetic; reverse draws its strings
once per task object. The digests below were computed by the code before these changes (sha256 of the JSON of every
split's puzzles, in order, with their numbers, target and meta; of examples with every answer): a pool that differs
in any item or in order fails here. The slow paths are also checked against the fast ones directly.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from itertools import combinations, combinations_with_replacement

import pytest

from retain.tasks.countdown import CountdownTask
from retain.tasks.expr import reachable, reaches
from retain.tasks.gpoints import FACES, RANKS, RULES, GeneralPointsTask, values
from retain.tasks.prior import LETTERS, ReverseTask


def digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


POOLS = {  # split -> (puzzles, digest of [prompt, numbers, target, meta] in pool order)
    GeneralPointsTask: {"pretrain": (698, "1f971e7681ddf2c8"), "train": (652, "ae2dc9ac961caf28"),
                        "test": (492, "1fee430f7f962f91"), "ood": (616, "c9dbf5d5876e9065")},
    CountdownTask: {"pretrain": (399, "6358a10f3a893b08"), "train": (525, "208a1b84de06b5b0"),
                    "test": (395, "e804ed8d4462ada6"), "ood": (17122, "0429abbf8e366cbf")},
}
EXAMPLES = {  # (split, n, seed) -> digest of [prompt, answers] in example order
    GeneralPointsTask: {("test", 64, 0): "88f690d2250b75ff", ("ood", 64, 0): "53b99ef14f060b55",
                        ("train", None, 0): "10487886c6195c5c"},
    CountdownTask: {("test", 64, 0): "219dd3aedde90854", ("ood", 64, 0): "202989bbc796ba97",
                    ("train", None, 0): "6cff72d22e175565"},
}
REVERSE = {("test", 64, 0): "e8e69eec645fb786", ("test", 50, 3): "34c7be7b68203227",
           ("test", None, 0): "1cb44081bc4d9bb3", ("train", None, 0): "4fde9aa1ca6fb3cc"}


@pytest.mark.parametrize("task_class", [GeneralPointsTask, CountdownTask])
def test_puzzle_pools_are_the_pools_before(task_class):
    pools = task_class().pools
    for split, (size, pinned) in POOLS[task_class].items():
        rows = [[p.prompt, list(p.numbers), p.target, p.meta] for p in pools[split]]
        assert (len(rows), digest(rows)) == (size, pinned), split
    task = task_class()
    for (split, n, seed), pinned in EXAMPLES[task_class].items():
        assert digest([[e.prompt, list(e.answers)] for e in task.examples(split, n, seed)]) == pinned, split


def test_gpoints_targets_from_the_value_set_are_the_solver_searches():
    task = GeneralPointsTask()
    hands = list(combinations_with_replacement(RANKS, task.n_cards))
    for rule in RULES:
        for hand in hands if rule == "id" else [h for h in hands if any(r in FACES for r in h)]:
            searched = [t for t in task.targets if reaches(values(hand, rule), t, task.ops)]
            assert [p.target for p in task.puzzles(hand, rule)] == searched, (hand, rule)


def test_a_single_target_keeps_the_solver_search():
    class Classic(GeneralPointsTask):
        n_cards = 4
        targets = (24,)

    # no face card, so the rule changes nothing: (5+7-6)*4 = 24
    assert [p.prompt for p in Classic().puzzles((4, 5, 6, 7), "id")] == ["cards 4 5 6 7, j=q=k=10, make 24"]
    assert Classic().puzzles((1, 1, 1, 1), "id") == []  # four aces reach at most 4


def brute_values(numbers: tuple[int, ...], ops: str) -> set[int]:
    """Every value of every expression tree over ``numbers`` with ``ops`` (no division), by plain recursion."""
    if len(numbers) == 1:
        return {numbers[0]}
    found: set[int] = set()
    index = range(len(numbers))
    for size in range(1, len(numbers)):
        for left in combinations(index, size):
            a = brute_values(tuple(numbers[i] for i in left), ops)
            b = brute_values(tuple(numbers[i] for i in index if i not in left), ops)
            for x in a:
                for y in b:
                    found |= {x + y} if "+" in ops else set()
                    found |= {x - y} if "-" in ops else set()
                    found |= {x * y} if "*" in ops else set()
    return found


def test_values_without_division_by_hand_and_by_brute_force():
    assert reachable((2, 3), "+-*") == {5, -1, 1, 6}  # 2+3, 2-3, 3-2, 2*3
    assert reachable((2, 2), "+-*") == {4, 0}
    assert reachable((2, 3), "-") == {-1, 1}
    # three ones: 1+1+1, (1+1)*1, 1*1*1, (1-1)*1, 1-1-1
    assert reachable((1, 1, 1), "+-*") == {3, 2, 1, 0, -1}
    assert all(type(v) is int for v in reachable((7, 8, 9), "+-*"))
    for hand in combinations_with_replacement(range(1, 10), 3):
        for ops in ("+-*", "+*", "-"):
            assert reachable(hand, ops) == brute_values(hand, ops), (hand, ops)


def reverse_before(split: str, n: int | None, seed: int, size: int) -> list[tuple[str, str]]:
    """ReverseTask.examples as it was: the pool drawn again on every call, then shuffled whole."""
    rng = random.Random(f"reverse/{split}")
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    while len(pool) < size:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        in_test = zlib.crc32(word.encode()) % 1000 < ReverseTask.test_share * 1000
        if word in seen or in_test != (split == "test"):
            continue
        seen.add(word)
        pool.append((f"reverse {word}", word[::-1]))
    random.Random(seed).shuffle(pool)
    return pool if n is None else pool[:n]


def test_reverse_examples_are_the_examples_before():
    task = ReverseTask()
    for (split, n, seed), pinned in REVERSE.items():
        examples = task.examples(split, n, seed)
        assert digest([[e.prompt, e.answer] for e in examples]) == pinned, (split, n, seed)
        assert [(e.prompt, e.answer) for e in examples] == reverse_before(split, n, seed, task.size[split])
        assert all(e.meta == {"word": e.prompt.removeprefix("reverse ")} for e in examples)
    first = task.examples("test", 5, seed=1)
    first[0].meta["word"] = "changed"  # a caller's edit of an example reaches no later call
    assert task.examples("test", 5, seed=1)[0].meta["word"] == first[0].prompt.removeprefix("reverse ")
