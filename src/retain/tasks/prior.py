"""Prior skills the embedded model learns in pretraining (besides fact recall, in kg.py).

- ``reverse``: reverse a 3–6 letter lowercase string. Generalises, so ``test`` holds strings never trained on
  (the two splits are a hash partition of the string space).
- ``arith``: the single-digit table ``a op b`` for op in + − × (300 problems). A table is memorised knowledge,
  like facts, so every split is the whole table; say so when reporting (no held-out problems exist).

Both score 1.0 for an exact answer (after ``clip_completion``), else 0.0.
"""

from __future__ import annotations

import random
import re
import zlib

from retain.tasks.base import CORRECT, Example, Task, clip_completion

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _exact(completion: str, answer: str | None) -> float:
    return CORRECT if isinstance(answer, str) and clip_completion(completion) == answer else 0.0


def _in_test_half(text: str, test_share: float) -> bool:
    """A stable hash partition: the same string always falls on the same side, on every machine."""
    return (zlib.crc32(text.encode()) % 1000) < test_share * 1000


class ReverseTask(Task):
    name = "reverse"
    splits = ("train", "test")
    description = "reverse a 3-6 letter string"
    size = {"train": 20_000, "test": 2_000}
    test_share = 0.3
    _prompt = re.compile(r"^reverse ([a-z]{1,16})$")

    def __init__(self) -> None:
        self._words: dict[str, tuple[str, ...]] = {}  # split -> its strings, drawn on first use

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        words = list(self.words(split))
        random.Random(seed).shuffle(words)  # the permutation depends only on the pool's length and the seed
        chosen = words if n is None else words[:n]
        return [Example(prompt=f"reverse {w}", answer=w[::-1], meta={"word": w}) for w in chosen]

    def words(self, split: str) -> tuple[str, ...]:
        """The split's strings in their fixed order, drawn once per task object from a generator seeded by the split's
        name (so "the train split" is one set); the seed of ``examples`` only orders them."""
        if split not in self._words:
            rng = random.Random(f"reverse/{split}")
            want_test = split == "test"
            seen: dict[str, None] = {}
            while len(seen) < self.size[split]:
                word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
                if word not in seen and _in_test_half(word, self.test_share) == want_test:
                    seen[word] = None
            self._words[split] = tuple(seen)
        return self._words[split]

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        if answer is None:
            match = self._prompt.match(prompt.strip()) if isinstance(prompt, str) else None
            answer = match.group(1)[::-1] if match else None
        return _exact(completion, answer)


class ArithTask(Task):
    name = "arith"
    splits = ("train", "test")
    description = "single-digit + - * table"
    _prompt = re.compile(r"^(\d)([-+*])(\d)=$")

    @staticmethod
    def solve(a: int, op: str, b: int) -> int:
        return a + b if op == "+" else a - b if op == "-" else a * b

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        pool = [
            Example(prompt=f"{a}{op}{b}=", answer=str(self.solve(a, op, b)), meta={"a": a, "op": op, "b": b})
            for op in "+-*"
            for a in range(10)
            for b in range(10)
        ]
        random.Random(seed).shuffle(pool)
        return pool if n is None else pool[:n]

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        if answer is None:
            match = self._prompt.match(prompt.strip()) if isinstance(prompt, str) else None
            answer = str(self.solve(int(match[1]), match[2], int(match[3]))) if match else None
        return _exact(completion, answer)
