"""The multi-process side of tests/test_distributed.py (not a test module itself).

Run as ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT``: trains the embedded base model with
SFT, then GRPO (recording every rollout batch), then runs a whole one-stage ``retain run``; each rank writes what the
test compares into OUT. The one-process reference runs the same functions inside the test process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

SFT_TASK = "countdown"
SFT = {"name": "sft", "batch_size": 8, "train": {"steps": 3, "lr": 1e-3, "log_every": 1}}
GRPO_TASK = "countdown"
GRPO = {
    "name": "grpo", "data": {"prompts_per_step": 4, "group_size": 4}, "loss": {"beta": 0.04},
    "train": {"steps": 2, "lr": 1e-4, "log_every": 1},
}
RUN = {
    "name": "ddp", "model": "base", "method": SFT, "stages": [{"task": SFT_TASK}],
    "eval": {"tasks": [SFT_TASK], "n": 4}, "shift": {"prompts": 0},
}


def train(method: dict, task: str, log=None, engine="kv_cache") -> torch.nn.Module:
    from retain.methods.build import train_stage
    from retain.models.loading import load_model

    model, tokenizer = load_model("base")
    return train_stage(model, tokenizer, task, method, seed=0, log=log, engine=engine)


def capture_gradients() -> tuple[list[torch.Tensor], object]:
    """Every optimizer step's gradient as the optimizer sees it (all-reduced and clipped), flattened."""
    grads: list[torch.Tensor] = []

    def hook(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads.append(torch.cat([p.grad.detach().flatten().cpu() for p in params]))

    return grads, register_optimizer_step_pre_hook(hook)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from retain import distributed
    from retain.config import parse_experiment
    from retain.methods import grpo
    from retain.runner import run_experiment

    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"world": int(os.environ.get("WORLD_SIZE", "1"))}

    logs: list[dict] = []
    grads, hook = capture_gradients()
    model = train(SFT, SFT_TASK, logs.append)
    hook.remove()
    record["rank"] = distributed.rank()
    record["sft_losses"] = [r["loss"] for r in logs if "loss" in r]
    save_file(weights(model), str(out / f"sft_rank{record['rank']}.safetensors"))
    save_file({f"step{i}": g for i, g in enumerate(grads)}, str(out / f"sft_grads_rank{record['rank']}.safetensors"))

    rollouts: list[dict] = []
    generate = grpo.GRPOObjective._generate

    def recording(self, prompts, seed):
        roll = generate(self, prompts, seed)
        rollouts.append(dataclasses.asdict(roll))
        return roll

    grpo.GRPOObjective._generate = recording
    logs.clear()
    grads, hook = capture_gradients()
    model = train(GRPO, GRPO_TASK, logs.append)
    hook.remove()
    grpo.GRPOObjective._generate = generate
    record["grpo_losses"] = [r["loss"] for r in logs if "loss" in r]
    record["rollouts"] = rollouts
    save_file(weights(model), str(out / f"grpo_rank{record['rank']}.safetensors"))
    save_file({f"step{i}": g for i, g in enumerate(grads)}, str(out / f"grpo_grads_rank{record['rank']}.safetensors"))

    results = run_experiment(parse_experiment(RUN), out / "run")
    record["run_matrix"] = results["matrix"]
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
