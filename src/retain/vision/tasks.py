"""The visual tasks: a picture (``Example.image``, a scene from ``retain.vision.render``) and a question about it.

- ``cards``: card recognition, the perception probe (a prior skill of the embedded VLM): "which cards?" answered
  with the ranks as they lie, left to right, ``7 k 4``. Scored per card: the share of the hand named right (a multiset match,
  divided by the longer of the two lists, so naming extra cards costs too); correct only when every card is.
  Splits: ``train`` / ``test`` cut by the hand's rank multiset, black suits; ``ood`` the test hands in red suits.
- ``gpoints_vl``: GeneralPoints with the hand as a picture (Chu et al.): the same puzzles, splits and expression
  verifier as the text task (``retain.tasks.gpoints``); the prompt keeps the rule and the target, the cards are only
  in the picture. The answer names the cards (left to right), then the expression, ``7 k 4: 4*(10-7)``; only the expression is
  scored, against the hand actually shown. Black suits in ``pretrain`` / ``train`` / ``test`` and under the rule
  shift (``ood``: j=11 q=12 k=13); ``ood_visual`` is the test split in red suits.
- The visual sequence, each split ``pretrain`` / ``train`` / ``test`` by a stable hash of what the picture shows:
  ``vcount`` (how many circles/squares/triangles, 0-4), ``vcolor`` (the colour of the one shape of a kind),
  ``vspatial`` (left/right/above/below of two shapes in a row or column), ``vdigits`` (read a 2-3 digit number).

A picture's content is not in the prompt's text, so these rewards read the reference ``answer`` (a dataset column,
written by retain, not by the model) for what was shown: the ``answer`` argument when given, else the one the prompt
carries (each example's prompt is a ``PicturePrompt``: its text, its picture and that picture's reference, so the
picture and what a verifier needs travel with the prompt through data sources and rollouts); with neither they score
0.0. Completions are parsed, never evaluated.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from functools import cached_property
from itertools import combinations_with_replacement
from typing import Any

from retain.errors import RetainError
from retain.tasks.base import CORRECT, Example, PicturePrompt, Task, clip_completion, shown_answer
from retain.tasks.expr import ILLEGAL, score
from retain.tasks.gpoints import RULES, GeneralPointsTask, card_name, values
from retain.vision.render import BLACK_SUITS, COLORS, RED_SUITS, SHAPES, CardScene, NumberScene, ShapeScene

_RANK_OF = {card_name(r): r for r in range(1, 14)}
SEQUENCE_SHARES = (("pretrain", 0.3), ("train", 0.4), ("test", 0.3))


def _bucket(key: Any, salt: str) -> float:
    """A stable position in [0, 1) for a scene's content (the same on every machine and Python)."""
    return (zlib.crc32(f"{salt}|{key!r}".encode()) % 100_000) / 100_000


def _split_of(key: Any, salt: str, shares=SEQUENCE_SHARES) -> str:
    at, total = _bucket(key, salt), 0.0
    for name, share in shares:
        total += share
        if at < total:
            return name
    return shares[-1][0]


def _suits(key: Any, n: int, palette: tuple[str, ...]) -> tuple[str, ...]:
    rng = random.Random(f"suits|{key!r}")
    return tuple(rng.choice(palette) for _ in range(n))


def read_ranks(text: str) -> list[int] | None:
    """Card names separated by spaces (``4 7 k``) as ranks; None if any word is not a card name."""
    words = text.split()
    if not words or len(words) > 8 or any(w not in _RANK_OF for w in words):
        return None
    return [_RANK_OF[w] for w in words]


def recognition_score(named: str, shown: list[int]) -> float:
    """Share of the shown cards named (multiset overlap over the longer list): 1.0 only for exactly the hand."""
    ranks = read_ranks(named) if isinstance(named, str) else None
    if not ranks or not shown:
        return 0.0
    overlap = sum((Counter(ranks) & Counter(shown)).values())
    return overlap / max(len(ranks), len(shown))


class VisualTask(Task):
    """A task whose examples carry a picture. Subclasses build every split's examples once (``build_pools``)."""

    modality = "image"
    max_new_tokens = 16
    partial_credit = True  # evaluation reports the mean reward as ``score`` beside accuracy (cards: per card)

    def build_pools(self) -> dict[str, list[Example]]:
        raise NotImplementedError

    @cached_property
    def pools(self) -> dict[str, list[Example]]:
        return self.build_pools()

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        if n is not None and n < 0:
            raise RetainError(f"task {self.name!r}: n must be >= 0, got {n}")
        pool = list(self.pools[split])
        random.Random(seed).shuffle(pool)
        return pool if n is None else pool[:n]


class CardRecognitionTask(VisualTask):
    name = "cards"
    splits = ("train", "test", "ood")
    description = "name the cards shown (per-card score; ood: red suits)"
    prompt = "which cards?"
    test_share = 0.3

    def build_pools(self) -> dict[str, list[Example]]:
        hands = list(combinations_with_replacement(range(1, 14), 3))
        pools: dict[str, list[Example]] = {name: [] for name in self.splits}
        for hand in hands:
            split = "test" if _bucket(hand, "cards") < self.test_share else "train"
            copies = 4 if split == "train" else 1  # more pictures (suits, jitter) of each training hand
            for copy in range(copies):
                pools[split].append(self._example(hand, BLACK_SUITS, copy))
            if split == "test":
                pools["ood"].append(self._example(hand, RED_SUITS, 0))
        return pools

    def _example(self, hand: tuple[int, ...], palette: tuple[str, ...], copy: int) -> Example:
        order = list(hand)
        random.Random(f"order|{hand}|{copy}").shuffle(order)  # the cards lie in any order; the answer reads them left to right
        scene = CardScene(tuple(order), _suits((hand, palette, copy), len(hand), palette), seed=copy)
        answer = " ".join(card_name(r) for r in order)
        return Example(PicturePrompt(self.prompt, scene, answer), answer, image=scene, meta={"ranks": hand})

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        answer = shown_answer(prompt, answer)
        shown = read_ranks(answer) if isinstance(answer, str) else None
        if not isinstance(completion, str) or shown is None:
            return 0.0
        return recognition_score(clip_completion(completion), shown)


class GeneralPointsVLTask(VisualTask):
    name = "gpoints_vl"
    splits = ("pretrain", "train", "test", "ood", "ood_visual")
    description = "GeneralPoints from a picture of the cards (ood: j=11 q=12 k=13; ood_visual: red suits)"
    max_new_tokens = 28

    @cached_property
    def text_task(self) -> GeneralPointsTask:
        from retain import tasks as task_registry  # the registry's instance: its puzzle pools are built once

        return task_registry.get("gpoints")

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """As the text task's split (same puzzles, same order for a seed); answers are enumerated only for the
        examples returned, as there."""
        self.check_split(split)
        if n is not None and n < 0:
            raise RetainError(f"task {self.name!r}: n must be >= 0, got {n}")
        palette = RED_SUITS if split == "ood_visual" else BLACK_SUITS
        pool = list(self.text_task.pools["test" if split == "ood_visual" else split])
        random.Random(seed).shuffle(pool)
        return [self._example(p, palette) for p in (pool if n is None else pool[:n])]

    def _example(self, puzzle, palette: tuple[str, ...]) -> Example:
        ranks = tuple(_RANK_OF[c] for c in puzzle.meta["cards"])
        order = list(ranks)
        random.Random(f"order|{puzzle.prompt}").shuffle(order)
        scene = CardScene(tuple(order), _suits((puzzle.prompt, palette), len(ranks), palette))
        rule = puzzle.meta["rule"]
        head = " ".join(card_name(r) for r in order)
        base = self.text_task.example(puzzle)
        answers = tuple(f"{head}: {a}" for a in base.answers)
        meta = {"ranks": ranks, "rule": rule, "target": puzzle.target, "values": values(ranks, rule)}
        prompt = PicturePrompt(f"{RULES[rule][0]}, make {puzzle.target}", scene, answers[0])
        return Example(prompt, answers[0], answers, image=scene, meta=meta)

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        answer = shown_answer(prompt, answer)
        if not all(isinstance(x, str) for x in (prompt, completion, answer)):
            return ILLEGAL
        read = _read_vl_prompt(prompt)
        shown = read_ranks(answer.split(":", 1)[0]) if ":" in answer else None
        if read is None or shown is None:
            return ILLEGAL
        rule, target = read
        expression = clip_completion(completion).rsplit(":", 1)[-1]
        return score(expression.strip(), values(tuple(shown), rule), target, self.text_task.ops)


def _read_vl_prompt(prompt: str) -> tuple[str, int] | None:
    """(rule, target) from ``<rule text>, make <target>`` (the text after the picture)."""
    for rule, (text, _) in RULES.items():
        head = f"{text}, make "
        at = prompt.rfind(head)
        if at >= 0:
            tail = prompt[at + len(head) : at + len(head) + 4].strip()
            return (rule, int(tail)) if tail.isascii() and tail.isdigit() and len(tail) <= 3 else None
    return None


class ExactVisualTask(VisualTask):
    """A question with one short answer: 1.0 for exactly the reference after ``clip_completion``, else 0.0."""

    splits = ("pretrain", "train", "test")
    size = 2400  # pictures drawn per task; cut ~30/40/30 by content

    def scene_and_qa(self, rng: random.Random) -> tuple[Any, Any, str, str]:
        """(content key, scene, question, answer) for one random draw."""
        raise NotImplementedError

    def build_pools(self) -> dict[str, list[Example]]:
        rng = random.Random(f"{self.name}/pool")
        pools: dict[str, list[Example]] = {name: [] for name in self.splits}
        seen: set[Any] = set()
        for _ in range(self.size * 20):
            if len(seen) >= self.size:
                break
            key, scene, question, answer = self.scene_and_qa(rng)
            if key in seen:
                continue
            seen.add(key)
            example = Example(PicturePrompt(question, scene, answer), answer, image=scene, meta={"key": key})
            pools[_split_of(key, self.name)].append(example)
        return pools

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        answer = shown_answer(prompt, answer)
        if not isinstance(answer, str) or not isinstance(completion, str) or not answer:
            return 0.0
        return CORRECT if clip_completion(completion) == answer else 0.0


def _random_items(rng: random.Random, n: int, kinds=SHAPES) -> tuple[tuple[int, str, str], ...]:
    cells = rng.sample(range(9), n)
    return tuple(sorted((c, rng.choice(kinds), rng.choice(list(COLORS))) for c in cells))


class CountTask(ExactVisualTask):
    name = "vcount"
    description = "how many shapes of a kind (0-4)"

    def scene_and_qa(self, rng):
        items = _random_items(rng, rng.randint(1, 6))
        kind = rng.choice(SHAPES)
        answer = str(sum(k == kind for _, k, _ in items))
        if int(answer) > 4:
            return self.scene_and_qa(rng)
        return (items, kind), ShapeScene(items, rng.randint(0, 999)), f"how many {kind}s?", answer


class ColorTask(ExactVisualTask):
    name = "vcolor"
    description = "the colour of the one shape of a kind"

    def scene_and_qa(self, rng):
        kind = rng.choice(SHAPES)
        others = [k for k in SHAPES if k != kind]
        n = rng.randint(1, 4)
        cells = rng.sample(range(9), n)
        color = rng.choice(list(COLORS))
        items = [(cells[0], kind, color)] + [(c, rng.choice(others), rng.choice(list(COLORS))) for c in cells[1:]]
        items = tuple(sorted(items))
        return (items, kind), ShapeScene(items, rng.randint(0, 999)), f"what colour is the {kind}?", color


class SpatialTask(ExactVisualTask):
    name = "vspatial"
    description = "where one shape is from another (left/right/above/below)"

    def scene_and_qa(self, rng):
        a, b = rng.sample(SHAPES, 2)
        if rng.random() < 0.5:  # same row
            row, (ca, cb) = rng.randrange(3), rng.sample(range(3), 2)
            cell_a, cell_b = row * 3 + ca, row * 3 + cb
            answer = "left" if ca < cb else "right"
        else:
            col, (ra, rb) = rng.randrange(3), rng.sample(range(3), 2)
            cell_a, cell_b = ra * 3 + col, rb * 3 + col
            answer = "above" if ra < rb else "below"
        colors = list(COLORS)
        items = tuple(sorted([(cell_a, a, rng.choice(colors)), (cell_b, b, rng.choice(colors))]))
        return (items, a, b), ShapeScene(items, rng.randint(0, 999)), f"where is the {a} from the {b}?", answer


class DigitsTask(ExactVisualTask):
    name = "vdigits"
    description = "read a 2-3 digit number"

    def scene_and_qa(self, rng):
        text = str(rng.randint(10, 999))
        color = rng.choice(list(COLORS))
        # the number alone is the content key: a held-out number is never trained on, in any colour
        return text, NumberScene(text, color, rng.randint(0, 999)), "what number?", text
