"""The rollout interface: sample completions for prompts. Methods and evaluation see only this.

An engine takes user prompts (plain text; it applies the chat template) and returns a ``Rollout``: for each prompt
``n`` completions, flattened prompt-major (sample ``i`` belongs to prompt ``i // n``). ``completion_ids`` end with
eos when the model stopped, and are cut at the first eos; ``texts`` hold the decoded completion without it.
Engines that keep their own copy of the weights (vLLM) refresh it in ``sync_weights`` after each update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Rollout:
    prompts: list[str]  # one per sample
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    group: list[int]  # index of the sample's prompt in the request
    truncated: list[bool]  # stopped by max_new_tokens, not by eos

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def concat(cls, parts: Sequence["Rollout"]) -> "Rollout":
        """The rollouts of consecutive prompt lists as one (``group`` renumbered to index the joined prompts)."""
        out = cls([], [], [], [], [], [])
        offset = 0
        for part in parts:
            out.prompts += part.prompts
            out.prompt_ids += part.prompt_ids
            out.completion_ids += part.completion_ids
            out.texts += part.texts
            out.group += [g + offset for g in part.group]
            out.truncated += part.truncated
            offset += max(part.group, default=-1) + 1
        return out


class RolloutEngine(ABC):
    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        greedy: bool = False,
        seed: int | None = None,
    ) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Engines sharing the training model's tensors need nothing here."""
