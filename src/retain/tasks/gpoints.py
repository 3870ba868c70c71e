"""GeneralPoints (Chu et al., "SFT Memorizes, RL Generalizes", arXiv 2501.17161) at the paper's size: four cards,
target 24.

Four cards, ranks a (1), 2..10, j, q, k, shown in rank order; write an expression over the card *values* that
uses each value exactly once with ``+ - * /`` and brackets and equals 24. Prompts (at most 40 characters)::

    cards 2 3 5 6, j=q=k=10, make 24        in-distribution rule: j, q, k count as 10   answer e.g. 2*3*5-6
    cards 2 3 5 k, j=11 q=12 k=13, make 24  OOD rule (split ood): j, q, k count as 11/12/13

``n_cards`` and ``target`` are class attributes: a subclass with 3 cards and target 12 makes an easier variant
(24 with three cards is reachable for only 22% of hands). Split sizes at 4 cards / 24: pretrain 369, train 496,
test 371, ood 796 hands, with many distinct answers each (SFT target selection has a real choice).

Splits. ``pretrain``, ``train`` and ``test`` hold in-distribution hands, cut 30/40/30 by ``hash_partition`` over
the hands' *value* multisets (each weighted by the card hands it stands for), so "j 2 10" and "q 2 10" (the same
puzzle under j=q=k=10) always share a split and no hand crosses splits. ``ood`` holds every solvable hand with at least one face card, under the OOD rule. Each split is
every solvable hand of its part of the space (the exact solver decides); ``examples`` draws them in seeded order,
which is drawing hands until one is solvable, without repeats.

Reward (``expr.score``, after ``clip_completion``; ``answer`` is ignored): 1.0 correct (exactly the hand's values,
as a multiset, equal to the target); 0.2 a legal expression with exactly those values but another value; 0.1 a legal
expression with other numbers; 0.0 anything else: junk, division by zero, too long or too deep, or a prompt this
task did not write. Completions use numbers: "k" in an answer is illegal.
"""

from __future__ import annotations

import re
from itertools import combinations_with_replacement

from retain.tasks.expr import ALL_OPS, Puzzle, PuzzleTask, hash_partition, reaches

RANKS = range(1, 14)
FACES = (11, 12, 13)
_NAMES = {1: "a", 11: "j", 12: "q", 13: "k"}
_RANK_OF = {**{str(r): r for r in range(2, 11)}, **{name: r for r, name in _NAMES.items()}}
# rule name -> (the text the prompt states, a card's value under it)
RULES = {
    "id": ("j=q=k=10", lambda rank: min(rank, 10)),
    "ood": ("j=11 q=12 k=13", lambda rank: rank),
}
_RULE_OF_TEXT = {text: name for name, (text, _) in RULES.items()}

_CARD = r"(?:10|[2-9ajqk])"
_RULE_TEXTS = "|".join(map(re.escape, _RULE_OF_TEXT))
_PROMPT = re.compile(rf"cards ({_CARD}(?: {_CARD}){{1,5}}), ({_RULE_TEXTS}), make ([0-9]{{1,3}})")


def card_name(rank: int) -> str:
    return _NAMES.get(rank, str(rank))


def values(ranks: tuple[int, ...], rule: str) -> tuple[int, ...]:
    """The cards' values under ``rule`` ("id" or "ood")."""
    value = RULES[rule][1]
    return tuple(value(r) for r in ranks)


def prompt_for(ranks: tuple[int, ...], rule: str, target: int) -> str:
    cards = " ".join(card_name(r) for r in sorted(ranks))
    return f"cards {cards}, {RULES[rule][0]}, make {target}"


class GeneralPointsTask(PuzzleTask):
    name = "gpoints"
    description = "make 24 from 4 cards with + - * / (j=q=k=10; ood: j=11 q=12 k=13)"
    ops = ALL_OPS
    target = 24
    n_cards = 4

    def build_pools(self) -> dict[str, list[Puzzle]]:
        hands = list(combinations_with_replacement(RANKS, self.n_cards))  # sorted rank tuples

        def solvable(ranks: tuple[int, ...], rule: str) -> bool:
            return reaches(values(ranks, rule), self.target, self.ops)

        def puzzle(ranks: tuple[int, ...], rule: str) -> Puzzle:
            meta = {"cards": tuple(card_name(r) for r in ranks), "values": values(ranks, rule), "rule": rule}
            return Puzzle(prompt_for(ranks, rule, self.target), values(ranks, rule), self.target, meta)

        in_dist = [h for h in hands if solvable(h, "id")]
        by_values: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for h in in_dist:
            by_values.setdefault(tuple(sorted(values(h, "id"))), []).append(h)
        split_of = hash_partition(list(by_values), salt="gpoints", weight=lambda v: len(by_values[v]))
        pools: dict[str, list[Puzzle]] = {name: [] for name in self.splits}
        for h in in_dist:
            pools[split_of[tuple(sorted(values(h, "id")))]].append(puzzle(h, "id"))
        pools["ood"] = [puzzle(h, "ood") for h in hands if any(r in FACES for r in h) and solvable(h, "ood")]
        return pools

    def read_prompt(self, prompt: str) -> tuple[tuple[int, ...], int] | None:
        match = _PROMPT.search(prompt)
        if match is None:
            return None
        ranks = tuple(_RANK_OF[card] for card in match[1].split())
        return values(ranks, _RULE_OF_TEXT[match[2]]), int(match[3])
