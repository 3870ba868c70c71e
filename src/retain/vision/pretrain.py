"""``retain pretrain --vision``: the embedded VLM, trained on CPU from the embedded text base, deterministic per seed.

Two phases, as LLaVA-style models are built, scaled down to minutes:

1. **Vision tower** (``aux_steps``): the fresh CLIP tower learns to see what the scenes are made of, with linear read-out
   heads over its patch features predicting each scene's parts (a card slot's rank and ink, a grid cell's shape and
   colour, a number's digits). Only the tower's small forward runs, so hundreds of steps take a minute or two; the
   heads are dropped afterwards.
2. **Joint model** (``steps``): the whole VLM (tower, projector, language model) trained with next-token loss on a
   mixture of the text prior skills (replayed, so they are kept), card recognition and a small share of each visual
   sequence task's ``pretrain`` split (so the base can partly solve them and on-policy RL has signal).

Pictures are drawn from training splits only (``cards``: train; the others: pretrain), each time with a fresh nuisance
seed (jitter, noise). Output: a HF directory (safetensors, processor) with ``eval.json`` and ``pretrain.json``.
"""

from __future__ import annotations

import dataclasses
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from retain import tasks as task_registry
from retain.data import TokenPair, encode_answer, encode_prompt
from retain.files import atomic_write_json
from retain.methods.sft import SFTObjective
from retain.pictures import PictureInputs
from retain.pretrain import check_mixture, pretrain_split
from retain.train import TrainConfig, Trainer, lr_lambda, seed_everything
from retain.vision.model import VISION_EMBEDDED_DIR, VISION_PRESETS, build_vlm, vision_prompt_text
from retain.vision.render import COLORS, SHAPES, CardScene, NumberScene, ShapeScene

VISION_MIXTURE = {
    "facts": 0.16, "reverse": 0.09, "arith": 0.09, "gpoints": 0.04, "kg": 0.02, "countdown": 0.02,
    "cards": 0.28, "gpoints_vl": 0.12, "vcount": 0.045, "vcolor": 0.045, "vspatial": 0.045, "vdigits": 0.045,
}  # fmt: skip
TEXT_EVAL = ("facts", "reverse", "arith")
VISUAL_EVAL = (("cards", "test"), ("cards", "ood"), ("gpoints_vl", "test"), ("gpoints_vl", "ood"),
               ("gpoints_vl", "ood_visual"), ("vcount", "test"), ("vcolor", "test"), ("vspatial", "test"),
               ("vdigits", "test"))  # fmt: skip


class VisionPretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = "base"
    vision: str = "tiny"
    seed: int = 0
    aux_steps: int = Field(400, ge=0, description="phase 1: vision-tower steps on the scenes' parts")
    aux_batch_size: int = Field(128, ge=1)
    aux_lr: float = Field(2e-3, gt=0)
    steps: int = Field(200, ge=0, description="phase 2: joint next-token steps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    mixture: dict[str, float] = Field(default_factory=lambda: dict(VISION_MIXTURE))
    eval_n: int = Field(100, ge=1, description="prompts per task and split in the final evaluation")
    eval_samples: int = Field(16, ge=0, description="K for pass@K in the final evaluation (0: greedy only)")
    threads: int = Field(1, ge=1, description="torch threads; results are deterministic per seed for a thread count "
                         "(one thread ran ~3x faster than two on the shared 2-core VM)")

    @field_validator("vision")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in VISION_PRESETS:
            raise ValueError(f"unknown vision preset {v!r} (presets: {', '.join(VISION_PRESETS)})")
        return v

    @field_validator("mixture")
    @classmethod
    def _known_tasks(cls, v: dict[str, float]) -> dict[str, float]:
        return check_mixture(v, pictures=True)


def is_visual(task_name: str) -> bool:
    return getattr(task_registry.get(task_name), "modality", "text") == "image"


# ------------------------------------------------------------------------------------- phase 1: the vision tower

CARD_SLOTS, CELLS, DIGITS = 3, 9, 3
COLOR_NAMES = list(COLORS)
# scene kind -> sizes of its read-out heads, in the order ``scene_labels`` lists the labels
HEADS: dict[type, list[int]] = {
    CardScene: [13] * CARD_SLOTS + [2] * CARD_SLOTS,
    ShapeScene: [1 + len(SHAPES)] * CELLS + [1 + len(COLORS)] * CELLS,
    NumberScene: [11] * DIGITS + [len(COLORS)],
}


def scene_labels(scene: Any) -> list[int]:
    """The class of each part of ``scene`` (see ``HEADS``): what the vision tower must read off the picture."""
    if isinstance(scene, CardScene):
        ranks = list(scene.ranks) + [1] * (CARD_SLOTS - len(scene.ranks))
        red = [int(s in ("heart", "diamond")) for s in scene.suits] + [0] * (CARD_SLOTS - len(scene.suits))
        return [r - 1 for r in ranks[:CARD_SLOTS]] + red[:CARD_SLOTS]
    if isinstance(scene, ShapeScene):
        kinds, colors = [0] * CELLS, [0] * CELLS
        for cell, kind, color in scene.items:
            kinds[cell], colors[cell] = 1 + SHAPES.index(kind), 1 + COLOR_NAMES.index(color)
        return kinds + colors
    if isinstance(scene, NumberScene):
        digits = [1 + int(c) for c in scene.text] + [0] * (DIGITS - len(scene.text))
        return digits[:DIGITS] + [COLOR_NAMES.index(scene.color)]
    raise TypeError(f"no read-out heads for {type(scene).__name__}")


class PartsReadout(torch.nn.Module):
    """The vision tower with one linear read-out per scene kind over its flattened patch features."""

    def __init__(self, tower: torch.nn.Module, hidden: int, patches: int) -> None:
        super().__init__()
        self.tower = tower
        self.heads = torch.nn.ModuleDict({kind.__name__: torch.nn.Linear(hidden * patches, sum(sizes))
                                          for kind, sizes in HEADS.items()})

    def loss(self, pixel_values: torch.Tensor, kind: type, labels: torch.Tensor) -> torch.Tensor:
        features = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # patches, class token dropped
        logits = self.heads[kind.__name__](features.flatten(1))
        total, at = 0.0, 0
        for j, size in enumerate(HEADS[kind]):
            total = total + F.cross_entropy(logits[:, at : at + size], labels[:, j])
            at += size
        return total / len(HEADS[kind])


def scene_pools(mixture: dict[str, float]) -> dict[type, list[Any]]:
    """Every training scene of the mixture's visual tasks, by scene kind."""
    pools: dict[type, list[Any]] = {}
    for name in mixture:
        if mixture[name] > 0 and is_visual(name):
            for e in task_registry.get(name).examples(pretrain_split(name), None, seed=0):
                pools.setdefault(type(e.image), []).append(e.image)
    return pools


def train_vision_tower(model, processor, cfg: VisionPretrainConfig, log: Callable[[dict], None]) -> None:
    if cfg.aux_steps == 0:
        return
    pools = scene_pools(cfg.mixture)
    kinds = sorted(pools, key=lambda k: k.__name__)
    vision_cfg = model.config.vision_config
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    readout = PartsReadout(model.model.vision_tower, vision_cfg.hidden_size, patches)
    optimizer = torch.optim.AdamW(readout.parameters(), lr=cfg.aux_lr)
    shape = TrainConfig(steps=cfg.aux_steps, lr=cfg.aux_lr, schedule="cosine", warmup_steps=min(20, cfg.aux_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(shape))
    rng = random.Random(f"vision-tower/{cfg.seed}")
    readout.train()
    for step in range(cfg.aux_steps):
        kind = kinds[step % len(kinds)]  # one kind per step: every head gets the same share
        scenes = [dataclasses.replace(rng.choice(pools[kind]), seed=rng.randrange(1 << 30))
                  for _ in range(cfg.aux_batch_size)]
        pixels = processor.image_processor([s.render() for s in scenes], return_tensors="pt")["pixel_values"]
        labels = torch.tensor([scene_labels(s) for s in scenes])
        loss = readout.loss(pixels, kind, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(readout.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, cfg.aux_steps // 20) == 0:
            log({"phase": "vision", "step": step + 1, "loss": float(loss.detach()), "kind": kind.__name__})


# ------------------------------------------------------------------------------------- phase 2: the joint model


def vision_sampler(processor, mixture: dict[str, float]) -> Callable[[random.Random, int, int], list[TokenPair]]:
    """SFT items of the mixture (``SFTObjective``'s sampler): a visual example's picture is drawn afresh each time
    (a new nuisance seed: jitter, noise) and handed with its pixel values; text examples are text items."""
    tok = processor.tokenizer
    names = [n for n, w in mixture.items() if w > 0]
    weights = [mixture[n] for n in names]
    pools: dict[str, list[tuple[list[int], list[list[int]], Any]]] = {}
    prompt_ids: dict[str, list[int]] = {}
    for name in names:
        visual = is_visual(name)
        pool = []
        for e in task_registry.get(name).examples(pretrain_split(name), None, seed=0):
            if visual:
                if e.prompt not in prompt_ids:  # a picture always expands to the same number of tokens
                    prompt_ids[e.prompt] = processor(text=[vision_prompt_text(e.prompt, processor)],
                                                     images=[e.image.render()])["input_ids"][0]
                ids = list(prompt_ids[e.prompt])
            else:
                ids = encode_prompt(tok, e.prompt)
            pool.append((ids, [encode_answer(tok, a) for a in e.answers], e.image))
        pools[name] = pool

    def sample(rng: random.Random, k: int, step: int) -> list[TokenPair]:
        out: list[TokenPair] = []
        for name in rng.choices(names, weights, k=k):
            ids, answers, scene = rng.choice(pools[name])
            if scene is None:
                out.append((ids, rng.choice(answers)))
                continue
            scene = dataclasses.replace(scene, seed=rng.randrange(1 << 30))
            pixels = processor.image_processor([scene.render()], return_tensors="pt")["pixel_values"]
            out.append((ids, rng.choice(answers), PictureInputs(pixels)))
        return out

    return sample


# ------------------------------------------------------------------------------------- the whole run


def evaluate_vlm(model, processor, n: int, samples: int, seed: int = 0, visual: tuple[str, ...] | None = None
                 ) -> dict[str, Any]:
    """Text prior skills (through the language model alone) and every split of the ``visual`` tasks (default: all)
    in ``VISUAL_EVAL`` (pass@K on the test splits; the OOD splits greedy only, as sampling dominates the time)."""
    from retain.vision.kind import VisionModels

    evaluate = VisionModels(None, processor).evaluator(model, processor.tokenizer, "kv_cache")
    scores = {name: evaluate(name, n=n, samples=samples, seed=seed) for name in TEXT_EVAL}
    for name, split in VISUAL_EVAL:
        if visual is not None and name not in visual:
            continue
        scores[name if split == "test" else f"{name}@{split}"] = evaluate(
            name, n=n, samples=samples if split == "test" else 0, split=split, seed=seed)
    return scores


def pretrain_vision(
    cfg: VisionPretrainConfig, out: str | Path = VISION_EMBEDDED_DIR, log: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Build the VLM on ``cfg.base``, train both phases, evaluate, and write it to ``out`` (atomically)."""
    log = log or (lambda record: None)
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain_vision(cfg, out, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain_vision(cfg: VisionPretrainConfig, out: Path, log: Callable[[dict], None]) -> dict[str, Any]:
    started = time.perf_counter()
    seed_everything(cfg.seed)
    model, processor = build_vlm(cfg.base, cfg.vision)
    train_vision_tower(model, processor, cfg, log)
    vision_seconds = time.perf_counter() - started
    objective = SFTObjective(vision_sampler(processor, cfg.mixture), processor.tokenizer.pad_token_id, cfg.batch_size,
                             seed=cfg.seed)
    train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, schedule="cosine", warmup_steps=min(cfg.warmup_steps, cfg.steps),
                            min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, log_every=max(1, cfg.steps // 20),
                            max_grad_norm=1.0, fused=False)
    if cfg.steps:
        model = Trainer(model, objective, train_cfg, log=lambda r: log({"phase": "joint", **r})).run()
    train_seconds = time.perf_counter() - started
    model.eval()
    visual = tuple(name for name in cfg.mixture if is_visual(name))  # the text prior skills are always evaluated
    scores = evaluate_vlm(model, processor, cfg.eval_n, cfg.eval_samples, cfg.seed, visual)
    summary = {
        "config": cfg.model_dump(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_parameters": sum(p.numel() for p in model.model.vision_tower.parameters())
        + sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "vision_seconds": round(vision_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    atomic_write_json(tmp / "eval.json", scores)
    atomic_write_json(tmp / "pretrain.json", summary)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"eval": scores, **summary}
