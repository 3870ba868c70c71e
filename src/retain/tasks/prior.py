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

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        # The pool is fixed (seed 0) so "the train split" is one set; the seed only orders it.
        rng = random.Random(f"reverse/{split}")
        want_test = split == "test"
        seen: set[str] = set()
        pool: list[Example] = []
        while len(pool) < self.size[split]:
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
            if word in seen or _in_test_half(word, self.test_share) != want_test:
                continue
            seen.add(word)
            pool.append(Example(prompt=f"reverse {word}", answer=word[::-1], meta={"word": word}))
        random.Random(seed).shuffle(pool)
        return pool if n is None else pool[:n]

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
