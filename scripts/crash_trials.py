"""Crash trials for ``retain run``: kill it at random and at chosen moments, damage what it left, resume, and check
that nothing was lost.

    python scripts/crash_trials.py --trials 24            # batch mode
    python scripts/crash_trials.py --trials 12 --mode streaming
    python scripts/crash_trials.py --trials 24 --mode both --json trials.json
    python scripts/crash_trials.py --trials 24 --jobs 2     # two trials at a time (each process one thread)

One uninterrupted reference run first (its points counted with ``RETAIN_FAULT_TRACE``); then each trial starts the
same config in a fresh directory and strikes it with one fault (below), inspects the directory the victim left,
maybe damages it further, resumes it with a plain ``retain run`` until it finishes, and compares. Trial kinds:

- ``random``: SIGKILL from outside after a uniform delay over the reference's wall time (1.1×: some land late);
- ``point``: SIGKILL at the N-th arrival at a named moment (``retain.files.fault_point``: mid-evaluation, a stage's
  model or state directory written but not renamed, a trainer checkpoint written / half swapped, a JSON temp file
  written but not renamed, before stage.json, before results.json), N drawn over the reference's count;
- ``double``: two such kills in a row before the resume;
- ``corrupt``: a kill, then the damage a disk or a person can do: bytes flipped in, or the tail cut off, the
  weights, optimizer or RNG file the resume may build on, or a torn line at the end of the training log. The
  resume must report a damaged file it would use (``events.jsonl`` naming the file) and redo the stage (or ignore
  the checkpoint); a damaged file past the resume point is simply rewritten; none may survive as it was;
- ``enospc``: ``OSError(ENOSPC)`` (a full disk) raised at a write: the victim must exit 1 with one line;
- ``concurrent``: the victim is stopped (SIGSTOP) holding the run's lock; a second ``retain run`` on the same
  directory must be refused (exit 2, one line); the victim is then continued (SIGCONT) and finishes (its directory
  is then checked as a resumed one is; no resume is started).

After every fault the directory must hold no half-written file: every JSON outside ``*.tmp`` parses, every
directory with a manifest matches it, every ``.safetensors`` outside ``*.tmp`` opens, the log's lines parse but the
last. After the resume: exit 0, ``results.json``'s ``matrix``, ``metrics``, ``shift``, ``eval_n`` (and the stream's
curve) equal to the reference's bit for bit, the training log equal record for record, no ``*.tmp`` or checkpoint
left, every manifest intact. A trial that fails any of these counts as a result lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

BATCH = {
    "name": "crash",
    "model": "base",
    "seed": 0,
    "method": {"name": "sft", "batch_size": 8, "train": {"lr": 3.0e-4, "log_every": 1, "checkpoint_every": 1}},
    "stages": [{"task": "arith", "steps": 3}, {"task": "countdown", "steps": 3}],
    "eval": {"tasks": ["countdown", "arith", "reverse"], "n": 8},
    "shift": {"prompts": 4, "samples": 1},
}
STREAMING = {
    **BATCH,
    "name": "crash-stream",
    "mode": "streaming",
    "method": {"name": "sft", "batch_size": 8, "train": {"lr": 3.0e-4, "log_every": 1}},
    "streaming": {"eval_every": 2},
}
# The suite's size (tests/test_crash_resume.py): the same shape — two stages, a checkpoint every step, a prior column,
# the shift — with fewer steps and prompts, so each process spends its time where the faults strike, not evaluating
SMALL = {"stages": [{"task": "arith", "steps": 2}, {"task": "countdown", "steps": 2}],
         "eval": {"tasks": ["countdown", "arith", "reverse"], "n": 4}, "shift": {"prompts": 2, "samples": 1}}
POINTS = ("eval", "model_dir", "state_dir", "checkpoint", "checkpoint_swap", "atomic_write", "stage_done", "results")
COMPARED = ("tasks", "eval_tasks", "matrix", "eval_n", "metrics", "shift")
KINDS = ("point", "random", "corrupt", "enospc", "double", "concurrent")


@dataclass
class Trial:
    index: int
    mode: str
    kind: str
    faults: list[str] = field(default_factory=list)  # what was done, one entry per fault injected
    victim_exit: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # half-written files found, refusals missing, ...
    warnings: list[str] = field(default_factory=list)  # events.jsonl messages after the resume
    resumed_exit: int | None = None
    identical: bool = False
    seconds: float = 0.0

    @property
    def lost(self) -> bool:
        return not self.identical or bool(self.problems) or self.resumed_exit != 0


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RETAIN_FAULT")}
    # one thread: the same arithmetic in every process (and far faster on a shared 2-core machine)
    return {**base, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def start(config: Path, out: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "retain.cli", "run", str(config), "--out", str(out), "--quiet"],
        cwd=ROOT, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# ----------------------------------------------------------------------------------------------- inspection


def inspect(out: Path, allow_damage: bool = False) -> list[str]:
    """What a fault may never leave: files outside ``*.tmp`` that do not parse, load or match their manifest."""
    from safetensors import safe_open

    from retain.files import verify_manifest

    problems = []
    if not out.exists():
        return problems
    for path in sorted(out.rglob("*")):
        if any(part.endswith(".tmp") for part in path.relative_to(out).parts) or not path.is_file():
            continue
        if path.suffix in (".json", ".yaml"):
            try:
                text = path.read_text(encoding="utf-8")
                json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (ValueError, yaml.YAMLError) as err:
                problems.append(f"{path}: does not parse ({err})")
        elif path.suffix == ".safetensors" and not allow_damage:
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            except Exception as err:  # noqa: BLE001 - any failure to load is the finding
                problems.append(f"{path}: does not load ({type(err).__name__})")
        elif path.name == "steps.jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines[:-1], start=1):
                try:
                    json.loads(line)
                except ValueError:
                    problems.append(f"{path} line {number}: torn in the middle of the log")
    if not allow_damage:
        for manifest in sorted(out.rglob("manifest.json")):
            if not any(part.endswith(".tmp") for part in manifest.relative_to(out).parts):
                problem = verify_manifest(manifest.parent, required=True)
                if problem:
                    problems.append(problem)
    return problems


def final_problems(out: Path) -> list[str]:
    problems = inspect(out)
    problems += [f"{p}: leftover" for p in out.rglob("*.tmp")]
    problems += [f"{p}: leftover checkpoint" for p in out.rglob("checkpoint*") if p.is_dir()]
    for k in (out / "stages").glob("[1-9]*"):
        for part in ("model",):
            if not (k / part / "manifest.json").is_file():
                problems.append(f"{k / part}: no manifest")
    return problems


def log_records(out: Path) -> list[dict[str, Any]]:
    from retain.files import read_jsonl

    return read_jsonl(out / "steps.jsonl")


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    picked = {k: results[k] for k in COMPARED}
    if "stream" in results:
        picked["stream"] = {k: v for k, v in results["stream"].items()}
    return picked


# ----------------------------------------------------------------------------------------------- damage


def damage_targets(out: Path, mode: str) -> list[Path]:
    """The files a resume would build on: the newest finished stage's weights and state, the live checkpoint."""
    targets = []
    stages = sorted((int(p.parent.name), p.parent) for p in (out / "stages").glob("*/stage.json")) if mode == "batch" \
        else sorted((int(p.parent.parent.name), p.parent.parent) for p in (out / "stages").glob("*/model/manifest.json"))
    if stages:
        last = stages[-1][1]
        targets += [last / "model" / "model.safetensors"]
        if (last / "state" / "replay.json").exists():
            targets.append(last / "state" / "replay.json")
    for ckpt in list(out.rglob("checkpoint")) + list(out.rglob("checkpoint.old")):
        if ckpt.is_dir():
            targets += [ckpt / name for name in ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")
                        if (ckpt / name).exists()]
    return [t for t in targets if t.is_file()]


def damage(out: Path, mode: str, rng: random.Random) -> tuple[str | None, Path | None]:
    """Damage one file a resume may build on; returns what was done and the damaged file (None: the log)."""
    targets = damage_targets(out, mode)
    log = out / "steps.jsonl"
    if not targets or rng.random() < 0.2:
        if not log.exists():
            return None, None
        with open(log, "a", encoding="utf-8") as f:
            f.write('{"stage": 1, "step": 99, "loss": 0.5')  # a torn last line: no newline, no closing brace
        return f"torn line appended to {log.name}", None
    target = rng.choice(targets)
    data = bytearray(target.read_bytes())
    if rng.random() < 0.5 and len(data) > 1:
        cut = rng.randrange(1, len(data))
        target.write_bytes(bytes(data[:cut]))
        return f"truncated {target.relative_to(out)} to {cut}/{len(data)} bytes", target
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    target.write_bytes(bytes(data))
    return f"flipped byte {at} of {target.relative_to(out)}", target


# ----------------------------------------------------------------------------------------------- trials


def reference(work: Path, config: Path) -> tuple[dict[str, Any], list[dict[str, Any]], float, Counter]:
    out, trace = work / f"reference-{config.stem}", work / f"reference-{config.stem}.trace"
    trace.unlink(missing_ok=True)
    started = time.perf_counter()
    code, err = finish(start(config, out, RETAIN_FAULT_TRACE=str(trace)))
    if code != 0:
        raise SystemExit(f"the reference run failed ({code}):\n{err}")
    wall = time.perf_counter() - started
    counts = Counter(trace.read_text().split())
    return json.loads((out / "results.json").read_text()), log_records(out), wall, counts


def point_fault(rng: random.Random, counts: Counter, names: tuple[str, ...] = POINTS) -> str:
    name = rng.choice([n for n in names if counts.get(n)])
    return f"{name}:{rng.randint(1, counts[name])}"


def strike(trial: Trial, config: Path, out: Path, rng: random.Random, counts: Counter, wall: float) -> None:
    """One kill (random or at a point); records the fault and the victim's exit status."""
    if trial.kind == "random":
        delay = rng.uniform(0, 1.1 * wall)
        victim = start(config, out)
        try:
            victim.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            victim.send_signal(signal.SIGKILL)
        code, _ = finish(victim)
        trial.faults.append(f"SIGKILL after {delay:.2f} s" + (" (finished first)" if code == 0 else ""))
    else:
        spec = point_fault(rng, counts)
        code, _ = finish(start(config, out, RETAIN_FAULT=spec))
        trial.faults.append(f"SIGKILL at {spec}" + (" (not reached)" if code == 0 else ""))
    trial.victim_exit.append(code)


def run_trial(trial: Trial, config: Path, work: Path, ref: tuple, rng: random.Random) -> Trial:
    ref_results, ref_log, wall, counts = ref
    out = work / f"trial{trial.index:03d}-{trial.mode}-{trial.kind}"
    started = time.perf_counter()
    damaged: tuple[Path, bytes] | None = None
    if trial.kind in ("point", "random"):
        strike(trial, config, out, rng, counts, wall)
        trial.problems += inspect(out)
    elif trial.kind == "double":
        for kind in ("point", rng.choice(["point", "random"])):
            trial.kind = kind
            strike(trial, config, out, rng, counts, wall)
            trial.problems += inspect(out)
        trial.kind = "double"
    elif trial.kind == "corrupt":  # killed where there is something to damage: a checkpoint, a finished stage
        spec = point_fault(rng, counts, ("checkpoint", "checkpoint_swap", "stage_done", "eval", "model_dir"))
        code, _ = finish(start(config, out, RETAIN_FAULT=spec))
        trial.faults.append(f"SIGKILL at {spec}" + (" (not reached)" if code == 0 else ""))
        trial.victim_exit.append(code)
        trial.problems += inspect(out)
        what, target = damage(out, trial.mode, rng)
        if what:
            trial.faults.append(what)
        if target is not None and not (out / "results.json").exists():
            damaged = (target, target.read_bytes())
    elif trial.kind == "enospc":
        name = rng.choice([n for n in ("atomic_write", "model_dir", "checkpoint") if counts.get(n)])
        spec = f"{name}:{rng.randint(1, counts[name])}:enospc"
        code, err = finish(start(config, out, RETAIN_FAULT=spec))
        trial.faults.append(f"ENOSPC at {spec}")
        trial.victim_exit.append(code)
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 1 or len(lines) != 1 or "No space left on device" not in lines[0]:
            trial.problems.append(f"full disk: exit {code}, stderr {lines[-3:]}")
        trial.problems += inspect(out)
    elif trial.kind == "concurrent":
        spec = point_fault(rng, counts, ("eval", "checkpoint", "model_dir", "atomic_write"))
        victim = start(config, out, RETAIN_FAULT=spec + ":stop")
        deadline = time.time() + 300
        while victim.poll() is None and time.time() < deadline:  # wait until it stops itself, lock held
            state = Path(f"/proc/{victim.pid}/stat").read_text().split()[2]
            if state == "T":
                break
            time.sleep(0.05)
        second_code, second_err = finish(start(config, out))
        lines = [line for line in second_err.splitlines() if line.strip()]
        trial.faults.append(f"second run while the first is stopped at {spec}")
        if second_code != 2 or len(lines) != 1 or "in use by another retain process" not in lines[0]:
            trial.problems.append(f"second process: exit {second_code}, stderr {lines[-3:]}")
        victim.send_signal(signal.SIGCONT)
        code, err = finish(victim)
        trial.victim_exit.append(code)
        if code != 0:
            trial.problems.append(f"the stopped run did not finish after SIGCONT: exit {code} {err[-300:]}")
    if trial.kind == "concurrent" and trial.victim_exit[-1] == 0:
        code, err = 0, ""  # the continued victim finished the run itself: nothing is left to resume
    else:
        code, err = finish(start(config, out))
    trial.resumed_exit = code
    if code != 0:
        trial.problems.append(f"resume failed ({code}): {err.strip().splitlines()[-1:] if err.strip() else ''}")
    else:
        results = json.loads((out / "results.json").read_text())
        same_results = comparable(results) == comparable(ref_results)
        same_log = log_records(out) == ref_log
        trial.identical = same_results and same_log
        if not same_results:
            trial.problems.append("results differ from the reference")
        if not same_log:
            trial.problems.append("training log differs from the reference")
        trial.problems += final_problems(out)
    from retain.files import read_jsonl

    trial.warnings = [e["message"] for e in read_jsonl(out / "events.jsonl")]
    # the damaged file was used and reported, or replaced (the resume point came before it), never kept as it was
    if damaged and damaged[0].exists() and damaged[0].read_bytes() == damaged[1]:
        trial.problems.append(f"damaged {damaged[0]} kept" + ("" if trial.warnings else " and not reported"))
    elif damaged and not trial.warnings and damaged[0].exists():
        trial.faults[-1] += " (rewritten by the resume before use)"
    trial.seconds = round(time.perf_counter() - started, 2)
    return trial


def trial_rng(seed: int, index: int) -> random.Random:
    """Each trial's own draws (fault points, damage): the same whichever trials run beside it (``--jobs``)."""
    return random.Random(seed * 1_000_003 + index)


def run_trials(trials: int, seed: int, work: Path, modes: list[str], kinds: tuple[str, ...] = KINDS,
               jobs: int = 1, small: bool = False) -> list[Trial]:
    """``jobs`` trials at a time (independent directories; each process runs one thread); ``small``: the suite's
    sizes (``SMALL``)."""
    work.mkdir(parents=True, exist_ok=True)
    done: list[Trial] = []
    for mode in modes:
        config = work / f"{mode}.yaml"
        base = BATCH if mode == "batch" else STREAMING
        config.write_text(yaml.safe_dump({**base, **SMALL} if small else base))
        ref = reference(work, config)
        share = -(-trials // len(modes)) if mode == modes[0] else trials // len(modes)
        planned = [Trial(len(done) + i, mode, kinds[i % len(kinds)]) for i in range(share)]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            finished = pool.map(lambda t: run_trial(t, config, work, ref, trial_rng(seed, t.index)), planned)
            for trial in finished:  # in trial order, as each is done
                done.append(trial)
                print(row(trial), flush=True)
    return done


def row(t: Trial) -> str:
    verdict = "LOST" if t.lost else "ok"
    return (f"{t.index:3d} {t.mode:9s} {t.kind:10s} {verdict:4s} {t.seconds:6.1f}s  {'; '.join(t.faults)}"
            + (f"  | warnings: {len(t.warnings)}" if t.warnings else "")
            + (f"  | PROBLEMS: {t.problems}" if t.problems else ""))


def summary(trials: list[Trial]) -> dict[str, Any]:
    faults = Counter()
    for t in trials:
        for f in t.faults:
            if "not reached" in f or "finished first" in f:
                faults["kill landed after the run finished / point not reached"] += 1
            elif f.startswith("SIGKILL at"):
                faults["SIGKILL at " + f.split()[2].split(":")[0]] += 1
            elif f.startswith("SIGKILL after"):
                faults["SIGKILL at a random moment"] += 1
            elif f.startswith(("flipped", "truncated")):
                words = f.split()
                faults[f"{words[0]} {Path(words[4] if words[0] == 'flipped' else words[1]).name}"] += 1
            elif f.startswith("torn"):
                faults["torn log line"] += 1
            elif f.startswith("ENOSPC"):
                faults["full disk (ENOSPC)"] += 1
            elif f.startswith("second run"):
                faults["second process on the same directory"] += 1
    return {
        "trials": len(trials),
        "faults_injected": sum(len(t.faults) for t in trials),
        "by_kind": dict(sorted(faults.items())),
        "damage_reported": sum(bool(t.warnings) for t in trials),
        "damage_rewritten_before_use": sum(any("rewritten" in f for f in t.faults) for t in trials),
        "results_lost": sum(t.lost for t in trials),
        "seconds": round(sum(t.seconds for t in trials), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["batch", "streaming", "both"], default="batch")
    parser.add_argument("--work", type=Path, default=Path("/tmp/retain-crash-trials"))
    parser.add_argument("--jobs", type=int, default=1, help="trials run at a time")
    parser.add_argument("--json", type=Path, default=None, help="write every trial and the summary here")
    args = parser.parse_args(argv)
    modes = ["batch", "streaming"] if args.mode == "both" else [args.mode]
    trials = run_trials(args.trials, args.seed, args.work, modes, jobs=args.jobs)
    result = summary(trials)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": result, "trials": [asdict(t) for t in trials]}, indent=2))
    return 1 if result["results_lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
