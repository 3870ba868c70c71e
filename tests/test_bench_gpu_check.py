"""bench/gpu_check.sh --cpu: the GPU check's every path (SFT and GRPO stages of two models in fp32 and under bf16
autocast, TRL's trainers, ``retain run``) as a smoke test on the CPU; its JSON lines are read and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_reports_every_measurement():
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu"], capture_output=True, text=True,
                          env=env, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"check"')]
    checks = {(r["check"], r.get("model"), r.get("precision")) for r in lines}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[0]["check"] == "torch" and lines[0]["mode"] == "cpu smoke test"
    for model in ("embedded", "qwen2.5-0.5b-shape"):
        for stage in ("sft", "grpo"):
            assert (f"retain_{stage}", model, "fp32") in checks and (f"retain_{stage}", model, "bf16") in checks
            assert (f"{stage}_bf16_vs_fp32", model, None) in checks
    for stage in ("sft", "grpo"):  # --cpu runs TRL's trainers on the embedded model only (the suite's time budget)
        assert ("trl_" + stage, "embedded", "fp32") in checks and (stage + "_vs_trl", "embedded", "fp32") in checks
    scaled = [r for r in lines if r.get("model") == "qwen2.5-0.5b-shape" and r["check"].startswith("retain_")]
    assert all(r["scaled_down"] and "scaled-down" in r["note"] for r in scaled)  # it says it is not the 0.5B model
    sft = next(r for r in lines if r["check"] == "sft_bf16_vs_fp32" and r["model"] == "embedded")
    assert sft["ok"] and sft["rel_diff"] <= 0.05 and sft["loss_fp32"] != sft["loss_bf16"]  # autocast really ran
    run = next(r for r in lines if r["check"] == "retain_run")
    assert run["ok"] and len(run["matrix"]) == 3 and len(run["forward_kl"]) == 2
    assert lines[-1] == {"check": "summary", "ok": True, "failed": []}
