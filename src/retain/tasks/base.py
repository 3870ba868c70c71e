"""The task interface every task family implements.

A task turns a seed into examples for a split, knows every correct answer it can enumerate, and scores a
completion. The completion is whatever the model wrote after the assistant marker, up to end-of-sequence:
hostile input, so scoring never evaluates it as code and does bounded work on it.

Conventions shared by every task:
- ``reward(prompt, completion)`` returns a float in [0, 1]; ``CORRECT`` (1.0) means correct. Partial rewards
  (a legal but wrong expression, say) are strictly below 1.0 and a task documents them.
- ``is_correct(prompt, completion)`` is ``reward(...) >= CORRECT``.
- ``as_reward_fn()`` gives the TRL-style callable ``f(prompts, completions, **columns) -> list[float]``.
- ``examples(split, n, seed)`` is deterministic in ``(split, n, seed)`` and the splits of one task never share a
  prompt: sequence tasks also expose a ``pretrain`` split, disjoint from ``train``/``test``, that the base model
  sees a little of so on-policy sampling has signal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Self, Sequence

from retain.errors import RetainError

CORRECT = 1.0
MAX_COMPLETION_CHARS = 256  # longer completions are truncated before any parsing: bounded work per completion


class PicturePrompt(str):
    """A visual task's prompt: the question's text (what the model reads after the picture), with the picture it asks
    about (``image``, a scene of ``retain.vision.render``) and that picture's reference ``answer``.

    It *is* its text (a ``str``), so every part that passes prompts around — data sources, replay, rollouts, rewards —
    carries the picture with it unchanged, and only the places that encode a prompt for a model look at ``image``
    (``retain.vision.kind``). The ``answer`` is there because the picture's content is not in the text: a visual
    reward called without an answer column reads it from here (the model never sees it: it is not encoded). Two
    picture prompts are equal only when their text and picture are."""

    image: Any
    answer: str | None

    def __new__(cls, text: str, image: Any, answer: str | None = None) -> Self:
        prompt = super().__new__(cls, text)
        prompt.image, prompt.answer = image, answer
        return prompt

    def __getnewargs__(self) -> tuple[str, Any, str | None]:  # type: ignore[override] - copy and pickle keep the picture
        return str(self), self.image, self.answer

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and str.__eq__(self, other) and getattr(other, "image", None) == self.image

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((str(self), self.image))


def shown_answer(prompt: str, answer: str | None) -> str | None:
    """The reference a visual reward checks against: the ``answer`` column when given, else the picture prompt's own."""
    return answer if answer is not None else getattr(prompt, "answer", None)


@dataclass(frozen=True)
class Example:
    """One prompt with its answers.

    ``answer`` is the canonical SFT target text; ``answers`` every correct answer the task enumerated (it holds
    ``answer``), so SFT target selection (random / most likely / least likely under a model) has a choice.
    """

    prompt: str
    answer: str
    answers: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    image: Any = None  # a visual task's picture: a scene of retain.vision.render (``.render()`` draws it)

    def __post_init__(self) -> None:
        if not self.answers:
            object.__setattr__(self, "answers", (self.answer,))
        elif self.answer not in self.answers:
            object.__setattr__(self, "answers", (self.answer, *self.answers))


class Task(ABC):
    """A task family. Subclasses set ``name`` and ``splits`` and implement ``examples`` and ``reward``."""

    name: str = ""
    splits: tuple[str, ...] = ("train", "test", "ood")
    description: str = ""
    reward_name: str | None = None  # the qualified name of a user's reward function, when GRPO trains on one

    @abstractmethod
    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """Up to ``n`` examples of ``split`` (all of them when ``n`` is None), deterministic in the seed."""

    @abstractmethod
    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        """Score a completion for a prompt this task generated (``answer`` when the caller has it as a column)."""

    def is_correct(self, prompt: str, completion: str, answer: str | None = None) -> bool:
        return self.reward(prompt, completion, answer) >= CORRECT

    def as_reward_fn(self) -> Callable[..., list[float]]:
        """TRL-style reward callable: ``f(prompts, completions, **columns) -> list[float]``.

        An ``answer`` column, when present, is passed through; chat-format completions (lists of messages) are
        reduced to their last message's content, as TRL hands them.
        """

        def reward_fn(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
            answers = columns.get("answer") or [None] * len(completions)
            return [
                self.reward(_text(p), _text(c), a) for p, c, a in zip(prompts, completions, answers, strict=True)
            ]

        reward_fn.__name__ = f"{self.name}_reward"
        return reward_fn

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise RetainError(f"task {self.name!r} has no split {split!r} (splits: {', '.join(self.splits)})")


def clip_completion(completion: str) -> str:
    """The part of a completion a parser may look at: bounded length, first line, surrounding space stripped.
    Anything but a string (a caller's mistake, never a model's text) clips to the empty string."""
    if not isinstance(completion, str):
        return ""
    text = completion[:MAX_COMPLETION_CHARS]
    return text.split("\n", 1)[0].strip()


def _text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    return str(item)
