"""Countdown (TinyZero; "Retaining by Doing", arXiv 2510.18874), scaled down: reach a target from given digits.

Use each number exactly once with ``+ - *`` and brackets; numbers are shown in ascending order::

    use 3 5 8 to make 23       in-distribution: three digits 1..9      answer e.g. 3*5+8
    use 2 3 5 8 to make 31     OOD (split ood): four digits, a length shift   answer e.g. 2*8+3*5

Targets are the two-digit integers 10..99 the numbers can reach (every one of them, so a split is finite and a
prompt is a (hand, target) pair). No division: with ``+ - *`` every intermediate value is an integer, as in the
single-digit arithmetic the base model learns in pretraining, so ``/`` is illegal here (reward 0.0) and ``answers``
lists every correct expression (commuted forms included, at most 32).

Splits. ``pretrain``, ``train`` and ``test`` cut the three-digit hands with ``hash_partition``, weighted by their
number of targets so the prompts split about 30/40/30 (399 / 525 / 395 prompts, 3.6 answers each on average): a
hand and all of its targets sit in one split, so held-out prompts use hands never trained on. ``ood`` holds every
four-digit hand with every reachable target in range (17,122 prompts, 12.6 answers each after the cap of 32).

Reward (``expr.score``, after ``clip_completion``; ``answer`` is ignored): 1.0 correct (exactly the given numbers,
as a multiset, equal to the target); 0.2 a legal expression with exactly those numbers but another value; 0.1 a
legal expression with other numbers; 0.0 anything else: junk, ``/``, too long or too deep, or a prompt this task did
not write.
"""

from __future__ import annotations

import re
from itertools import combinations_with_replacement

from retain.tasks.expr import Puzzle, PuzzleTask, hash_partition, reachable

DIGITS = range(1, 10)
TARGETS = range(10, 100)
_PROMPT = re.compile(r"use ([0-9]{1,2}(?: [0-9]{1,2}){1,5}) to make ([0-9]{1,3})")


def prompt_for(numbers: tuple[int, ...], target: int) -> str:
    return f"use {' '.join(map(str, sorted(numbers)))} to make {target}"


class CountdownTask(PuzzleTask):
    name = "countdown"
    description = "reach a 2-digit target from 3 digits with + - * (ood: 4 digits)"
    ops = "+-*"
    n_numbers = 3
    n_numbers_ood = 4

    def targets(self, hand: tuple[int, ...]) -> list[int]:
        """The in-range targets ``hand`` can reach, ascending."""
        found = reachable(hand, self.ops)
        return [t for t in TARGETS if t in found]

    def puzzles_of(self, hand: tuple[int, ...]) -> list[Puzzle]:
        return [Puzzle(prompt_for(hand, t), hand, t) for t in self.targets(hand)]

    def build_pools(self) -> dict[str, list[Puzzle]]:
        hands = [h for h in combinations_with_replacement(DIGITS, self.n_numbers) if self.targets(h)]
        split_of = hash_partition(hands, salt="countdown", weight=lambda h: len(self.targets(h)))
        pools: dict[str, list[Puzzle]] = {name: [] for name in self.splits}
        for hand in hands:
            pools[split_of[hand]].extend(self.puzzles_of(hand))
        ood_hands = combinations_with_replacement(DIGITS, self.n_numbers_ood)
        pools["ood"] = [puzzle for hand in ood_hands for puzzle in self.puzzles_of(hand)]
        return pools

    def read_prompt(self, prompt: str) -> tuple[tuple[int, ...], int] | None:
        match = _PROMPT.search(prompt)
        if match is None:
            return None
        return tuple(int(n) for n in match[1].split()), int(match[2])
