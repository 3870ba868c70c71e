"""A method part's life across one stage (Avalanche's plugin shape): a part builds itself from the stage's context,
may act when the stage ends, and says whether a boundary-free stream can run it.

The parts with a life beyond their loss term or data draw: EWC (its penalty, and the Fisher it adds at the end of
each stage: ``retain.methods.regularizers.EWC``), replay (its mixing, and the buffer it fills at the end:
``retain.methods.sources.WithReplay``) and the adapter (attached at the start, merged at the end when per stage:
``StageAdapter`` below). ``retain.methods.build.train_stage`` builds the parts, trains, then calls each part's
``end_stage``; streaming mode asks each part's ``streaming_refusal`` before it runs anything.
"""

from __future__ import annotations

from typing import Any

import torch

from retain.methods.stage import StageContext
from retain.models import adapters


class StagePart:
    """What every part may do beyond its loss term or its data draw; by default, nothing."""

    @classmethod
    def streaming_refusal(cls, cfg: Any, field: str) -> str | None:
        """Why a stream (no task boundaries, one Trainer) cannot run a part configured by ``cfg`` at config path
        ``field`` — the error message after "streaming mode: " — or None when it can."""
        return None

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        """Work when the stage's training is done, on the trained ``model``; returns the model the stage hands on."""
        return model


class StageAdapter(StagePart):
    """A LoRA adapter (``retain.methods.config.AdapterConfig``): attached before the stage trains (only the adapter
    trains), merged into the weights at the stage's end when ``per_stage``, else kept for the next stage."""

    def __init__(self, cfg: adapters.LoraSettings) -> None:
        self.cfg = cfg

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        return adapters.attach(model, self.cfg)

    def end_stage(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        return adapters.finish_stage(model, self.cfg)

    @classmethod
    def streaming_refusal(cls, cfg: adapters.LoraSettings, field: str) -> str | None:
        if cfg.per_stage:
            return f"{field}.per_stage: a per-stage adapter needs task boundaries"
        return (f"{field}: LoRA adapters are not supported in streaming mode "
                "(its mid-run checkpoints cannot resume a peft model)")
