"""Choose the length of the embedded base's second pretraining phase (``retain.pretrain.SORT_PHASE``).

The phase continues the first-phase base at a constant lr on the first phase's mixture plus a little of the sort
task's pretrain split. At a constant lr the model after k steps of a longer run is the model a k-step run ends with
(same warmup, same draws), so one run probed every ``--every`` steps shows every candidate length. The rule, fixed
before the probe: the first probed step where the base's greedy accuracy on sort's held-out strings is in
[``--low``, ``--high``] and its pass@8 at least 0.5 (partial skill with on-policy signal), while every prior skill
stays at ≥ 0.97 greedy. Prints one JSON line per probe; the chosen step last.

    python scripts/calibrate_sort_phase.py --init /path/to/phase-one-base --steps 400 --every 25
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from retain.evaluate import evaluate
from retain.pretrain import SORT_MIXTURE, PretrainConfig, pretrain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--low", type=float, default=0.15)
    ap.add_argument("--high", type=float, default=0.35)
    ap.add_argument("--out", default="/tmp/retain-sort-phase")
    args = ap.parse_args()
    cfg = PretrainConfig(init=args.init, steps=args.steps, lr=args.lr, schedule="constant", warmup_steps=20,
                         mixture=dict(SORT_MIXTURE), eval_n=64, eval_samples=0)
    tok_holder: dict = {}
    chosen: list[int] = []
    started = time.perf_counter()

    def probe(step: int, model: torch.nn.Module) -> None:
        if step % args.every:
            return
        from retain.models.tokenizer import build_tokenizer

        tok = tok_holder.setdefault("tok", build_tokenizer())
        was_training = model.training
        model.eval()
        with torch.no_grad():
            sort = evaluate(model, tok, "sort", n=256, samples=8, seed=0)["sort"]
            prior = evaluate(model, tok, "prior", n=128, seed=0)
        model.train(was_training)
        prior_acc = {k: v["accuracy"] for k, v in prior.items()}
        row = {"step": step, "sort": sort["accuracy"], "sort_pass8": sort["pass_at_k"], **prior_acc,
               "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        if (not chosen and args.low <= sort["accuracy"] <= args.high and sort["pass_at_k"] >= 0.5
                and min(prior_acc.values()) >= 0.97):
            chosen.append(step)

    pretrain(cfg, args.out, on_step=probe)
    print(json.dumps({"chosen_steps": chosen[0] if chosen else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
