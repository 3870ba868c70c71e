"""retain's benchmarks, side by side with their reference, in one run: ``make bench`` (or ``python bench/run.py``).

Writes ``bench/results.json`` — a list of ``{"name", "retain", "reference", "unit", "ratio"}`` with ratio =
retain / reference (higher is better) — and prints a table. Every measurement runs in its own fresh process (same
thread count, nothing else loaded), the reference first, then retain. What each one measures, and how, is in the
docstring of its module: ``grpo.py``, ``sft.py``, ``rollout.py``, ``flops.py``, and — what a user feels —
``experiment.py`` (a whole 2-stage continual experiment against the same one glued from TRL), ``lmeval_bench.py``
(evaluation against lm-evaluation-harness; skipped with a message when it is not installed) and ``sft_varlen.py``
(SFT on data of varied lengths). Those rows also keep, under ``evidence``, what shows both sides did the same work.

Options: ``--quick`` (fewer timed steps, for a smoke run), ``--only NAME[,NAME]`` (a subset, ``new`` for the
three user-level rows; results.json then holds only those), ``--retries N`` (re-measurements on a busy machine). Threads: ``BENCH_THREADS`` (default 2, this machine's cores). Measure on an otherwise idle machine: the
header reports the load average and any other busy process.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    "experiment_runs_per_hour": ("experiment", 3.0, "runs/h",
                                 "SFTTrainer + GRPOTrainer, model.generate eval loop, forward-pass KL"),
    "eval_prompts_per_s_vs_lm_eval": ("lmeval", 3.0, "prompts/s", "lm-eval HFLM, local generate_until exact_match"),
    "sft_varlen_target_tokens_per_s": ("sft_varlen", 1.5, "tokens/s",
                                       "best SFTTrainer option: defaults / group_by_length / padding_free"),
    "sft_varlen_target_tokens_per_s_vs_trl_defaults": ("sft_varlen", 1.5, "tokens/s", "TRL 1.16 SFTTrainer, its defaults"),
}
NEW = ["experiment_runs_per_hour", "eval_prompts_per_s_vs_lm_eval", "sft_varlen_target_tokens_per_s",
       "sft_varlen_target_tokens_per_s_vs_trl_defaults"]  # --only new: the whole-experiment, eval and varlen rows


def _sizes(quick: bool) -> dict:
    if quick:
        return {"grpo": (2, 4), "sft": (3, 10), "rollout": (16, 1), "flops": (1, 2), "experiment": (4, 2, 16, 8),
                "lmeval": (1,), "sft_varlen": (1, 3)}
    return {"grpo": (3, 25), "sft": (5, 80), "rollout": (64, 3), "flops": (2, 5), "experiment": (20, 8, 64, 32),
            "lmeval": (2,), "sft_varlen": (2, 50)}


def measure(part: str, quick: bool) -> dict:
    """One side of one benchmark, in this process."""
    from common import quiet, setup_threads

    quiet()
    setup_threads()
    sizes = _sizes(quick)
    if part.startswith("experiment."):
        import experiment

        run = experiment.retain_experiment if part == "experiment.retain" else experiment.trl_experiment
        return run(*sizes["experiment"])
    if part == "lmeval.retain":
        import lmeval_bench

        return lmeval_bench.retain_eval(*sizes["lmeval"])
    if part == "lmeval.reference":
        import lmeval_bench

        return lmeval_bench.lm_eval_eval(*sizes["lmeval"])
    if part == "sft_varlen.retain":
        import sft_varlen

        return sft_varlen.retain_sft_varlen(*sizes["sft_varlen"])
    if part.startswith("sft_varlen.reference_"):
        import sft_varlen

        return sft_varlen.trl_sft_varlen(*sizes["sft_varlen"], variant=part.removeprefix("sft_varlen.reference_"))
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

        return rollout.rollout_rate("kv_cache", *sizes["rollout"])
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


def reference_parts(name: str, key: str) -> list[str]:
    """The reference measurements of a row; the row's reference is the best of them."""
    if key == "sft_varlen":
        import sft_varlen

        variants = ["trl_defaults"] if name.endswith("_vs_trl_defaults") else list(sft_varlen.TRL_VARIANTS)
        return [f"sft_varlen.reference_{v}" for v in variants]
    return [f"{key}.reference" + ("_trl_defaults" if name.endswith("_vs_trl_defaults") else "")]


def rate(key: str, result: dict) -> float:
    """The row's quantity (higher is better) from one side's measurement."""
    if key == "grpo":
        return result["steps_per_s"]
    if key == "flops":
        return result["flops_per_s"] / 1e9
    if key == "experiment":
        return 3600 / result["seconds"]
    if key == "lmeval":
        return result["prompts_per_s"]
    return result["tokens_per_s"]  # sft, sft_varlen, rollout


def same_work(key: str, ours: dict, ref: dict, ref_name: str, refs: dict[str, dict]) -> dict | None:
    """The evidence, kept in results.json, that both sides of a new row did the same work."""
    if key == "experiment":
        import experiment

        return {"agreement": experiment.agreement(ours, ref),
                "accuracy": {"retain": ours["accuracy"], "reference": ref["accuracy"]},
                "forward_kl_exact": {"retain": ours["forward_kl_exact"], "reference": ref["forward_kl_exact"]},
                "reverse_kl_exact": {"retain": ours["reverse_kl_exact"], "reference": ref["reverse_kl_exact"]},
                "forward_kl_mc": {"retain": ours["forward_kl"], "reference": ref["forward_kl"]},
                "sft_loss": {"retain": ours["sft_loss"], "reference": ref["sft_loss"]},
                "grpo_reward": {"retain": ours["grpo_reward"], "reference": ref["grpo_reward"]},
                "seconds": {"retain": ours["seconds"], "reference": ref["seconds"]},
                "cpu_seconds": {"retain": ours["cpu_seconds"], "reference": ref["cpu_seconds"]},
                "profile_seconds": {"retain": ours["profile"], "reference": ref["profile"]},
                "profile_cpu_seconds": {"retain": ours["profile_cpu"], "reference": ref["profile_cpu"]}}
    if key == "lmeval":
        import lmeval_bench

        return {"accuracy": {"retain": ours["accuracy"], "reference": ref["accuracy"]}, "prompts": ours["prompts"],
                "items_disagreeing": lmeval_bench.disagreements(ours, ref)}
    if key == "sft_varlen":
        return {"reference": ref_name.removeprefix("sft_varlen.reference_"),
                "tokens_per_s": {p.removeprefix("sft_varlen.reference_"): r["tokens_per_s"] for p, r in refs.items()},
                "mean_loss": {"retain": ours["loss"], **{p.removeprefix("sft_varlen.reference_"): r["loss"]
                                                         for p, r in refs.items()}},
                "target_tokens_per_step": {"retain": ours["target_tokens_per_step"],
                                           "reference": ref["target_tokens_per_step"]}}
    return None


def describe(key: str, ours: dict, ref: dict, evidence: dict | None) -> str:
    if key == "grpo":
        return f"mean completion length retain {ours['completion_len']:.2f}, TRL {ref['completion_len']:.2f} tokens"
    if key == "sft":
        return f"steps/s retain {ours['steps_per_s']:.2f}, TRL {ref['steps_per_s']:.2f}"
    if key == "rollout":
        return (f"{ours['samples']} samples; tokens retain {ours['tokens']} in {ours['seconds']:.2f}s, "
                f"hf {ref['tokens']} in {ref['seconds']:.2f}s")
    if key == "flops":
        return (f"small preset, {ours['params']:,} params, {ours['tokens']} tokens/step, {ours['step_s']:.3f} s/step, "
                f"6·P·T = {6 * ours['params'] * ours['tokens'] / 1e9:.1f} GFLOP/step")
    if key == "experiment":
        agree = evidence["agreement"]
        prof = "; ".join(f"{k} {v:.1f}s" for k, v in ours["profile"].items())
        ref_prof = "; ".join(f"{k} {v:.1f}s" for k, v in ref["profile"].items())
        return (f"retain {ours['seconds']:.1f}s ({prof}), TRL pipeline {ref['seconds']:.1f}s ({ref_prof}); "
                f"CPU {ours['cpu_seconds']:.1f}s vs {ref['cpu_seconds']:.1f}s "
                f"({ref['cpu_seconds'] / ours['cpu_seconds']:.2f}x); "
                f"agree: {agree['agree']} (base items disagreeing {sum(agree['base_items_disagreeing'].values())}, "
                f"worst gap / tolerance {agree['worst_gap_over_tolerance']:.2f}"
                f"{'; outside: ' + ', '.join(agree['outside_tolerance']) if agree['outside_tolerance'] else ''}); "
                f"SFT loss {ours['sft_loss']:.3f} vs {ref['sft_loss']:.3f}, GRPO reward {ours['grpo_reward']:.3f} vs "
                f"{ref['grpo_reward']:.3f}, forward KL (exact) {ours['forward_kl_exact']} vs {ref['forward_kl_exact']}")
    if key == "lmeval":
        return (f"{ours['prompts']} prompts; accuracy retain {ours['accuracy']:.4f}, lm-eval {ref['accuracy']:.4f}; "
                f"{evidence['items_disagreeing']} items disagreeing; {ours['seconds']:.2f}s vs {ref['seconds']:.2f}s "
                f"(CPU {ours['cpu_seconds']:.2f}s vs {ref['cpu_seconds']:.2f}s)")
    return (f"reference {evidence['reference']}; TRL tokens/s {evidence['tokens_per_s']}; mean loss "
            f"{evidence['mean_loss']}; target tokens/step {evidence['target_tokens_per_step']}")


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


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--part", default="")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a part run on a busy machine")
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(measure(args.part, args.quick)), flush=True)
        return

    import torch

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    print(f"retain bench — torch {torch.__version__}, {threads} threads, {os.cpu_count()} cpus")
    print(f"before: {machine_load()}", flush=True)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    wanted = [n for item in wanted for n in (NEW if item == "new" else [item])]
    unknown = set(wanted) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHES)} (or 'new')")
    if "eval_prompts_per_s_vs_lm_eval" in wanted and importlib.util.find_spec("lm_eval") is None:
        print("  skipped eval_prompts_per_s_vs_lm_eval: lm-evaluation-harness is not installed "
              "(pip install 'retain[lmeval]')", flush=True)
        wanted.remove("eval_prompts_per_s_vs_lm_eval")
    rows, details, loads = [], [], []
    start = time.perf_counter()
    measured: dict[str, dict] = {}  # one measurement of each part serves every row that uses it

    def part(name: str) -> dict:
        if name not in measured:
            measured[name] = run_part(name, args.quick, args.retries)
        return measured[name]

    for name in wanted:
        key, goal, unit, label = BENCHES[name]
        refs = {p: part(p) for p in reference_parts(name, key)}
        ref_name = max(refs, key=lambda p: rate(key, refs[p]))
        ref = refs[ref_name]
        ours = part(f"{key}.retain" + ("_compiled" if name.endswith("_compiled") else ""))
        r, b = rate(key, ours), rate(key, ref)
        row = {"name": name, "retain": r, "reference": b, "unit": unit, "ratio": r / b}
        evidence = same_work(key, ours, ref, ref_name, refs)
        if evidence:
            row["evidence"] = evidence
        details.append(f"{name}: {describe(key, ours, ref, evidence)}")
        rows.append(row)
        loads.append(max(ours["other_load"], ref["other_load"]))
        print(f"  {name}: retain {r:.4g} vs {b:.4g} {unit} ({r / b:.2f}x; {ours['wall_s'] + ref['wall_s']:.0f}s; "
              f"other processes {ref['other_load']:.2f} / {ours['other_load']:.2f} cores)", flush=True)
        print(f"    {details[-1]}", flush=True)
        atomic_write(Path(args.out), json.dumps(rows, indent=2) + "\n")  # after every row: a killed run keeps its rows

    print()
    head = f"{'benchmark':48} {'retain':>12} {'reference':>12} {'unit':>9} {'ratio':>7} {'goal':>6}  reference"
    print(head)
    print("-" * len(head))
    for row, load in zip(rows, loads):
        _, goal, _, label = BENCHES[row["name"]]
        mark = "" if row["ratio"] >= goal else " (below goal)"
        if load > 0.2:
            mark += f" [other processes used {load:.2f} cores meanwhile]"
        print(f"{row['name']:48} {row['retain']:12.4g} {row['reference']:12.4g} {row['unit']:>9} "
              f"{row['ratio']:7.2f} {goal:6.2f}  {label}{mark}")
    print()
    for line in details:
        print(line)
    print(f"after: {machine_load()}")
    print(f"total {time.perf_counter() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
