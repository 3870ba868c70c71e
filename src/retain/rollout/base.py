"""The rollout interface: sample completions for prompts. Methods and evaluation see only this.

An engine takes user prompts (plain text; it applies the chat template) and returns a ``Rollout``: for each prompt
``n`` completions, flattened prompt-major (sample ``i`` belongs to prompt ``i // n``). ``completion_ids`` end with
eos when the model stopped, and are cut at the first eos; ``texts`` hold the decoded completion without it.
Engines that keep their own copy of the weights (vLLM) refresh it in ``sync_weights`` after each update.

``RolloutEngine.generate`` is a template method: it seeds, lays out the request's rows (``n`` per prompt,
prompt-major), puts the model in sampling mode, asks the engine for its completion step (``complete``: the prompt
ids and raw completion ids of every row), then cuts each completion at its first eos, marks the truncated ones and
decodes the texts. An engine implements only ``complete`` (and, where it differs, the sampling mode).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from retain.data import encode_prompt


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


@dataclass
class SamplingRequest:
    """One ``generate`` call: ``n`` samples of each prompt (a prompt that shows a picture carries it:
    ``retain.tasks.base.PicturePrompt``)."""

    prompts: list[str]
    n: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 32
    greedy: bool = False
    seed: int | None = None

    @property
    def flat(self) -> list[str]:
        """The prompt of every row (sample), prompt-major."""
        return [p for p in self.prompts for _ in range(self.n)]

    @property
    def group(self) -> list[int]:
        """The index of every row's prompt in ``prompts``."""
        return [i for i in range(len(self.prompts)) for _ in range(self.n)]


class RolloutEngine(ABC):
    seeds_torch = True  # a request's seed seeds torch's global generator (engines that sample with torch)
    takes_pictures = False  # a prompt's picture reaches the model (a VLM's engine); text engines see only its text

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 256) -> None:
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.prompt_ids: dict[str, list[int]] = {}  # encode's cache

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        greedy: bool = False,
        seed: int | None = None,
    ) -> Rollout:
        return self.run(SamplingRequest(list(prompts), n, temperature, max_new_tokens, greedy, seed))

    def run(self, request: SamplingRequest) -> Rollout:
        """The shared work around the engine's completion step."""
        if request.seed is not None and self.seeds_torch:
            torch.manual_seed(request.seed)
        with self.sampling_mode():
            prompt_ids, completions = self.complete(request)
        return self.rollout(request, prompt_ids, [self.cut(c) for c in completions])

    @abstractmethod
    def complete(self, request: SamplingRequest) -> tuple[list[list[int]], list[list[int]]]:
        """The completion step: (prompt ids, completion ids) of every row of ``request.flat``, in that order. A
        completion that stopped holds the eos (tokens after it are cut here)."""

    @contextmanager
    def sampling_mode(self) -> Iterator[None]:
        """The model in eval mode under inference mode (its training mode restored after)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids under retain's chat template, cached per engine."""
        if prompt not in self.prompt_ids:
            self.prompt_ids[prompt] = encode_prompt(self.tok, prompt)
        return self.prompt_ids[prompt]

    def cut(self, completion: list[int]) -> list[int]:
        """A completion up to and with its first eos."""
        eos = self.tok.eos_token_id
        return completion[: completion.index(eos) + 1] if eos in completion else completion

    def rollout(self, request: SamplingRequest, prompt_ids: list[list[int]], completions: list[list[int]]) -> Rollout:
        eos = self.tok.eos_token_id
        truncated = [not (c and c[-1] == eos) for c in completions]
        texts = [self.tok.decode(c[:-1] if not t else c, skip_special_tokens=True)
                 for c, t in zip(completions, truncated)]
        return Rollout(request.flat, prompt_ids, completions, texts, request.group, truncated)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Engines sharing the training model's tensors need nothing here."""
