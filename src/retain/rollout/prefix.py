"""Shared-prefix prefill: where to cut a batch of prompts so that each distinct prefix is computed once.

Prompts of one task share long prefixes — the chat template's opening, the instruction ("use 5 6 7 to make"), a
relation chain ("friend of mentor of ") — and a causal model's keys and values at a position depend only on the
tokens up to it. So a batch can be prefilled in levels: at cuts ``c_1 < … < c_m`` the level ``k`` forward computes
positions ``[c_{k-1}, c_k)`` once per distinct prefix of length ``c_k`` (its cache rows copied from its parent
prefix's), and a last forward computes every prompt's own rest. The cost of a plan, in token positions computed:

    Σ_k distinct(c_k) · (c_k − c_{k−1})  +  prompts · (longest − c_m)  +  level_cost · (m + 1)

(the last level is padded to the longest rest; ``level_cost`` prices one more forward call in token positions).
``prefix_cuts`` picks the cheapest plan by dynamic programming over the useful cuts: a cut is worth placing only
just before the number of distinct prefixes grows (moving it right until then never costs more), and only before
every prompt's last token (each prompt keeps at least one token for its last level, whose logits start decoding).
No cut at all is today's single padded prefill. Prompts are token id lists; a prefix is named by a small integer per
level (``prefix_ids``), so long prompts cost O(total tokens), not O(tokens × length).
"""

from __future__ import annotations

from collections.abc import Sequence


def prefix_ids(prompts: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    """``ids[c][i]``: a number naming prompt ``i``'s first ``c`` tokens, equal for equal prefixes (c ≤ ``length``)."""
    names: dict[tuple[int, int], int] = {}
    current = [0] * len(prompts)  # the empty prefix
    ids = [list(current)]
    for c in range(length):
        current = [names.setdefault((current[i], p[c]), len(names)) for i, p in enumerate(prompts)]
        ids.append(current)
    return ids


def prefix_cuts(prompts: Sequence[Sequence[int]], level_cost: int) -> list[int]:
    """The cuts of the cheapest shared-prefix plan (empty: one padded prefill is cheapest)."""
    if len(prompts) < 2:
        return []
    return _cheapest_cuts(prompts, prefix_ids(prompts, min(len(p) for p in prompts) - 1), level_cost)


def prefix_levels(prompts: Sequence[Sequence[int]], cuts: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Per cut, ``(heads, row)``: one prompt index per distinct prefix of that length (the level's batch rows, in
    order of first appearance) and, for every prompt, the row of its prefix in that level."""
    ids = prefix_ids(prompts, max(cuts, default=0))
    return [_level(ids[c]) for c in cuts]


def prefix_plan(prompts: Sequence[Sequence[int]], level_cost: int) -> list[tuple[int, list[int], list[int]]]:
    """``prefix_cuts`` and ``prefix_levels`` in one pass over the prompts (what an engine calls on every batch):
    ``(cut, heads, row)`` per level of the cheapest plan."""
    if len(prompts) < 2:
        return []
    ids = prefix_ids(prompts, min(len(p) for p in prompts) - 1)  # every useful cut is below the shortest prompt
    return [(c, *_level(ids[c])) for c in _cheapest_cuts(prompts, ids, level_cost)]


def _cheapest_cuts(prompts: Sequence[Sequence[int]], ids: list[list[int]], level_cost: int) -> list[int]:
    shortest, longest = min(len(p) for p in prompts), max(len(p) for p in prompts)
    distinct = [len(set(level)) for level in ids]
    candidates = [c for c in range(1, shortest) if c == shortest - 1 or distinct[c + 1] > distinct[c]]
    best: dict[int, tuple[int, list[int]]] = {0: (0, [])}  # cut -> (cost of the levels up to it, its cuts)
    for c in candidates:
        best[c] = min((cost + distinct[c] * (c - p) + level_cost, cuts + [c]) for p, (cost, cuts) in best.items())
    return min((cost + len(prompts) * (longest - c) + level_cost, cuts) for c, (cost, cuts) in best.items())[1]


def _level(names: list[int]) -> tuple[list[int], list[int]]:
    row_of: dict[int, int] = {}
    heads: list[int] = []
    for i, name in enumerate(names):
        if name not in row_of:
            row_of[name] = len(heads)
            heads.append(i)
    return heads, [row_of[name] for name in names]
