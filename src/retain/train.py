"""The one training loop. Every method — pretraining, SFT, GRPO, distillation — runs through ``train``.

A method supplies an ``Objective``: ``batches(step)`` returns the micro-batches of one optimizer step (an on-policy
method samples them from the current model here) and ``loss(model, micro)`` returns that micro-batch's share of
the step's loss — normalised by the whole step's denominator (its token count, say), so the micro-batch losses
add up to the loss of the full batch and gradient accumulation changes nothing — and a dict of metrics. Everything a method would otherwise repeat lives here:
accelerate (one process or DDP), gradient accumulation, clipping, the learning-rate schedule, seeding,
non-finite guards, periodic metrics and atomic checkpoints with resume.

Non-finite handling: a NaN/inf loss or gradient norm skips that optimizer step (no weights change) and is logged;
``max_nonfinite`` consecutive skips (or ``on_nonfinite="stop"``) raise ``NonFiniteLoss`` without touching the last
checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from retain.files import atomic_write_json, fault_point, read_json, remove_dir, verify_manifest, write_manifest


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf losses past the configured tolerance."""


class TrainConfig(BaseModel):
    """Optimiser, schedule and loop settings shared by every method."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=0, description="optimizer steps")
    lr: float = Field(1e-4, gt=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / lr for cosine and linear")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = Field(10, ge=1, description="consecutive skipped steps before stopping")
    fused: bool = Field(
        True, description="train through retain.models.fused: RMSNorm, rotary embedding and SwiGLU of Qwen2/Llama "
        "layers as autograd Functions with hand-written backwards (the same math, fewer kernels; ~1.06-1.12x per step "
        "on CPU); other architectures are left as they are",
    )
    compile: bool = Field(
        False, description="torch.compile the training forward/backward (dynamic shapes): a one-off compile of tens of "
        "seconds for faster steps; worth it for runs of hundreds of steps, not for the demo's short stages",
    )


class Objective(Protocol):
    def batches(self, step: int) -> list[Any]: ...

    def loss(self, model: torch.nn.Module, micro: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Work inside (an evaluation) must not change what training draws next, so resuming gives the same run."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warmup, then constant / cosine / linear decay to min_lr_ratio."""

    def at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return at


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)


class Trainer:
    """Owns the model, optimizer and schedule of one training run; ``run()`` trains to ``cfg.steps``."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        cfg: TrainConfig,
        checkpoint_dir: str | Path | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
        accelerator: Any = None,
        on_step: Callable[[int, torch.nn.Module], None] | None = None,
    ) -> None:
        from accelerate import Accelerator

        seed_everything(cfg.seed)
        self.cfg = cfg
        self.objective = objective
        self.on_step = on_step  # called after every optimizer step (and its checkpoint) with (step, model)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.world = self.accelerator.num_processes  # > 1 under accelerate launch / torchrun: DDP (see _one_step)
        main = self.accelerator.is_main_process
        self.log = (log or _ignore) if main else _ignore  # only the main process writes logs and checkpoints
        if cfg.fused:  # in place, before the optimizer and any compile: the same parameters, other module classes
            from retain.models.fused import fuse

            fuse(model)
        optimizer = make_optimizer(model, cfg)
        # The schedule steps once per optimizer step, not accelerate's once per process per step (its scheduler
        # wrapper assumes per-process batches): it stays unprepared.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # What the objective's loss runs: compiled on request. Only training forwards go through it; rollouts and
        # evaluation use the plain module (their cached decoding would only recompile).
        self.train_model = torch.compile(self.model, dynamic=True) if cfg.compile else self.model
        self.step = 0
        self.skipped = 0
        if self.checkpoint_dir and self.accelerator.is_main_process:  # the newest intact checkpoint, or none
            recover_checkpoint(self.checkpoint_dir)
        self.accelerator.wait_for_everyone()
        if self.checkpoint_dir and (self.checkpoint_dir / "trainer_state.json").exists():
            self.load_checkpoint(self.checkpoint_dir)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def run(self) -> torch.nn.Module:
        window: list[dict[str, float]] = []
        consecutive_bad = 0
        while self.step < self.cfg.steps:
            self.model.train()
            record, ok = self._one_step()
            if ok:
                consecutive_bad = 0
            else:
                self.skipped += 1
                consecutive_bad += 1
                self.log({"step": self.step, "event": "nonfinite_skip", **record})
                if self.cfg.on_nonfinite == "stop" or consecutive_bad >= self.cfg.max_nonfinite:
                    where = f"; last checkpoint kept at {self.checkpoint_dir}" if self.checkpoint_dir else ""
                    raise NonFiniteLoss(
                        f"non-finite loss or gradient at step {self.step} "
                        f"({consecutive_bad} consecutive){where}"
                    )
            window.append(record)
            self.step += 1
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                self.log({"step": self.step, **_mean(window)})
                window = []
            if self.checkpoint_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(self.checkpoint_dir)
            if self.on_step is not None:
                self.on_step(self.step, self.unwrapped)
        return self.unwrapped

    def _one_step(self) -> tuple[dict[str, float], bool]:
        micros = self._my_share(self.objective.batches(self.step))
        world = self.world
        self.optimizer.zero_grad(set_to_none=True)
        metrics: list[dict[str, float]] = []
        finite = True
        for i, micro in enumerate(micros):
            sync = i == len(micros) - 1
            with nullcontext() if sync else self.accelerator.no_sync(self.model):
                loss, m = self.objective.loss(self.train_model, micro)
                if not torch.isfinite(loss).item():
                    finite = False
                    metrics.append({"loss": float("nan")})
                    if world == 1:
                        break
                    self.accelerator.backward(loss * world)  # the other ranks wait in this step's all-reduce
                    continue
                # DDP averages gradients over ranks; × world turns that average into the sum over every rank's
                # micro-batches, each normalised by the whole step's denominator: the 1-process gradient.
                self.accelerator.backward(loss * world if world > 1 else loss)
            metrics.append({"loss": float(loss.detach()), **m})
        record = _mean(metrics)  # other metrics: this rank's micro-batches (the main process's are logged)
        record["loss"] = sum(m["loss"] for m in metrics)
        if world > 1:  # the step's loss over every rank; a non-finite loss anywhere skips the step everywhere
            totals = self.accelerator.reduce(
                torch.tensor([record["loss"], float(not finite)], dtype=torch.float64, device=self.accelerator.device),
                "sum",
            )
            record["loss"], finite = float(totals[0]), bool(totals[1] == 0)
        if finite:
            if self.cfg.max_grad_norm is not None:
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            else:
                norm = _grad_norm(self.model)
            record["grad_norm"] = float(norm)
            finite = math.isfinite(record["grad_norm"])
        if finite:
            record["lr"] = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return record, finite

    def _my_share(self, micros: list[Any]) -> list[Any]:
        """This rank's contiguous share of the step's micro-batches (all of them in one process)."""
        if self.world == 1:
            return micros
        if len(micros) < self.world:
            from retain.errors import RetainError

            raise RetainError(
                f"an optimizer step has {len(micros)} micro-batch(es) for {self.world} processes: set "
                f"micro_batch_size to at most the batch size / {self.world} so every process has one"
            )
        from retain.distributed import shard

        return shard(micros, self.accelerator.process_index, self.world)

    # --- checkpoints: model (safetensors), optimizer + schedule tensors, loop state, RNG; atomic by rename ---
    def save_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if not self.accelerator.is_main_process:
            return
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_model

        save_model(self.unwrapped, str(tmp / "model.safetensors"))  # every parameter, adapters included
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            tmp / "optimizer.pt",
        )
        torch.save(_rng_state(), tmp / "rng.pt")
        atomic_write_json(tmp / "trainer_state.json", {"step": self.step, "skipped": self.skipped})
        write_manifest(tmp)  # sha256 of every file: load verifies, and a damaged checkpoint is never used
        fault_point("checkpoint")
        old = path.with_name(path.name + ".old")
        remove_dir(old)
        if path.exists():
            os.replace(path, old)
        fault_point("checkpoint_swap")  # a kill here leaves only PATH.old: recover_checkpoint takes it
        os.replace(tmp, path)
        remove_dir(old)  # renamed away before it is deleted: never seen half deleted

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import load_model

        path = Path(path)
        load_model(self.unwrapped, str(path / "model.safetensors"))
        state = torch.load(path / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        meta = read_json(path / "trainer_state.json")
        self.step, self.skipped = int(meta["step"]), int(meta.get("skipped", 0))


def recover_checkpoint(path: str | Path) -> tuple[int | None, list[str]]:
    """Leave ``path`` holding the newest intact checkpoint (or nothing); return its step (None) and the problems met.

    A checkpoint is intact when its files match its ``manifest.json`` (sha256 and size) and its trainer_state.json
    reads. ``save_checkpoint`` moves PATH to PATH.old before renaming PATH.tmp into place, so a kill can leave
    PATH.old alone: it is taken back. A damaged PATH or PATH.old is reported (a logged warning) and removed; the
    temp directory of an unfinished save is removed unread."""
    import logging

    path = Path(path)
    old, tmp = path.with_name(path.name + ".old"), path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    problems: list[str] = []

    def step_of(d: Path) -> int | None:
        if not d.is_dir():
            return None
        problem = verify_manifest(d)
        if problem is None:
            try:
                return int(read_json(d / "trainer_state.json")["step"])
            except (OSError, ValueError, KeyError, TypeError):
                problem = f"{d / 'trainer_state.json'}: missing or unreadable"
        problems.append(problem)
        logging.getLogger("retain").warning("checkpoint %s is damaged and is not used: %s", d, problem)
        remove_dir(d)
        return None

    step = step_of(path)
    if step is None and old.is_dir():
        step = step_of(old)
        if step is not None:
            os.replace(old, path)
    remove_dir(old)
    return step, problems


def train(
    model: torch.nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> torch.nn.Module:
    """Train ``model`` on ``objective`` for ``cfg.steps`` optimizer steps; returns the (unwrapped) model."""
    return Trainer(model, objective, cfg, checkpoint_dir, log).run()


def _ignore(record: dict[str, Any]) -> None:
    pass


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in records for k in r}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in records if k in r and isinstance(r[k], (int, float))]
        if vals:
            out[k] = float(sum(vals) / len(vals))
    return out


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np.random.get_state()[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    py = tuple(int(x) for x in state["python"].tolist())
    random.setstate((3, py, None))
