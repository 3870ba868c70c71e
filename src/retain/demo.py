"""``retain demo``: the seed's story on the embedded model — which methods learned, which forgot, by how much, and
whether the papers' verdicts hold at matched new-task gain (SPEC §2.4).

A preset is one experimental design (:class:`DemoPreset`): its methods × one log-spaced lr grid × seeds, every
method with the same optimizer steps and warmup per stage, evaluated on the fixed full held-out splits (the same
prompts for every run and seed, cut into a selection and a test half) at ``checkpoints`` points of every stage, with
the prior skills' teacher-forced answer NLL beside their greedy accuracy. The plan is a ``retain sweep`` grid
(:func:`demo_sweep`) run by the sweep's executors — local spawn processes (one torch thread each: on a small model
two single-thread workers beat one two-thread process) or Ray (``backend="ray"``, a local cluster or ``address``);
the runs share the base model's evaluation row. Then the confident-conflict token analysis of each task's SFT
targets under the base model, and the report, whose verdicts are the declared table of
:mod:`retain.report.matched`. Everything lands in one directory:

    DIR/demo.json            the plan, the runs, budgets, token summaries, wall time, peak memory
    DIR/runs/<run-name>/     one continual run each (``method=grpo,method.train.lr=0.0001,seed=0``)
    DIR/runs/sweep.json      the sweep's record: each run's status, attempts, errors and timings
    DIR/runs/eval_cache/     the starting evaluation rows (retain.eval_cache)
    DIR/report.html, report.md, report_files/

Re-running resumes: finished runs are read back, interrupted ones resume after their last finished stage.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retain.errors import RetainError
from retain.files import atomic_write_json
from retain.sweep import SweepConfig, expand, run_sweep

METHODS = ["sft", "grpo"]  # the default and quick presets: the core contrast (finding 2) at matched gain
FULL_METHODS = ["sft", "grpo", "self_sft", "iterative_sft", "eaft", "conflict_sft", "replay", "multitask",
                "sft_likely", "sft_unlikely",
                # later methods (SPEC §1, second table): findings 10, 11, 14 and the methods beside them
                "grpo_positive", "sdft_live", "sft_varied", "dft", "psft", "chord", "sdft"]
# default and quick: one stage, where the core contrast is decided (Retaining's design). The stage task is sort, the
# one task both SFT and GRPO learn on held-out prompts on the embedded model (retain.tasks.sort says why).
SEQUENCE = ["sort"]
# --full: a sequence, for Lai's first-task forgetting (finding 1) and Chu's GeneralPoints OOD readout right after the
# GeneralPoints stage (findings 6 and 14)
FULL_SEQUENCE = ["sort", "gpoints"]
# --preset atomic (finding 13, Atomic): SFT on the atomic facts, then the two-hop questions under the method compared
ATOMIC_SEQUENCE = ["facts", "kg"]
# --vision: the embedded VLM on GeneralPoints-VL (Chu's OOD and perception readouts, right after its stage) and then
# a visual question task (vcolor: the one the VLM's SFT and GRPO both moved in 60 steps, README), for Lai's
# first-task forgetting and average accuracy over a visual sequence
VISION_SEQUENCE = ["gpoints_vl", "vcolor"]
VISION_PROBES = ["cards", "cards@ood"]  # card recognition, the perception probe: black suits, and red (OOD)
# each stage task's OOD columns: GeneralPoints' rule shift; the knowledge graph's two shifts read apart (unseen
# compositions of seen relations, the held-out relation), never pooled into kg@ood; GeneralPoints-VL's rule shift and
# visual shift (red suits) apart. Countdown's OOD split (four digits) is left out: the base model scores 0 there even
# at pass@16.
OOD_COLUMNS = {"gpoints": ["gpoints@ood"], "kg": ["kg@ood_composition", "kg@ood_zeroshot"],
               "gpoints_vl": ["gpoints_vl@ood", "gpoints_vl@ood_visual"]}


def takes_reference_target(method: str) -> bool:
    """Whether ``method`` trains on the task's reference answers with the canonical one chosen (sft, replay, EAFT, …):
    the methods a preset's ``sft_target`` applies to. A method with its own target (sft_likely) keeps it."""
    from retain.methods.config import OfflineData, method_config

    data = method_config(method).data
    return isinstance(data, OfflineData) and data.target == "canonical"


def on_policy(method: str) -> bool:
    """Whether ``method`` samples its own rollouts (GRPO and the methods built on its rollouts): it gets GRPO's
    prompts × group budget."""
    from retain.methods.config import method_config

    return method_config(method).data.kind == "on_policy"


class DemoPreset(BaseModel):
    """One demo design. Every method gets the same optimizer steps per stage, the same warmup and the same
    log-spaced lr grid (SPEC §2.4); evaluation uses the fixed full held-out splits (``eval_seed`` orders them the
    same for every run and seed) at ``checkpoints`` points of every stage, with the prior skills' answer NLL."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str = "base"  # every run starts from it: the embedded text base, or the embedded VLM ("vlm")
    sequence: list[str] = Field(default_factory=lambda: list(SEQUENCE))
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    seeds: list[int]
    lrs: list[float] = Field(min_length=1)  # one grid for every method
    lr_note: str = ""  # why the grid has fewer than 4 lrs, where it does (a preset sized to fit its compute)
    steps: int = Field(ge=1)  # optimizer steps per stage, every method
    warmup_steps: int = Field(4, ge=0)
    checkpoints: int = Field(5, ge=1)
    sft_batch: int = 32  # sequences per step (SFT family)
    grpo_prompts: int = 32  # 16 prompts × 8 did not lift sort in 160 steps; 32 × 8 did (the pilots below)
    grpo_group: int = 8
    reward: str = "binary"  # GRPO's reward: binary correctness, as Razor / Retaining / Huan (SPEC §2.4)
    eval_seed: int = 0
    # every item of each held-out split, except reverse and sort (300 and 400 of their 2000 held-out strings: 600
    # sort strings made the default demo 774 s on a loaded machine, too close to `make demo`'s 15 minutes) and the
    # training-prompt columns (200 prompts): fixed by eval_seed, the same items for every run
    n_per_task: dict[str, int | None] = Field(default_factory=lambda: {"reverse": 300, "sort": 400, "sort@train": 200,
                                                                       "gpoints@train": 200, "kg@train": 200})
    # columns no stage trains besides the prior skills, read by the findings at every checkpoint (the VLM's card
    # recognition)
    probes: list[str] = Field(default_factory=list)
    checkpoint_prior: bool = True  # the prior skills at every checkpoint too (what the text findings decide on)
    shift_prompts: int = 32
    token_examples: int = 256
    samples_per_prompt: int = 1  # self-SFT and iterative SFT: samples of every training prompt
    replay_prior: float = 0.25  # replay: the share of each batch from the prior skills' data (ptx)
    # stages every arm trains the same way (task → method preset, at fixed_lr, the preset's steps and warmup): the
    # atomic SFT stage of finding 13, so each seed's arms start the compared stage from the same model; the compared
    # method and the lr grid apply to the other stages
    fixed_stages: dict[str, str] = Field(default_factory=dict)
    fixed_lr: float = Field(1e-4, gt=0)
    # a stage's own step count where it differs from ``steps`` (task → steps, the same for every method: SPEC §2.4's
    # equal budget is per stage across methods, not across stages)
    stage_steps: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    # which reference answer the SFT-family methods on offline data train on (SPEC §2.4's target choice; a method that
    # fixes its own target, as sft_likely does, keeps it): "every" draws among all of a prompt's correct answers
    sft_target: Literal["canonical", "random", "every"] = "canonical"

    @model_validator(mode="after")
    def _stages_named_are_stages(self) -> DemoPreset:
        for field, named in (("fixed_stages", self.fixed_stages), ("stage_steps", self.stage_steps)):
            stray = [t for t in named if t not in self.sequence]
            if stray:
                raise ValueError(f"{field}: {', '.join(stray)} not in the sequence ({', '.join(self.sequence)})")
        if len(self.fixed_stages) >= len(self.sequence):
            raise ValueError("fixed_stages: at least one stage must train the method compared")
        return self

    def steps_of(self, task: str) -> int:
        """Optimizer steps of ``task``'s stage, every method."""
        return self.stage_steps.get(task, self.steps)

    def eval_columns(self) -> list[str]:
        """Each stage task on its full held-out split and on its training prompts (apart, SPEC §2.4; a fixed stage
        is not compared, so it has no training-prompt column), the OOD splits of :data:`OOD_COLUMNS`, the probes, and
        the prior skills."""
        ood = [c for t in self.sequence for c in OOD_COLUMNS.get(t, [])]
        trained = [f"{t}@train" for t in self.sequence if t not in self.fixed_stages]
        return [*self.sequence, *ood, *self.probes, "prior", *trained]

    def checkpoint_columns(self) -> list[str]:
        """What every in-stage checkpoint evaluates: the stage tasks, their OOD columns (findings 6, 13, 14 and
        V1–V2 decide on them at matched gain, so along the stage, not only at its end), the probes, and the prior
        skills unless ``checkpoint_prior`` is off."""
        ood = [c for t in self.sequence for c in OOD_COLUMNS.get(t, [])]
        return [*self.sequence, *ood, *self.probes, *(["prior"] if self.checkpoint_prior else [])]

    def budget(self, method: str) -> dict[str, Any]:
        """What a stage gives ``method``: steps (``stage_steps``: each stage's), and sequences per step (rollouts
        for GRPO); ``sequences`` is a stage of ``steps``."""
        per_step = self.grpo_prompts * self.grpo_group if on_policy(method) else self.sft_batch
        return {"steps": self.steps, "stage_steps": {t: self.steps_of(t) for t in self.sequence},
                "warmup_steps": self.warmup_steps, "sequences_per_step": per_step, "sequences": per_step * self.steps}

    def method_dict(self, method: str, lr: float) -> dict[str, Any]:
        train = {"steps": self.steps, "lr": lr, "warmup_steps": self.warmup_steps, "log_every": 5}
        if on_policy(method):
            return {"name": method, "data": {"prompts_per_step": self.grpo_prompts, "group_size": self.grpo_group,
                                             "reward": self.reward}, "train": train}
        out: dict[str, Any] = {"name": method, "batch_size": self.sft_batch, "train": train}
        if method in ("self_sft", "iterative_sft"):
            out["data"] = {"samples_per_prompt": self.samples_per_prompt}
            if method == "iterative_sft":
                out["data"]["epoch_steps"] = max(1, self.steps // 2)
        if method == "replay":
            out["replay"] = {"prior_ratio": self.replay_prior}
        if self.sft_target != "canonical" and takes_reference_target(method):
            out.setdefault("data", {})["target"] = self.sft_target
        return out

    def stage_dict(self, task: str) -> dict[str, Any]:
        """One stage: a fixed stage carries its own method (the sweep's ``method`` grid sets the others), a stage of
        ``stage_steps`` its own steps."""
        stage: dict[str, Any] = {"task": task}
        if task in self.fixed_stages:
            stage["method"] = self.method_dict(self.fixed_stages[task], self.fixed_lr)
        if task in self.stage_steps:
            stage["steps"] = self.stage_steps[task]
        return stage

    def experiment(self, name: str, method: str, lr: float, seed: int, base: str) -> dict[str, Any]:
        return {
            "name": name, "model": base, "seed": seed, "method": self.method_dict(method, lr),
            "stages": [self.stage_dict(t) for t in self.sequence],
            "eval": {"tasks": self.eval_columns(), "n": None, "n_per_task": dict(self.n_per_task),
                     "seed": self.eval_seed, "checkpoints": self.checkpoints,
                     "checkpoint_tasks": self.checkpoint_columns(), "nll": ["prior"]},
            "shift": {"prompts": self.shift_prompts, "samples": 1},
        }


# The grids below were chosen from single-seed pilots on sort (the embedded base, 600 held-out strings, seed 0, before
# any demo ran; `retain run` on one-stage configs): SFT (32 sequences per step) at lr 1e-4 gained +8.4 pts held-out in
# 64 steps (prior skills −3.4 pts) and at 3e-4 +9.5 (−14.7 pts); at 1e-3 it lost most prior skill. GRPO (binary
# reward) with 16 prompts × 8 lost greedy accuracy at 1e-4 and 3e-4 over 64 steps and gained nothing by 160; with 32
# prompts × 8 at 1e-4 it gained +6.5 pts by step 60 and +10.5 by step 160 (prior −8.4 pts). The lr grid spans both
# methods' useful range; the default's 48 steps are what fits `make demo`'s 15 minutes, short of GRPO's +10 (the
# learned gate says so). The first core grid (160 steps, 8 seeds, this lr grid; README) was the pilot for the stage
# budget: SFT gained +20.3 pts there, GRPO +6.1 [+3.5, +8.7] with its best checkpoints mostly the last (still
# climbing); GRPO at 320 steps (seed 0, lrs 1e-4 and 2e-4, main at 41160ae) gained +18.0 pts held-out (test half)
# at lr 1e-4, passing +10 between steps 160 and 280 on the selection half. So core and --full give every method
# 320 steps a stage.
PRESETS = {
    "quick": DemoPreset(name="quick", seeds=[0], lrs=[1e-4, 4e-4], steps=20, checkpoints=4, shift_prompts=16,
                        token_examples=128),
    "default": DemoPreset(name="default", seeds=[0, 1, 2], lrs=[5e-5, 1e-4, 2e-4, 4e-4], steps=48),
    # core: finding 2 decided with power — SFT against GRPO on sort at --full's stage budget (320 steps, 8
    # checkpoints), 8 seeds, the default's 4-lr grid; 64 runs: 55 min on this 2-core machine beside other work
    # (load 4–12), peak ~2.5 GB
    "core": DemoPreset(name="core", seeds=list(range(8)), lrs=[5e-5, 1e-4, 2e-4, 4e-4], steps=320, checkpoints=8),
    "full": DemoPreset(name="full", sequence=list(FULL_SEQUENCE), methods=list(FULL_METHODS),
                       seeds=list(range(8)), lrs=[2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4], steps=320, checkpoints=8,
                       shift_prompts=64, token_examples=512, samples_per_prompt=4),
    # atomic: finding 13 (Atomic, arXiv 2512.01970) — SFT on the 420 atomic facts, then GRPO on the two-hop
    # questions, against SFT on the atomic facts then SFT on the two-hop questions. The atomic stage is the same in
    # both arms (SFT at fixed_lr 1e-4, the SFT pilot's lr on sort; the base already recalls every fact, so it
    # consolidates rather than teaches), so a seed's arms start the two-hop stage from one model and differ only in
    # its method; the x-axis is kg's held-out two-hop gain (held-out people, seen path types), the readouts the
    # unseen-composition and held-out-relation splits, apart. core's stage budget, checkpoints, lr grid and seeds:
    # 64 runs of two stages
    "atomic": DemoPreset(name="atomic", sequence=list(ATOMIC_SEQUENCE), fixed_stages={"facts": "sft"},
                         seeds=list(range(8)), lrs=[5e-5, 1e-4, 2e-4, 4e-4], steps=320, checkpoints=8),
    # vision: the visual findings (V1–V5) — SFT against GRPO from the embedded VLM on GeneralPoints-VL → vcolor, the
    # vision configs' batches (SFT 16 sequences a step, GRPO 8 pictures × 8 samples, binary reward); checkpoints read
    # the OOD splits and card recognition (what V1–V3o decide on), the text priors only at stage ends (no visual
    # finding reads them). The budget, from pilots (seed 0, GeneralPoints-VL alone, 8 checkpoints, fixed 246/246
    # selection/test halves; README): at 120 steps a stage (this preset's first design, 24 runs) neither method
    # learned GeneralPoints-VL (+3.5 / +4.0 pts held-out). At 640 steps GRPO 1e-4 gained +11.8 (best selection
    # checkpoint 560) while SFT on each prompt's one canonical answer memorised it (92% of training prompts, best +6.9
    # held-out); SFT drawing among every correct answer (``sft_target: every``, 4.8 a prompt) trained to 59–63% on
    # training prompts and gained +11.4 held-out at 1e-4 (+8.9 at 5e-5). So GeneralPoints-VL gets 640 steps and 8
    # checkpoints, SFT every answer; vcolor keeps the 120 steps both methods learned it in
    "vision": DemoPreset(
        name="vision", model="vlm", sequence=list(VISION_SEQUENCE), seeds=[0, 1, 2, 3], lrs=[5e-5, 1e-4, 2e-4],
        steps=640, stage_steps={"vcolor": 120}, checkpoints=8, sft_target="every", sft_batch=16, grpo_prompts=8,
        grpo_group=8, probes=list(VISION_PROBES), checkpoint_prior=False,
        # every held-out puzzle of GeneralPoints-VL (492, cut into selection and test halves for the gate) and every
        # card-recognition hand (155, and its red-suit twin); 300 of the OOD splits and of vcolor, 100 of each text
        # prior (the VLM keeps them at 94–100%, README) and of the training prompts
        n_per_task={"gpoints_vl@ood": 300, "gpoints_vl@ood_visual": 300, "vcolor": 300, "gpoints_vl@train": 100,
                    "vcolor@train": 100, "facts": 100, "reverse": 100, "arith": 100},
        shift_prompts=16, token_examples=64,
        lr_note="3 lrs, ×2 apart around the vision configs' 1e-4 (at 3e-4 both methods wrecked card recognition in "
                "100 steps, README; in the pilots GRPO collapsed at 2e-4), × 4 seeds: 24 runs of 760 steps are about "
                "an hour on 2 cores; at that cost a fourth seed narrows the paired intervals (t 3.18 / √4 against "
                "4.30 / √3) more than a fourth lr would help the frontier"),
}


def demo_sweep(preset: DemoPreset, methods: list[str], base: str | None = None) -> SweepConfig:
    """The demo's runs as a ``retain sweep`` grid: every method × every lr × every seed, one torch thread each."""
    template = preset.experiment("demo", methods[0], preset.lrs[0], preset.seeds[0], base or preset.model)
    return SweepConfig(base=template, resources={"cpus": 1}, grid={
        "method": [preset.method_dict(m, preset.lrs[0]) for m in methods],
        "method.train.lr": list(preset.lrs),
        "seed": list(preset.seeds),
    })


def plan(preset: DemoPreset, methods: list[str], base: str | None = None) -> list[dict[str, Any]]:
    """Every run of the demo: its sweep run name, method, lr, seed and directory (``runs/<name>``)."""
    return [{"name": r.name, "method": r.values["method"]["name"], "lr": r.values["method.train.lr"],
             "seed": r.values["seed"], "dir": f"runs/{r.name}"} for r in expand(demo_sweep(preset, methods, base), "demo")]


def token_analysis(base: str, n: int, tasks: list[str]) -> dict[str, Any]:
    """Confident conflicts of each task's canonical SFT targets (train split) under the base model (a VLM's given
    each target's picture: its model kind encodes the pairs)."""
    from retain import tasks as task_registry
    from retain.analysis.tokens import ENTROPY_MAX, PROB_MAX, token_stats
    from retain.kind import model_kind

    kind = model_kind(base)
    model, tok = kind.load(base)
    out = {}
    for name in tasks:
        examples = task_registry.get(name).examples("train", n, seed=0)
        stats = token_stats(model, tok, [(e.prompt, e.answer) for e in examples], encode=kind.encode)
        out[name] = {"summary": stats.summary(ENTROPY_MAX, PROB_MAX), "rows": stats.to_rows()[:2000]}
    return out


def run_demo(
    out: str | Path,
    preset: str = "default",
    methods: list[str] | None = None,
    workers: int = 2,
    base: str | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    backend: str = "local",
    address: str | None = None,
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
    report_to: list[str] | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out`` and write its report; returns the demo summary (also ``out/demo.json``).
    ``report_to``: trackers every run logs to (``retain.tracking``).
    ``seeds`` / ``lrs`` replace the preset's grid (the same design on fewer or more runs). ``base``: the model every
    run starts from (default: the preset's, ``DemoPreset.model``).

    The runs go through :func:`retain.sweep.run_sweep`: ``backend="local"`` runs ``workers`` spawn processes
    (one torch thread each), ``backend="ray"`` one Ray task per run on a local cluster or the one at ``address``."""
    from retain.analysis.tokens import ENTROPY_MAX, PROB_MAX
    from retain.kind import model_kind
    from retain.report import build_report

    if preset not in PRESETS:
        raise RetainError(f"unknown demo preset {preset!r} (presets: {', '.join(PRESETS)})")
    settings = PRESETS[preset]
    if seeds or lrs:  # a reduced (or widened) grid of the same design
        overrides = {k: v for k, v in (("seeds", seeds), ("lrs", lrs)) if v}
        if any(lr <= 0 for lr in lrs or []):
            raise RetainError(f"--lrs: learning rates must be positive, got {lrs}")
        settings = settings.model_copy(update=overrides)
    chosen = methods or settings.methods
    for m in chosen:
        from retain.methods.config import PRESETS as METHOD_PRESETS

        if m not in METHOD_PRESETS:
            raise RetainError(f"unknown method {m!r} for the demo (methods: {', '.join(METHOD_PRESETS)})")
    base = base or settings.model
    base_dir = model_kind(base).resolve(base)
    runs = plan(settings, chosen, base)  # every run's config validated (a method the model cannot take is refused)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda event, data: None)
    started = time.perf_counter()
    say("plan", {"runs": len(runs)})
    say("done", {"count": sum((out / r["dir"] / "results.json").exists() for r in runs)})

    def relay(event: str, data: dict[str, Any]) -> None:
        if event == "done":
            say("run_done", {"name": data["name"], "seconds": data["seconds"]})
        elif event == "failed" and not data.get("retry"):
            say("failed", {"name": data["name"], "error": data.get("error")})

    sweep = run_sweep(demo_sweep(settings, chosen, base), out / "runs", backend=backend, address=address,
                      workers=workers, progress=relay, report_to=report_to)
    worker_peaks = [r.get("peak_rss_mb") or 0.0 for r in sweep["runs"] if r["status"] == "done"]
    say("tokens", {})
    tokens = token_analysis(base, settings.token_examples, settings.sequence)
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "preset": settings.name,
        "settings": settings.model_dump(),
        "sequence": settings.sequence,
        "methods": chosen,
        "seeds": settings.seeds,
        "lrs": {m: list(settings.lrs) for m in chosen},
        "budgets": {m: settings.budget(m) for m in chosen},
        "runs": runs,
        "tokens": tokens,
        "thresholds": {"entropy_max": ENTROPY_MAX, "prob_max": PROB_MAX},
        "wall_seconds": round(time.perf_counter() - started, 1),
        # the processes run side by side: main + workers × the largest worker peak bounds the machine's from above
        "peak_rss_mb": round(main_peak + workers * max(worker_peaks, default=0.0), 1),
        "peak_rss_mb_per_process": {"main": round(main_peak, 1), "worker_max": round(max(worker_peaks, default=0.0), 1)},
        "workers": workers,
        "backend": backend,
        "failed": sweep["failed"],
        "base_model": str(base_dir),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
    }
    atomic_write_json(out / "demo.json", summary)
    say("report", {})
    build_report(out)
    return summary
