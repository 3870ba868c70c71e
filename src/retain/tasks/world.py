"""A small synthetic world of people, for fact recall and multi-hop questions (the Atomic paper's knowledge graph).

Sixty people with short lowercase first names. Every person has exactly one value for every *key*:

- relations point to another person (never oneself): ``mentor``, ``friend``, ``boss``, ``sibling``;
  ``sibling`` is symmetric (people are paired off), the others are independent random choices;
- attributes point to a value: ``city`` (8 values), ``job`` (8), ``pet`` (7), dealt out near-evenly so that
  guessing the most common value scores about 1/8 (1/7 for pets).

So the world holds 60 × 7 = 420 atomic facts ``(subject, key, object)``.

A *path* is a tuple of keys applied left to right: ``follow("ava", ("mentor", "city"))`` is the city of ava's
mentor. Every key but the last must be a relation (an attribute value has no mentor). The world is a pure function
of its seed (``random.Random(seed)``, stable across Python versions); ``World.make(seed)`` caches it.
"""

from __future__ import annotations

import random
from functools import lru_cache

from retain.errors import RetainError

# Hand-written, unique, 3-6 lowercase letters; none is a key or an attribute value.
NAMES: tuple[str, ...] = (
    "ava", "liam", "noah", "emma", "mia", "leo", "zoe", "max", "ivy", "eli",
    "owen", "ruby", "finn", "nora", "jack", "lily", "theo", "cleo", "hugo", "iris",
    "omar", "lena", "ezra", "maya", "ravi", "sara", "yuki", "tom", "ada", "ben",
    "cara", "dan", "eva", "fred", "gina", "hal", "ian", "jade", "kai", "lara",
    "milo", "nina", "otto", "pia", "quin", "rosa", "sam", "tara", "umar", "vera",
    "wes", "xena", "yara", "zack", "abel", "bea", "cole", "dora", "enzo", "faye",
)  # fmt: skip

RELATIONS: tuple[str, ...] = ("mentor", "friend", "boss", "sibling")
SYMMETRIC: frozenset[str] = frozenset({"sibling"})
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "city": ("paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito"),
    "job": ("baker", "nurse", "pilot", "chef", "judge", "actor", "miner", "tailor"),
    "pet": ("cat", "dog", "owl", "frog", "horse", "snake", "rabbit"),
}
KEYS: tuple[str, ...] = (*RELATIONS, *ATTRIBUTES)
_PEOPLE = frozenset(NAMES)


class World:
    """People, keys and the one value each person has per key. Build with ``World.make(seed)``."""

    def __init__(self, seed: int, table: dict[tuple[str, str], str]):
        self.seed = seed
        self.people: tuple[str, ...] = NAMES
        self.relations: tuple[str, ...] = RELATIONS
        self.attributes: tuple[str, ...] = tuple(ATTRIBUTES)
        self.keys: tuple[str, ...] = KEYS
        self._table = table

    @classmethod
    def make(cls, seed: int = 0) -> World:
        """The world for ``seed`` (cached: the same object for the same seed)."""
        return _make(seed)

    def is_relation(self, key: str) -> bool:
        return key in RELATIONS

    def values(self, key: str) -> tuple[str, ...]:
        """Everything ``key`` can point to: the people for a relation, the attribute's values otherwise."""
        if key in RELATIONS:
            return self.people
        if key in ATTRIBUTES:
            return ATTRIBUTES[key]
        raise RetainError(f"unknown key {key!r} (keys: {', '.join(KEYS)})")

    def atomic_facts(self) -> list[tuple[str, str, str]]:
        """Every ``(subject, key, object)``, people in ``NAMES`` order, keys in ``KEYS`` order."""
        return [(p, k, self._table[p, k]) for p in self.people for k in self.keys]

    def follow(self, person: str, path: tuple[str, ...] | list[str]) -> str:
        """Apply ``path``'s keys to ``person`` left to right; raises RetainError on an unknown name or bad path."""
        if person not in _PEOPLE:
            raise RetainError(f"unknown person {person!r} in world seed {self.seed}")
        if not path:
            raise RetainError("empty path: give at least one key")
        node = person
        for i, key in enumerate(path):
            if key not in KEYS:
                raise RetainError(f"unknown key {key!r} (keys: {', '.join(KEYS)})")
            if i < len(path) - 1 and key not in RELATIONS:
                raise RetainError(f"path {'>'.join(path)}: only the last key may be an attribute, not {key!r}")
            node = self._table[node, key]
        return node


@lru_cache(maxsize=8)
def _make(seed: int) -> World:
    rng = random.Random(seed)
    table: dict[tuple[str, str], str] = {}
    for key in RELATIONS:
        if key in SYMMETRIC:
            # A random perfect matching: shuffle, then pair neighbours (60 is even, so no one is left over).
            order = list(NAMES)
            rng.shuffle(order)
            for a, b in zip(order[0::2], order[1::2]):
                table[a, key], table[b, key] = b, a
        else:
            for person in NAMES:
                table[person, key] = rng.choice([p for p in NAMES if p != person])
    for key, values in ATTRIBUTES.items():
        # Deal the values out in turn, then shuffle who gets which: every value is used 7-9 times.
        dealt = [values[i % len(values)] for i in range(len(NAMES))]
        rng.shuffle(dealt)
        for person, value in zip(NAMES, dealt):
            table[person, key] = value
    return World(seed, table)

