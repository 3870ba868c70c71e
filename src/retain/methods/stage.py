"""What a method sees of the run while it trains one stage, and what it keeps between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from retain.kind import TEXT, TextModels
from retain.rollout import EngineChoice
from retain.tasks import Task


@dataclass
class MethodState:
    """Carried from stage to stage within one run (and saved with it): replay buffers, EWC's Fisher and anchor."""

    replay: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # task -> (prompt, answer) pairs
    fisher: dict[str, torch.Tensor] | None = None
    anchor: dict[str, torch.Tensor] | None = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, part in (("fisher.", self.fisher), ("anchor.", self.anchor)):
            for name, tensor in (part or {}).items():
                out[prefix + name] = tensor.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], replay: dict[str, list[Any]]) -> "MethodState":
        """The state ``to_tensors`` and the replay buffers (``retain.methods.replay_record``, pictures restored) saved."""
        fisher = {k[len("fisher."):]: v for k, v in tensors.items() if k.startswith("fisher.")} or None
        anchor = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")} or None
        return cls({t: [tuple(p) for p in pairs] for t, pairs in replay.items()}, fisher, anchor)


@dataclass
class StageContext:
    """One stage: the model being trained (it is updated in place), its frozen starting copy, the task."""

    model: torch.nn.Module
    reference: torch.nn.Module  # the stage's starting model, frozen (GRPO's KL, kl_sft, LwF, L2-SP, self-SFT)
    tokenizer: PreTrainedTokenizerBase
    task_name: str
    task: Task
    stage_index: int  # 0-based
    seen_tasks: list[str]  # tasks of the earlier stages, in order
    seed: int
    state: MethodState
    engine: EngineChoice = "kv_cache"  # an engine name, or a factory (retain.rollout.make_engine)
    log: Any = None
    kind: TextModels | Any = TEXT  # the model's kind (retain.kind): how a prompt, and its picture, reach the model
