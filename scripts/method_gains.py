"""Each method alone, one stage on one new task from the embedded base model: held-out accuracy before and after.

    .venv/bin/python scripts/method_gains.py --task countdown --seeds 0 1 --out runs/method_gains.json

A check that every method learns (the closing-note table of the methods issue), not a comparison of methods:
budgets are small and learning rates are the presets'.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from retain.evaluate import evaluate
from retain.methods.build import train_stage
from retain.methods.config import PRESETS
from retain.methods.stage import MethodState
from retain.models.loading import load_model

SKIP = {"rl_sample_sft"}  # needs a finished RL run's model (source_model); exercised in tests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="countdown")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--methods", nargs="*", default=[m for m in PRESETS if m not in SKIP])
    parser.add_argument("--out", default="runs/method_gains.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    base, tok = load_model("base")
    before = evaluate(base, tok, [args.task], n=args.n)[args.task]["accuracy"]
    before_train = evaluate(base, tok, [args.task], n=args.n, split="train")[args.task]["accuracy"]
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            model, _ = load_model("base")
            spec = {"name": method, "train": {"steps": args.steps}}
            if method == "grpo":
                spec["data"] = {"prompts_per_step": 16, "group_size": 8}
            started = time.perf_counter()
            # multitask trains on every task seen so far: one earlier task makes it differ from plain SFT
            seen = [("kg" if args.task != "kg" else "countdown")] if method == "multitask" else []
            model = train_stage(model, tok, args.task, spec, seed=seed, state=MethodState(), seen_tasks=seen)
            seconds = time.perf_counter() - started
            after = evaluate(model, tok, [args.task], n=args.n)[args.task]["accuracy"]
            after_train = evaluate(model, tok, [args.task], n=args.n, split="train")[args.task]["accuracy"]
            prior = evaluate(model, tok, "prior", n=args.n)
            rows.append({"method": method, "seed": seed, "before": before, "after": after, "gain": after - before,
                         "train_before": before_train, "train_after": after_train,
                         "prior_mean": sum(v["accuracy"] for v in prior.values()) / len(prior),
                         "train_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"task": args.task, "n": args.n, "steps": args.steps, "rows": rows}, f, indent=1)
    print("\n| method | seed | held-out before → after | train prompts before → after | prior mean after | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seed']} | {r['before']:.3f} → {r['after']:.3f} | "
              f"{r['train_before']:.3f} → {r['train_after']:.3f} | {r['prior_mean']:.3f} | {r['train_seconds']} |")


if __name__ == "__main__":
    main()
