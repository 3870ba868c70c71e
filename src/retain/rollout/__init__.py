"""Sampling engines behind one interface (``RolloutEngine``); ``make_engine`` picks one by name."""

from __future__ import annotations

from typing import Callable, Union

import torch
from transformers import PreTrainedTokenizerBase

from retain.errors import RetainError
from retain.rollout.base import Rollout, RolloutEngine, SamplingRequest

ENGINES = ("kv_cache", "hf", "vllm")
# old engine names, still accepted: "cached" named the KV-cache sampling loop, which is no cache of results
ENGINE_ALIASES = {"cached": "kv_cache"}


# an engine named in a config, or one injected by code (a test's stand-in): made for the model it samples from
EngineFactory = Callable[[torch.nn.Module, PreTrainedTokenizerBase], RolloutEngine]
EngineChoice = Union[str, EngineFactory]


def make_engine(name: EngineChoice, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                batch_size: int = 256) -> RolloutEngine:
    if callable(name):  # injected: the factory decides
        return name(model, tokenizer)
    name = ENGINE_ALIASES.get(name, name)
    if name == "kv_cache":
        from retain.rollout.hf import KVCacheSamplerEngine

        return KVCacheSamplerEngine(model, tokenizer, batch_size)
    if name == "hf":
        from retain.rollout.hf import HFGenerateEngine

        return HFGenerateEngine(model, tokenizer, batch_size)
    if name == "vllm":  # imported here only: CPU installs never import vllm
        from retain.rollout.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, batch_size)
    raise RetainError(f"unknown rollout engine {name!r} (engines: {', '.join(ENGINES)})")


__all__ = ["Rollout", "RolloutEngine", "SamplingRequest", "make_engine", "ENGINES", "ENGINE_ALIASES", "EngineChoice",
           "EngineFactory"]
