"""What kind of model a run trains: the seam between the runner / method parts and a model's modality.

A *model kind* knows the few things that differ between a text model and a vision-language model, so that the
runner, the methods' parts (data source × token loss × regulariser), the evaluation and the shift measurement stay
one code path for both:

- ``resolve(spec)``: the model's directory (or hub name), checked; ``load(spec, ...)``: ``(model, tokenizer)``;
  ``saved_with(tokenizer)``: what is saved beside the weights (the tokenizer, or a VLM's processor);
- ``encode(tokenizer, prompt, answer)``: a training item's tokens (and, for a prompt that shows a picture, its pixel
  values: ``retain.data.TokenPair``); ``pixel_values(prompts)``: the pictures of rollout rows, stacked, or None;
- ``engine(choice)``: the rollout engine choice (a name, or a factory) the method parts and shift sample with;
- ``evaluator(model, tokenizer, engine)``: a function scoring one evaluation column;
- ``refusal(method, where)``: why a method cannot train this kind of model (None: it can).

``TEXT`` is the kind of every causal LM; ``retain.vision.kind.VisionModels`` is the VLM's. ``model_kind(spec)``
asks each kind in ``KINDS`` whether it claims the model (named by "module:class", imported only then, as the task
registry names the visual tasks: the core never imports the vision package).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from retain.data import TokenPair, encode_text
from retain.rollout import EngineChoice, make_engine

# (task name, n, samples, split, seed) -> the column's cell (accuracy, n, correct, halves, pass@K)
ColumnEvaluator = Callable[..., dict[str, Any]]


class TextModels:
    """Causal language models: prompts are text, batches have no pictures, every engine samples them."""

    name = "text"

    def resolve(self, spec: str | Path) -> str:
        from retain.models.loading import resolve_model_path

        return resolve_model_path(spec)

    def load(self, spec: Any, **options: Any) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        from retain.models.loading import load_model

        return load_model(spec, **options)

    def saved_with(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return tokenizer

    def encode(self, tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> TokenPair:
        return encode_text(tokenizer, prompt, answer)

    def pixel_values(self, prompts: Sequence[str]) -> torch.Tensor | None:
        return None

    def engine(self, choice: EngineChoice) -> EngineChoice:
        return choice

    def evaluator(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, engine: EngineChoice
                  ) -> ColumnEvaluator:
        from retain.evaluate import evaluate_task

        return partial(evaluate_task, make_engine(engine, model, tokenizer))

    def refusal(self, method: Any, where: str) -> str | None:
        return None


TEXT = TextModels()

# kinds besides text, each a class with ``claims(spec) -> bool`` and a constructor taking the spec
KINDS = ("retain.vision.kind:VisionModels",)


def model_kind(spec: str | Path) -> Any:
    """The kind of the model ``spec`` names: the first of ``KINDS`` that claims it, else ``TEXT``."""
    for name in KINDS:
        module, _, attr = name.partition(":")
        kind = getattr(importlib.import_module(module), attr)
        if kind.claims(spec):
            return kind(spec)
    return TEXT


__all__ = ["KINDS", "TEXT", "ColumnEvaluator", "TextModels", "model_kind"]
