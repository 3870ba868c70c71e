"""A reduced grid of ``retain demo --full``'s stage-1 design, to show what the default's budget cannot: the sort
stage at --full's 160 steps (GRPO 32 prompts × 8, SFT 32 sequences, 8 checkpoints), SFT and GRPO, one lr (1e-4, where
the single-seed pilots had both methods learning) × seeds. Its report's verdicts use the same declared rules; with
one lr the frontier runs along the checkpoints only, so it is a check of the path, not the --full verdict.

    python scripts/reduced_full.py OUT [--seeds 0,1,2] [--lrs 1e-4]
"""

from __future__ import annotations

import argparse
import json
import sys

from retain.demo import PRESETS, DemoPreset, run_demo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="1e-4")
    args = ap.parse_args()
    full = PRESETS["full"]
    PRESETS["reduced-full"] = DemoPreset(
        name="reduced-full", sequence=["sort"], methods=["sft", "grpo"], steps=full.steps,
        checkpoints=full.checkpoints, seeds=[int(s) for s in args.seeds.split(",")],
        lrs=[float(x) for x in args.lrs.split(",")],
    )
    summary = run_demo(args.out, preset="reduced-full")
    print(json.dumps({"wall_seconds": summary["wall_seconds"], "peak_rss_mb": summary["peak_rss_mb"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
