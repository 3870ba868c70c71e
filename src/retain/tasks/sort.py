"""Sorting letters: a new task with one uniform rule, which supervised and on-policy training can both learn on
held-out prompts.

    sort qbxeh        -> behqx         (5–7 lowercase letters, repeats allowed; the answer is the sorted string)

Why this task exists (issue "The main job decides", SPEC §2.4): on the embedded model, GeneralPoints and the
knowledge graph are learned by SFT on the *training* prompts only (+50 to +90 pts there, +4 held-out: Chu's "SFT
memorizes"), so a forgetting comparison at matched new-task gain has nothing to match on. A comparison needs a task
whose rule carries over to unseen prompts for both methods, and that the base model partly solves so GRPO has
signal. Sorting is one rule for every string; the embedded base sees a little of the ``pretrain`` split in a short
second pretraining phase (``retain pretrain --init``), enough to solve part of the held-out strings.

Splits are a stable hash partition of the string space (crc32, the same on every machine): ``pretrain`` 30%,
``train`` 40%, ``test`` 30%, so a held-out string was never trained on and the pretraining phase never saw a train
or test string. Pools are fixed (the seed only orders them).

Reward: 1.0 for the sorted string (after ``clip_completion``); ``PERMUTATION_REWARD`` (0.1) for another arrangement
of exactly the prompt's letters (the right letters, in the wrong order); 0.0 for anything else. ``binary`` GRPO
reward keeps only the 1.0.
"""

from __future__ import annotations

import random
import re
import zlib

from retain.tasks.base import CORRECT, Example, Task, clip_completion
from retain.tasks.prior import LETTERS

PERMUTATION_REWARD = 0.1
MIN_LEN, MAX_LEN = 5, 7
# the task's own prompt first; the others are what template-diverse SFT (``data.prompts: varied``) trains on, and
# the reward reads every one of them
TEMPLATES = ("sort {word}", "sort the letters {word}", "{word} in alphabetical order", "alphabetize: {word}",
             "letters {word}, sorted")
_WORD = f"([a-z]{{1,{MAX_LEN * 2}}})"
_PROMPTS = [re.compile(re.escape(t).replace(re.escape("{word}"), _WORD)) for t in TEMPLATES]
SHARES = (("pretrain", 0.3), ("train", 0.4), ("test", 0.3))  # of the string space, by a stable hash


def split_of(word: str) -> str:
    """The split a string belongs to: a stable hash partition, the same on every machine."""
    point = (zlib.crc32(f"sort/{word}".encode()) % 1000) / 1000
    edge = 0.0
    for name, share in SHARES:
        edge += share
        if point < edge:
            return name
    return SHARES[-1][0]


def read_word(prompt: str) -> str | None:
    """The letters a sort prompt (in any of its templates) asks to sort; None for any other text."""
    if not isinstance(prompt, str):
        return None
    for pattern in _PROMPTS:
        match = pattern.fullmatch(prompt.strip())
        if match:
            return match[1]
    return None


class SortTask(Task):
    name = "sort"
    splits = ("pretrain", "train", "test")
    description = f"sort {MIN_LEN}-{MAX_LEN} letters alphabetically"
    size = {"pretrain": 20_000, "train": 20_000, "test": 2_000}

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        rng = random.Random(f"sort/{split}")
        seen: set[str] = set()
        pool: list[Example] = []
        while len(pool) < self.size[split]:
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
            if word in seen or split_of(word) != split:
                continue
            seen.add(word)
            pool.append(Example(prompt=f"sort {word}", answer="".join(sorted(word)), meta={"word": word}))
        random.Random(seed).shuffle(pool)
        return pool if n is None else pool[:n]

    def prompt_variants(self, prompt: str) -> list[str]:
        """``prompt`` in every template of ``TEMPLATES`` (the first is the task's own); a prompt this task did not
        write is returned alone."""
        match = _PROMPTS[0].fullmatch(prompt)
        return [t.format(word=match[1]) for t in TEMPLATES] if match else [prompt]

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        word = read_word(prompt)
        if word is None:
            return 0.0
        target = "".join(sorted(word))
        got = clip_completion(completion)
        if got == target:
            return CORRECT
        return PERMUTATION_REWARD if sorted(got) == sorted(target) else 0.0
