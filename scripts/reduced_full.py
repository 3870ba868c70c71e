"""A reduced grid of ``retain demo --full``: the full preset's design (its budgets per step, warmup, checkpoints,
evaluation columns and declared findings) on fewer methods, seeds, lrs or steps, to show what the default's budget
cannot at a compute this machine affords. Its report's verdicts use the same declared rules; with one lr the frontier
runs along the checkpoints only, and with 2 seeds most intervals are wide, so it is a check of the path, not the
--full verdict. The compute it used is in DIR/demo.json (wall time, peak memory) and printed at the end.

    python scripts/reduced_full.py OUT [--methods sft,grpo] [--sequence sort] [--steps 160] [--seeds 0,1,2]
                                       [--lrs 1e-4] [--checkpoints 8]
"""

from __future__ import annotations

import argparse
import json
import sys

from retain.demo import PRESETS, DemoPreset, run_demo


def main() -> int:
    full = PRESETS["full"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--methods", default="sft,grpo")
    ap.add_argument("--sequence", default="sort", help="comma-separated stage tasks (--full: sort,gpoints)")
    ap.add_argument("--steps", type=int, default=full.steps)
    ap.add_argument("--checkpoints", type=int, default=full.checkpoints)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="1e-4")
    args = ap.parse_args()
    PRESETS["reduced-full"] = DemoPreset(**{
        **full.model_dump(), "name": "reduced-full", "sequence": args.sequence.split(","),
        "methods": args.methods.split(","), "steps": args.steps, "checkpoints": args.checkpoints,
        "seeds": [int(s) for s in args.seeds.split(",")], "lrs": [float(x) for x in args.lrs.split(",")]})
    summary = run_demo(args.out, preset="reduced-full")
    print(json.dumps({"wall_seconds": summary["wall_seconds"], "peak_rss_mb": summary["peak_rss_mb"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
