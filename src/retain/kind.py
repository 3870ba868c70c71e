"""What kind of model a run trains: the seam between the runner / method parts and a model's modality.

A *model kind* knows the few things that differ between a text model and a vision-language model, so that the
runner, the methods' parts (data source × token loss × regulariser), the evaluation and the shift measurement stay
one code path for both:

- ``resolve(spec)``: the model's directory (or hub name), checked; ``load(spec, ...)``: ``(model, tokenizer)``;
  ``saved_with(tokenizer)``: what is saved beside the weights (the tokenizer, or a VLM's processor);
- ``encode(tokenizer, prompt, answer)``: a training item's tokens (and, for a prompt that shows a picture, its pixel
  inputs: ``retain.data.TokenPair``); ``pictures(prompts)``: the pictures of rollout rows (``retain.pictures``), or
  None;
- ``engine(choice)``: the rollout engine choice (a name, or a factory) the method parts and shift sample with;
- ``evaluator(model, tokenizer, engine)``: a function scoring one evaluation column;
- ``refusal(method, where)``: why a method cannot train this kind of model (None: it can).

``TEXT`` is the kind of every causal LM; ``retain.vision.kind.VisionModels`` is the VLM's. ``model_kind(spec)``
asks each kind in ``KINDS`` whether it claims the model (named by "module:class", imported only then, as the task
registry names the visual tasks: the core never imports the vision package), or takes the kind a config declares
(``model_kind: text | vlm``): a hub name not in the local cache cannot be told apart without a download.
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
from retain.errors import RetainError
from retain.pictures import PictureInputs
from retain.rollout import EngineChoice, make_engine

# (task name, n, samples, split, seed) -> the column's cell (accuracy, n, correct, halves, pass@K)
ColumnEvaluator = Callable[..., dict[str, Any]]


class TextModels:
    """Causal language models: prompts are text, batches have no pictures, every engine samples them."""

    name = "text"
    unused_parameters = False  # every parameter gets a gradient from a training forward (DDP need not look)

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

    def pictures(self, prompts: Sequence[str]) -> PictureInputs | None:
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

# kinds besides text, by the name ``model_kind`` declares them with: each a class with ``claims(spec) -> bool``,
# ``cannot_tell(spec) -> bool`` (a hub name not in the local cache), ``contradicts(spec) -> bool`` and a constructor
# taking the spec
KINDS = {"vlm": "retain.vision.kind:VisionModels"}
DECLARED = ("auto", "text", *KINDS)  # the values of the config's model_kind field


def _kind_class(name: str) -> Any:
    module, _, attr = KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def model_kind(spec: str | Path, declared: str = "auto") -> Any:
    """The kind of the model ``spec`` names. ``declared`` 'text' or a name of ``KINDS`` says it (a model whose config
    can be read and lacks what that kind needs is refused); 'auto' asks each kind in ``KINDS`` whether it claims the
    model — from a local directory's config.json or the local Hugging Face cache's, never the network — else ``TEXT``."""
    if declared == "text":
        return TEXT
    if declared != "auto":
        kind = _kind_class(declared)
        if kind.contradicts(spec):
            raise RetainError(f"model_kind: {declared!r}, but the config.json of model {str(spec)!r} has no vision "
                              "tower (model_kind: auto or text)")
        return kind(spec)
    for name in KINDS:
        kind = _kind_class(name)
        if kind.claims(spec):
            return kind(spec)
    return TEXT


def undetected(spec: str | Path) -> list[str]:
    """The kinds of ``KINDS`` that cannot tell whether they claim ``spec`` without a download (a hub name not in the
    local cache): under 'auto' such a model is taken as text."""
    return [name for name in KINDS if _kind_class(name).cannot_tell(spec)]


__all__ = ["DECLARED", "KINDS", "TEXT", "ColumnEvaluator", "TextModels", "model_kind", "undetected"]
