"""One SFT or GRPO stage of a VLM on a visual task: the picture travels with its prompt into the rollout, the reward
and the loss. Standalone and minimal (on-policy GRPO with μ = 1, β = 0, "grpo" aggregation; SFT on the reference
answers); the shared runner and the method parts (``retain.methods``) do not take pictures yet.

Both objectives run in ``retain.train.Trainer``, the one training loop, and use the losses of ``retain.losses``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from retain import tasks as task_registry
from retain.data import encode_answer
from retain.losses import aggregate, group_advantages, grpo_token_loss, token_logprobs
from retain.train import TrainConfig, Trainer
from retain.vision.engine import VisionEngine
from retain.vision.model import vision_prompt_text
from retain.vision.pretrain import VisionSFTObjective


def _prompt_ids(processor, prompt: str, image) -> list[int]:
    return list(processor(text=[vision_prompt_text(prompt)], images=[image])["input_ids"][0])


def task_sampler(processor, task_name: str, split: str = "train"):
    """Items (prompt ids, answer ids, scene) of a visual task's split, drawn uniformly with a random answer."""
    examples = task_registry.get(task_name).examples(split, None, seed=0)
    tok = processor.tokenizer
    ids: dict[str, list[int]] = {}
    for e in examples:
        if e.prompt not in ids:
            ids[e.prompt] = _prompt_ids(processor, e.prompt, e.image.render())

    def sample(rng: random.Random, k: int):
        picks = [rng.choice(examples) for _ in range(k)]
        return [(ids[e.prompt], encode_answer(tok, rng.choice(e.answers)), e.image) for e in picks]

    return sample


@dataclass
class VisionRolloutBatch:
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    completion_mask: torch.Tensor  # [B, L-1], aligned with logits[:, :-1]
    advantages: torch.Tensor
    metrics: dict[str, float]


class VisionGRPOObjective:
    """Each step: ``prompts_per_step`` train examples, ``group_size`` samples each with their picture, scored by the
    task's reward against the example's reference answer; binary reward, group-relative advantages."""

    def __init__(self, model, processor, task_name: str, prompts_per_step: int = 4, group_size: int = 8,
                 temperature: float = 1.0, seed: int = 0) -> None:
        self.model, self.processor = model, processor
        self.task = task_registry.get(task_name)
        self.examples = self.task.examples("train", None, seed=0)
        self.engine = VisionEngine(model, processor)
        self.prompts_per_step, self.group_size, self.temperature, self.seed = (
            prompts_per_step, group_size, temperature, seed)
        self.max_new = getattr(self.task, "max_new_tokens", 16)

    @torch.no_grad()
    def batches(self, step: int) -> list[VisionRolloutBatch]:
        rng = random.Random(self.seed * 1_000_003 + step)
        chosen = rng.sample(self.examples, min(self.prompts_per_step, len(self.examples)))
        images = [e.image.render() for e in chosen]
        roll = self.engine.generate([e.prompt for e in chosen], images, n=self.group_size,
                                    temperature=self.temperature, max_new_tokens=self.max_new,
                                    seed=self.seed * 1_000_003 + step)
        rewards = [float(self.task.is_correct(chosen[g].prompt, t, chosen[g].answer))
                   for g, t in zip(roll.group, roll.texts)]
        advantages = group_advantages(rewards, self.group_size)
        pad = self.processor.tokenizer.pad_token_id
        seqs = [p + c for p, c in zip(roll.prompt_ids, roll.completion_ids)]
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        completion = torch.zeros((len(seqs), length - 1), dtype=torch.bool)
        for i, (p, c) in enumerate(zip(roll.prompt_ids, roll.completion_ids)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            completion[i, len(p) - 1 : len(p) + len(c) - 1] = True
        pixels = self.processor.image_processor([images[g] for g in roll.group], return_tensors="pt")["pixel_values"]
        metrics = {"reward": sum(rewards) / len(rewards)}
        return [VisionRolloutBatch(input_ids, pixels, completion, advantages, metrics)]

    def loss(self, model: torch.nn.Module, batch: VisionRolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits[:, :-1]
        logp = token_logprobs(logits, batch.input_ids[:, 1:], self.temperature)
        per_token, stats = grpo_token_loss(logp, None, batch.advantages, mask=batch.completion_mask)
        loss = aggregate(per_token, batch.completion_mask, "grpo")
        return loss, {**batch.metrics, **{k: float(v) for k, v in stats.items()}}


def train_vision_stage(
    model, processor, task_name: str, method: Literal["sft", "grpo"], steps: int, lr: float = 1e-4,
    batch_size: int = 16, group_size: int = 8, seed: int = 0, log: Callable[[dict[str, Any]], None] | None = None,
) -> torch.nn.Module:
    """Train ``model`` in place for ``steps`` optimizer steps of ``method`` on ``task_name``'s train split (SFT:
    ``batch_size`` sequences a step; GRPO: ``batch_size // group_size`` prompts x ``group_size`` samples)."""
    if method == "sft":
        objective: Any = VisionSFTObjective(task_sampler(processor, task_name), processor, batch_size, seed)
    elif method == "grpo":
        objective = VisionGRPOObjective(model, processor, task_name, max(1, batch_size // group_size), group_size,
                                        seed=seed)
    else:
        raise ValueError(f"unknown method {method!r} (sft, grpo)")
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, log_every=1, fused=False)
    return Trainer(model, objective, cfg, log=log).run()


__all__ = ["VisionGRPOObjective", "train_vision_stage", "task_sampler"]
