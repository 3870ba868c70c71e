"""Knowledge-graph tasks over the synthetic world (SPEC §4, after Atomic): fact recall and multi-hop questions.

Question format: the keys of a path, last first, then the subject, then ``?`` — it reads like English::

    city of ava?               -> the city of ava                 (1 hop, FactsTask)
    city of mentor of ava?     -> the city of ava's mentor         (2 hops, path ("mentor", "city"))
    friend of boss of ava?     -> the friend of ava's boss         (2 hops, path ("boss", "friend"))

The answer is the bare lowercase entity (``paris``, ``liam``). Both tasks score the same way, against the world
rather than a stored answer (the ``answer`` argument of ``reward`` is not needed and is ignored):

- the prompt is parsed by regex; the last ``word of word ... word?`` in it counts, so a prompt still wrapped in
  the chat markers parses too. A prompt that does not parse, names an unknown person or key, or uses an attribute
  before the last hop scores 0.0 — reward never raises;
- the completion goes through ``clip_completion`` (first line, stripped) and is lowercased;
- exact match with the world's answer → 1.0;
- **retain:** otherwise ``TYPE_REWARD`` (0.1) when the completion is an entity of the right type (a person's name
  when the last hop is a relation, one of the attribute's values when it is an attribute), else 0.0. The small
  partial reward gives GRPO a signal that separates "answered the right kind of thing" from garbage; accuracy
  (``is_correct``) counts only exact matches.
"""

from __future__ import annotations

import random
import re

from retain.errors import RetainError
from retain.tasks.base import CORRECT, Example, Task, clip_completion
from retain.tasks.world import World

TYPE_REWARD = 0.1
MAX_PROMPT_CHARS = 512  # prompts longer than this are cut before parsing: bounded work on any input

# Relation paths of the composite task. The world's relations are mentor, friend, boss, sibling; its attributes
# city, job, pet. "sibling" is held out of every composite training question (it is still an atomic fact).
HELD_OUT_RELATION = "sibling"
SEEN_RELATIONS: tuple[str, ...] = ("mentor", "friend", "boss")
SECOND_HOPS: tuple[str, ...] = (*SEEN_RELATIONS, "city", "job", "pet")
# Held-out combinations of seen keys: each first hop is held out twice and each second hop once, so every key
# still appears in training paths, only these pairings are new.
COMPOSITION_PATHS: tuple[tuple[str, str], ...] = (
    ("mentor", "pet"), ("friend", "city"), ("boss", "job"),
    ("mentor", "boss"), ("friend", "mentor"), ("boss", "friend"),
)  # fmt: skip
IID_PATHS: tuple[tuple[str, str], ...] = tuple(
    (a, b) for a in SEEN_RELATIONS for b in SECOND_HOPS if (a, b) not in COMPOSITION_PATHS
)
# The held-out relation as first hop, followed by any seen key. Paths with sibling as the *second* hop are in no split.
ZEROSHOT_PATHS: tuple[tuple[str, str], ...] = tuple((HELD_OUT_RELATION, b) for b in SECOND_HOPS)

# Subjects of pretrain / train / test, a disjoint partition of the 60 people (25% / 40% / 35%).
PEOPLE_SPLIT_SIZES: dict[str, int] = {"pretrain": 15, "train": 24, "test": 21}

_QUESTION = re.compile(r"(?<![a-z])([a-z]+(?: of [a-z]+)+)\?")


def question(person: str, path: tuple[str, ...]) -> str:
    """The prompt for ``path`` applied to ``person``: ``question("ava", ("mentor", "city"))`` is
    ``"city of mentor of ava?"``."""
    return " of ".join([*reversed(path), person]) + "?"


def parse_question(world: World, prompt: str) -> tuple[str, tuple[str, ...]] | None:
    """``(person, path)`` of a question about ``world``, or None when the prompt is not a valid one."""
    if not isinstance(prompt, str):
        return None
    found = _QUESTION.findall(prompt[-MAX_PROMPT_CHARS:])
    if not found:
        return None
    *keys_last_first, person = found[-1].split(" of ")
    path = tuple(reversed(keys_last_first))
    if person not in world.people or any(k not in world.keys for k in path):
        return None
    if any(not world.is_relation(k) for k in path[:-1]):
        return None
    return person, path


def score(world: World, prompt: str, completion: str, type_reward: float = TYPE_REWARD) -> float:
    """The reward both tasks use (see the module docstring)."""
    parsed = parse_question(world, prompt)
    if parsed is None:
        return 0.0
    person, path = parsed
    said = clip_completion(completion).lower()
    if said == world.follow(person, path):
        return CORRECT
    return type_reward if said in world.values(path[-1]) else 0.0


def _take(items: list[Example], n: int | None, seed: int) -> list[Example]:
    """The whole list shuffled by ``seed`` (n None), else the first ``n`` of that shuffle."""
    if n is not None and n < 0:
        raise RetainError(f"n must be >= 0 or None, got {n}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled if n is None else shuffled[:n]


class FactsTask(Task):
    """Prior skill: recall one atomic fact, ``city of ava?`` → ``paris``, ``mentor of ava?`` → ``bea``.

    This is memorisation, so ``train`` and ``test`` are both the full fact set (420 facts: 60 people × 7 keys):
    recall is tested on the facts that were learned, and no held-out facts exist by definition. This is the one
    task whose splits share prompts, on purpose.
    """

    name = "facts"
    splits = ("train", "test")
    description = "atomic fact recall about 60 synthetic people (memorisation; train = test = all 420 facts)"

    def __init__(self, seed: int = 0):
        self.world = World.make(seed)
        self._facts = [
            Example(question(s, (k,)), o, meta={"subject": s, "path": (k,), "hops": 1})
            for s, k, o in self.world.atomic_facts()
        ]

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        return _take(self._facts, n, seed)

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        return score(self.world, prompt, completion)


class KGComposeTask(Task):
    """New task: two-hop questions, ``city of mentor of ava?`` → the city of ava's mentor.

    Splits (path types above; "people" = whose questions they are):

    - ``pretrain`` / ``train`` / ``test``: the 12 ``IID_PATHS`` on disjoint thirds of the people (15 / 24 / 21),
      so ``test`` is i.i.d. in path type and held out in subject: 180 / 288 / 252 questions;
    - ``ood_composition``: the 6 ``COMPOSITION_PATHS`` (seen keys, pairings never in pretrain/train), all 60 people;
    - ``ood_zeroshot``: the 6 ``ZEROSHOT_PATHS`` (first hop ``sibling``, in no composite training question), all
      60 people;
    - ``ood``: composition then zero-shot (720 questions).

    The OOD splits ask about every person because the shift under test is the path type; ``meta["people"]`` says
    which subject split a question's person belongs to, so OOD accuracy on held-out people alone is one filter
    away. ``meta`` also holds ``subject``, ``path``, ``hops``, ``path_type`` ("mentor>city") and ``kind``
    ("iid", "composition", "zeroshot").
    """

    name = "kg"
    splits = ("pretrain", "train", "test", "ood_composition", "ood_zeroshot", "ood")
    description = "two-hop questions over the synthetic world; OOD = unseen path pairings and a held-out relation"

    def __init__(self, seed: int = 0):
        self.world = World.make(seed)
        order = list(self.world.people)
        random.Random(f"kg-people/{seed}").shuffle(order)  # own stream: independent of how the world was drawn
        self.people: dict[str, tuple[str, ...]] = {}
        start = 0
        for split, size in PEOPLE_SPLIT_SIZES.items():
            self.people[split] = tuple(order[start : start + size])
            start += size
        self._people_of = {p: split for split, group in self.people.items() for p in group}
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        if split not in self._cache:
            self._cache[split] = self._build(split)
        return _take(self._cache[split], n, seed)

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        return score(self.world, prompt, completion)

    def _build(self, split: str) -> list[Example]:
        if split == "ood":
            return self._build("ood_composition") + self._build("ood_zeroshot")
        if split == "ood_composition":
            return self._questions(self.world.people, COMPOSITION_PATHS, "composition")
        if split == "ood_zeroshot":
            return self._questions(self.world.people, ZEROSHOT_PATHS, "zeroshot")
        return self._questions(self.people[split], IID_PATHS, "iid")

    def _questions(self, people: tuple[str, ...], paths: tuple[tuple[str, str], ...], kind: str) -> list[Example]:
        return [self._example(person, path, kind) for person in people for path in paths]

    def _example(self, person: str, path: tuple[str, str], kind: str) -> Example:
        meta = {
            "subject": person,
            "path": path,
            "hops": len(path),
            "path_type": ">".join(path),
            "kind": kind,
            "people": self._people_of[person],
        }
        return Example(question(person, path), self.world.follow(person, path), meta=meta)
