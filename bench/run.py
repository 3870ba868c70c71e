"""retain's benchmarks, side by side with their reference, in one run: ``make bench`` (or ``python bench/run.py``).

Writes ``bench/results.json`` — a list of ``{"name", "retain", "reference", "unit", "ratio"}`` with ratio =
retain / reference (higher is better) — and prints a table. Every measurement runs in its own fresh process (same
thread count, nothing else loaded), the reference first, then retain. What each one measures, and how, is in the
docstring of its module: ``grpo.py``, ``sft.py``, ``rollout.py``, ``flops.py``.

Options: ``--quick`` (fewer timed steps, for a smoke run), ``--only NAME[,NAME]`` (a subset; results.json then holds
only those). Threads: ``BENCH_THREADS`` (default 2, this machine's cores). Measure on an otherwise idle machine: the
header reports the load average and any other busy process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name -> (module, goal, unit, reference label). The "_compiled" rows run retain with ``train.compile: true``
# (torch.compile of the training forward/backward; off by default) against the same reference measurement.
BENCHES = {
    "grpo_steps_per_s": ("grpo", 3.0, "steps/s", "TRL 1.16 GRPOTrainer, gradient checkpointing off"),
    "grpo_steps_per_s_vs_trl_defaults": ("grpo", 3.0, "steps/s", "TRL 1.16 GRPOTrainer, its defaults"),
    "sft_tokens_per_s": ("sft", 2.0, "tokens/s", "TRL 1.16 SFTTrainer, gradient checkpointing off"),
    "sft_tokens_per_s_vs_trl_defaults": ("sft", 2.0, "tokens/s", "TRL 1.16 SFTTrainer, its defaults"),
    "sft_tokens_per_s_compiled": ("sft", 2.0, "tokens/s", "TRL 1.16 SFTTrainer, gradient checkpointing off"),
    "rollout_tokens_per_s": ("rollout", 1.5, "tokens/s", "HFGenerateEngine (model.generate)"),
    "train_flops_fraction_of_matmul_peak": ("flops", 0.5, "GFLOP/s", "fp32 torch.mm peak"),
    "train_flops_fraction_of_matmul_peak_compiled": ("flops", 0.5, "GFLOP/s", "fp32 torch.mm peak"),
}


def _sizes(quick: bool) -> dict:
    if quick:
        return {"grpo": (2, 4), "sft": (3, 10), "rollout": (16, 1), "flops": (1, 2)}
    return {"grpo": (3, 25), "sft": (5, 80), "rollout": (64, 3), "flops": (2, 5)}


def measure(part: str, quick: bool) -> dict:
    """One side of one benchmark, in this process."""
    from common import quiet, setup_threads

    quiet()
    setup_threads()
    sizes = _sizes(quick)
    if part == "grpo.retain":
        import grpo

        return grpo.retain_grpo(*sizes["grpo"])
    if part in ("grpo.reference", "grpo.reference_trl_defaults"):
        import grpo

        return grpo.trl_grpo(*sizes["grpo"], gradient_checkpointing=part.endswith("_defaults"))
    if part in ("sft.retain", "sft.retain_compiled"):
        import sft

        return sft.retain_sft(*sizes["sft"], compile=part.endswith("_compiled"))
    if part in ("sft.reference", "sft.reference_trl_defaults"):
        import sft

        return sft.trl_sft(*sizes["sft"], gradient_checkpointing=part.endswith("_defaults"))
    if part == "rollout.retain":
        import rollout

        return rollout.rollout_rate("cached", *sizes["rollout"])
    if part == "rollout.reference":
        import rollout

        return rollout.rollout_rate("hf", *sizes["rollout"])
    if part == "flops.reference":
        import flops

        return {"flops_per_s": flops.matmul_peak()}
    if part in ("flops.retain", "flops.retain_compiled"):
        import flops

        return flops.train_flops(*sizes["flops"], compile=part.endswith("_compiled"))
    raise SystemExit(f"unknown part {part!r}")


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds of this process's finished children)."""
    import resource

    busy = 0.0
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, usage.ru_utime + usage.ru_stime


def run_part(part: str, quick: bool, retries: int = 2) -> dict:
    """One side of one benchmark in a fresh process. The CPU time the rest of the machine used meanwhile is
    reported as ``other_load`` (cores); a run disturbed by more than a fifth of a core is repeated (twice at most)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part] + (["--quick"] if quick else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for attempt in range(retries + 1):
        busy0, child0 = _cpu_seconds()
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        busy1, child1 = _cpu_seconds()
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"benchmark part {part} failed (exit {proc.returncode})")
        other = max(0.0, (busy1 - busy0) - (child1 - child0)) / wall
        if other <= 0.2 or attempt == retries:
            break
        print(f"    ({part}: other processes used {other:.2f} cores meanwhile; measuring again)", flush=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["wall_s"], result["other_load"] = wall, other
    return result


def machine_load(seconds: float = 1.0) -> str:
    """Load average, and the cores busy over the next ``seconds`` (nothing of ours runs meanwhile)."""
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    busy0, _ = _cpu_seconds()
    time.sleep(seconds)
    busy1, _ = _cpu_seconds()
    return f"load average {' '.join(load)}; {(busy1 - busy0) / seconds:.2f} cores busy now"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--part", default="")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(measure(args.part, args.quick)), flush=True)
        return

    import torch

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    print(f"retain bench — torch {torch.__version__}, {threads} threads, {os.cpu_count()} cpus")
    print(f"before: {machine_load()}", flush=True)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = set(wanted) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHES)}")
    rows, details, loads = [], [], []
    start = time.perf_counter()
    references: dict[str, dict] = {}  # one reference measurement serves a benchmark and its variants
    measured: dict[str, dict] = {}  # and one retain measurement serves both references
    for name in wanted:
        key, goal, unit, label = BENCHES[name]
        ref_part = f"{key}.reference" + ("_trl_defaults" if name.endswith("_vs_trl_defaults") else "")
        if ref_part not in references:
            references[ref_part] = run_part(ref_part, args.quick)
        ref = references[ref_part]
        ours_part = f"{key}.retain" + ("_compiled" if name.endswith("_compiled") else "")
        if ours_part not in measured:
            measured[ours_part] = run_part(ours_part, args.quick)
        ours = measured[ours_part]
        if key == "grpo":
            r, b = ours["steps_per_s"], ref["steps_per_s"]
            details.append(f"{name}: mean completion length retain {ours['completion_len']:.2f}, "
                           f"TRL {ref['completion_len']:.2f} tokens")
        elif key == "sft":
            r, b = ours["tokens_per_s"], ref["tokens_per_s"]
            details.append(f"{name}: steps/s retain {ours['steps_per_s']:.2f}, TRL {ref['steps_per_s']:.2f}")
        elif key == "rollout":
            r, b = ours["tokens_per_s"], ref["tokens_per_s"]
            details.append(f"{name}: {ours['samples']} samples; tokens retain {ours['tokens']} in "
                           f"{ours['seconds']:.2f}s, hf {ref['tokens']} in {ref['seconds']:.2f}s")
        else:
            r, b = ours["flops_per_s"] / 1e9, ref["flops_per_s"] / 1e9
            details.append(f"{name}: small preset, {ours['params']:,} params, {ours['tokens']} tokens/step, "
                           f"{ours['step_s']:.3f} s/step, 6·P·T = {6 * ours['params'] * ours['tokens'] / 1e9:.1f} "
                           f"GFLOP/step")
        rows.append({"name": name, "retain": r, "reference": b, "unit": unit, "ratio": r / b})
        loads.append(max(ours["other_load"], ref["other_load"]))
        print(f"  {name}: retain {r:.4g} vs {b:.4g} {unit} ({r / b:.2f}x; {ours['wall_s'] + ref['wall_s']:.0f}s; "
              f"other processes {ref['other_load']:.2f} / {ours['other_load']:.2f} cores)", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")

    print()
    head = f"{'benchmark':38} {'retain':>12} {'reference':>12} {'unit':>9} {'ratio':>7} {'goal':>6}  reference"
    print(head)
    print("-" * len(head))
    for row, load in zip(rows, loads):
        _, goal, _, label = BENCHES[row["name"]]
        mark = "" if row["ratio"] >= goal else " (below goal)"
        if load > 0.2:
            mark += f" [other processes used {load:.2f} cores meanwhile]"
        print(f"{row['name']:38} {row['retain']:12.4g} {row['reference']:12.4g} {row['unit']:>9} "
              f"{row['ratio']:7.2f} {goal:6.2f}  {label}{mark}")
    print()
    for line in details:
        print(line)
    print(f"after: {machine_load()}")
    print(f"total {time.perf_counter() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
