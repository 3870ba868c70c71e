"""GeneralPoints (Chu et al., "SFT Memorizes, RL Generalizes", arXiv 2501.17161), scaled down for a tiny model:
three cards and a target between 10 and 24 (the paper: four cards, always 24).

Three cards, ranks a (1), 2..10, j, q, k, shown in rank order; write an expression over the card *values* that
uses each value exactly once with ``+ - * /`` and brackets and equals the target. Prompts (at most 40 characters)::

    cards 4 7 k, j=q=k=10, make 12        in-distribution rule: j, q, k count as 10     answer e.g. 4*(10-7)
    cards 2 3 k, j=11 q=12 k=13, make 12  OOD rule: j, q, k count as 11/12/13           answer e.g. 13-3+2

Why scaled down: the embedded 1.6 M-parameter model solved 1.2% of four-card "make 24" hands after pretraining
(pass@16 18%), too little for RL to learn from in a demo's budget. SPEC §4 allows fewer cards and another target
as long as the rule shift stays; a target range (``targets``, like Countdown's) keeps the space large enough for
disjoint splits with three cards (a single target leaves ~150 solvable hands). ``n_cards`` and ``targets`` are
class attributes: ``class Classic(GeneralPointsTask): n_cards = 4; targets = (24,)`` is the paper's game.

Splits (sizes with the defaults: pretrain 698 (206 of them under the OOD rule), train 652, test 492, ood 616
prompts; 4.8 answers each on average).
In-distribution prompts are every (hand, target) pair solvable under j=q=k=10, cut 30/40/30 by ``hash_partition``
over the hands' *value* multisets (weighted by their prompts), so "j 2 10" and "q 2 10" (the same puzzle under
j=q=k=10) always share a split and a held-out prompt's values were never trained on. The OOD prompts — every hand
holding a face card, under j=11 q=12 k=13 — are cut the same way (by their values under that rule): a quarter joins
``pretrain`` (the base model has seen the rule, as the paper's base model scores 11.5% on it before any training)
and the rest is the ``ood`` split, whose value multisets never appear in pretraining under that rule.

Reward (``expr.score``, after ``clip_completion``; ``answer`` is ignored): 1.0 correct (exactly the hand's values,
as a multiset, equal to the target); 0.2 a legal expression with exactly those values but another value; 0.1 a legal
expression with other numbers; 0.0 anything else: junk, division by zero, too long or too deep, or a prompt this
task did not write. Completions use numbers: "k" in an answer is illegal.
"""

from __future__ import annotations

import re
from itertools import combinations_with_replacement

from retain.tasks.expr import ALL_OPS, Puzzle, PuzzleTask, hash_partition, reachable, reaches

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


# Rewordings of one prompt for template-diversity training (Debunk, arXiv 2510.00237): the same cards, rule and
# target in other words and orders. Only training data uses them (``OfflineData.prompts: varied``); every evaluation
# split keeps the one template above, so a template-diverse run is scored on the prompts everyone is scored on.
TEMPLATES = (
    "cards {cards}, {rule}, make {target}",
    "make {target} from {cards}, {rule}",
    "hand {cards}; {rule}; target {target}",
    "use {cards} to get {target} ({rule})",
    "{rule}: {cards} -> {target}",
)


def prompt_variants(prompt: str) -> list[str]:
    """``prompt`` in every template of ``TEMPLATES`` (the first is the task's own); a prompt this task did not
    write is returned alone."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        return [prompt]
    return [t.format(cards=match[1], rule=match[2], target=match[3]) for t in TEMPLATES]


OOD_PRETRAIN_SHARE = 0.25  # of the OOD-rule prompts (by value multiset), seen in pretraining


class GeneralPointsTask(PuzzleTask):
    name = "gpoints"
    description = "make 10..24 from 3 cards with + - * / (j=q=k=10; ood: j=11 q=12 k=13)"
    ops = ALL_OPS
    n_cards = 3
    targets: tuple[int, ...] = tuple(range(10, 25))

    def puzzles(self, ranks: tuple[int, ...], rule: str) -> list[Puzzle]:
        """The prompts of one card hand under ``rule``: one per target its values reach."""
        vals = values(ranks, rule)
        meta = {"cards": tuple(card_name(r) for r in ranks), "values": vals, "rule": rule}
        if len(self.targets) > 1:  # one value set per value multiset (cached), then a lookup per target
            found = reachable(vals, self.ops)
            reached = [t for t in self.targets if t in found]
        else:  # a single target (the paper's 24): the partner search, cheaper than every value of four cards
            reached = [t for t in self.targets if reaches(vals, t, self.ops)]
        return [Puzzle(prompt_for(ranks, rule, t), vals, t, meta) for t in reached]

    def build_pools(self) -> dict[str, list[Puzzle]]:
        hands = list(combinations_with_replacement(RANKS, self.n_cards))  # sorted rank tuples
        pools: dict[str, list[Puzzle]] = {name: [] for name in self.splits}
        for rule, shares in (("id", None), ("ood", (("pretrain", OOD_PRETRAIN_SHARE), ("ood", 1 - OOD_PRETRAIN_SHARE)))):
            chosen = hands if rule == "id" else [h for h in hands if any(r in FACES for r in h)]
            by_values: dict[tuple[int, ...], list[Puzzle]] = {}
            for h in chosen:
                by_values.setdefault(tuple(sorted(values(h, rule))), []).extend(self.puzzles(h, rule))
            keys = [v for v, ps in by_values.items() if ps]
            weight = lambda v: len(by_values[v])  # noqa: E731
            split_of = hash_partition(keys, salt="gpoints" if rule == "id" else "gpoints-ood", weight=weight, **({"shares": shares} if shares else {}))
            for v in keys:
                pools[split_of[v]].extend(by_values[v])
        # a fixed order within each split (hands, then targets, in-distribution before OOD in pretrain)
        return {name: sorted(pool, key=lambda p: (p.meta["rule"] != "id", p.numbers, p.target, p.prompt))
                for name, pool in pools.items()}

    def prompt_variants(self, prompt: str) -> list[str]:
        return prompt_variants(prompt)

    def read_prompt(self, prompt: str) -> tuple[tuple[int, ...], int] | None:
        match = _PROMPT.search(prompt)
        if match is None:
            return None
        ranks = tuple(_RANK_OF[card] for card in match[1].split())
        return values(ranks, _RULE_OF_TEXT[match[2]]), int(match[3])
