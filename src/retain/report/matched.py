"""The demo's verdicts at matched new-task gain (SPEC §2.4): the findings as a declared table, decided by
:mod:`retain.metrics.frontier`.

A run's ``results.json`` holds ``trajectories``: per stage, its evaluation rows at step 0 (the stage's starting
model), at the in-stage checkpoints and at the stage's end. :func:`run_points` turns them into checkpoints with a
gain (the stage task's held-out accuracy minus its accuracy at the stage's start, on the selection half and on the
test half of the fixed split) and forgetting readouts, lower is better:

- ``prior_drop``: the prior skills' greedy accuracy lost since the base model (mean over the prior columns);
- ``prior_nll``: the prior skills' teacher-forced answer NLL gained since the base model (nats per item, mean
  over the prior columns; SPEC §3.2 — continuous where greedy accuracy sits at its ceiling);
- ``first_task_drop``: the first stage task's accuracy lost since the stage started (stage ≥ 2: Lai's forgetting
  of an earlier task while learning the next);
- ``ood_drop``: the stage task's OOD split accuracy lost since the stage started (Chu's rule shift, read right
  after the GeneralPoints stage, not after the whole sequence);
- ``avg_acc_loss``: 1 − the mean accuracy over the stage tasks seen so far (stages 1..k, stage ≥ 2: one minus
  Lai's average accuracy at that point of the sequence);
- ``composition_drop`` / ``zeroshot_drop``: the stage task's ``ood_composition`` / ``ood_zeroshot`` split accuracy
  lost since the stage started (the knowledge graph's unseen relation paths and held-out relation, Atomic);
- ``visual_ood_drop``: the stage task's ``ood_visual`` split accuracy lost since the stage started (GeneralPoints-VL's
  hands in red suits, Chu's visual variant), beside ``ood_drop`` (its rule shift);
- ``perception_drop`` / ``perception_ood_drop``: card recognition's per-card score (``cards`` / ``cards@ood``, red
  suits) lost since the stage started (Chu: RL improves the VLM's recognition of the cards).

A finding about a vision-language model's visual tasks (``pictures``) is decided only on a demo whose stage tasks
show pictures, and a text finding only on a text demo: each modality's report lists its own findings.

A finding compares two methods on one stage and one readout. Before it is compared at all, each method must have
*learned* that stage's task: the mean over seeds of the test-half gain of its best (selection-half) checkpoint at
least :data:`LEARNED_MIN_GAIN`, with a 95% interval above 0 (:func:`learned`). A method that did not is "not
reached" and the finding's verdict says so; the matched contrast is still printed, as description. Every rule and
constant here is fixed in code before the runs it judges.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from retain.errors import RetainError
from retain.metrics import mean_ci
from retain.metrics.frontier import (
    MATCHED_RULE,
    Point,
    combined_verdict,
    matched_contrast,
    nested_predictor,
    target_gains,
)

LEARNED_MIN_GAIN = 0.10  # +10 pts held-out (test half) at the top of the frontier: "the method learned the task"
TARGET_FRACTIONS = (0.25, 0.5, 0.75)  # target gains: fractions of the smaller of the two methods' best mean gain
NOT_REACHED = "not reached"
# the presets that fit `make demo`'s minutes are short of GRPO's learning on the embedded model; a "not reached" there
# points at the preset that gives the same contrast --full's stage budget and the seeds to decide it
SHORT_PRESETS = ("quick", "default")
SHORT_PRESETS_NOTE = ("this preset's budget fits minutes; `retain demo --preset core` runs the same contrast at 320 "
                      "steps × 8 seeds (64 runs, about 55 min on 2 cores)")
NOT_RUN = "not run"
# where a finding is not run: the preset that runs it (a finding about a task --full's sequence lacks has its own)
FULL_NEEDS = ("`retain demo --full` (every method, sort → GeneralPoints, 8 seeds × 5 lrs; its compute is stated in "
              "the README)")
TASK_NEEDS = {"kg": "`retain demo --preset atomic` (SFT on the atomic facts, then SFT or GRPO on the knowledge "
                    "graph's two-hop questions, 8 seeds × 4 lrs; its compute is stated in the README)"}
VISION_NEEDS = ("`retain demo --vision` (SFT and GRPO from the embedded VLM, GeneralPoints-VL → vcolor; its compute is "
                "stated in the README)")  # every finding about pictures

READOUTS = {
    "prior_drop": ("prior-skill drop", 100.0, "pts"),
    "prior_nll": ("prior-skill answer NLL increase", 1000.0, "milli-nats"),
    "first_task_drop": ("first task's drop", 100.0, "pts"),
    "ood_drop": ("OOD-split drop", 100.0, "pts"),
    "avg_acc_loss": ("1 − average accuracy over the stage tasks so far", 100.0, "pts"),
    "composition_drop": ("unseen-composition split drop", 100.0, "pts"),
    "zeroshot_drop": ("held-out-relation (zero-shot) split drop", 100.0, "pts"),
    "visual_ood_drop": ("visual-OOD split drop (red suits)", 100.0, "pts"),
    "perception_drop": ("card-recognition drop (per-card score, black suits)", 100.0, "pts"),
    "perception_ood_drop": ("card-recognition drop on red suits (per-card score)", 100.0, "pts"),
}
PERCEPTION = {"perception_drop": "cards", "perception_ood_drop": "cards@ood"}  # readout -> its column

LEARNED_RULE = (
    f"a method has learned a stage's task when, over seeds, the mean test-half gain of its best checkpoint (chosen "
    f"on the selection half over every lr and checkpoint) is at least +{LEARNED_MIN_GAIN * 100:g} pts with a 95% "
    "t-interval above 0; a finding with a method that has not is 'not reached' (its contrast is description only)"
)

SHARED_RULES = (LEARNED_RULE, MATCHED_RULE)


@dataclass(frozen=True)
class MatchedFinding:
    """One claim of a paper as a matched-gain contrast: the paper expects readout(a) − readout(b) to have the sign
    ``expect`` at equal gain on stage ``stage``'s task."""

    id: str
    claim: str
    paper: str
    a: str
    b: str
    stage: int
    readout: str
    expect: int
    beside: tuple[str, ...] = ()
    # where the claim is about one task: it is decided at the first stage that trains that task, wherever the
    # preset's sequence puts it (``stage`` then only says which stage the papers read); see :func:`resolved`
    task: str | None = None
    # shift readouts (results.json ``shift`` keys) described beside the contrast at the stage's end, for each seed's
    # chosen lr: the shift is measured at stage ends only, not at the matched checkpoint, so it decides nothing
    shift_beside: tuple[str, ...] = ()
    # a claim about a VLM's visual tasks: decided only on a demo of visual stage tasks (a text demo never lists it)
    pictures: bool = False
    # describe each method's own change on the readout at each seed's best checkpoint (Chu reads the change under
    # each method, not only their difference); description beside the matched contrast, it decides nothing
    each: bool = False


SHIFT_NAMES = {"reverse_kl_per_token": "token-level reverse KL from the base on the stage task's held-out prompts",
               "forward_kl_per_token": "token-level forward KL from the base on the stage task's held-out prompts"}


def stage_end_shift(agg: dict[str, Any], chosen: list[dict[str, Any]], method: str, stage: int, key: str) -> list[float]:
    """``key`` of the shift at the end of ``stage`` in each seed's run at its chosen lr (from :func:`learned`)."""
    rows = {(r["lr"], r["seed"]): r for r in agg["runs"] if r["method"] == method}
    out = []
    for c in chosen:
        values = (rows.get((c["lr"], c["seed"])) or {}).get("shift", {}).get(key) or []
        if len(values) >= stage and values[stage - 1] is not None:
            out.append(float(values[stage - 1]))
    return out


def _both(f: MatchedFinding, values: Callable[[str], list[float]], fmt: Callable[[float], str]) -> str | None:
    """"a mean [low, high] vs b mean [low, high]" over each method's values; None when one has none."""
    parts = []
    for m in (f.a, f.b):
        ci = mean_ci(values(m))
        if ci.n == 0:
            return None
        band = f" [{fmt(ci.low)}, {fmt(ci.high)}]" if ci.low is not None else ""
        parts.append(f"{m} {fmt(ci.mean)}{band}")
    return " vs ".join(parts)


def _shift_text(agg: dict[str, Any], f: MatchedFinding, gains: dict[str, dict[str, Any]], key: str) -> str | None:
    both = _both(f, lambda m: stage_end_shift(agg, gains[m].get("chosen") or [], m, f.stage, key), lambda v: f"{v:.3f}")
    if both is None:
        return None
    return f"{SHIFT_NAMES.get(key, key)}, at the stage's end for each seed's chosen lr (description): {both} nats"


def at_chosen(agg: dict[str, Any], method: str, stage: int, readout: str, chosen: list[dict[str, Any]]) -> list[float]:
    """``readout`` at each seed's chosen checkpoint of ``stage`` (its lr and step, from :func:`learned`), where the
    checkpoint reports it."""
    points = {(r["lr"], r["seed"], p["step"]): p for r in agg["runs"] if r["method"] == method
              for p in r.get("points") or [] if p["stage"] == stage}
    out = []
    for c in chosen:
        value = (points.get((c["lr"], c["seed"], c["step"])) or {}).get("readouts", {}).get(readout)
        if value is not None and math.isfinite(value):
            out.append(float(value))
    return out


def _each_text(agg: dict[str, Any], f: MatchedFinding, gains: dict[str, dict[str, Any]]) -> str | None:
    name, scale, unit = READOUTS[f.readout]
    both = _both(f, lambda m: at_chosen(agg, m, f.stage, f.readout, gains[m].get("chosen") or []),
                 lambda v: _fmt(v, scale))
    if both is None:
        return None
    return f"{name} under each method at each seed's best checkpoint (description; lower is better): {both} {unit}"


def resolved(f: MatchedFinding, sequence: list[str]) -> MatchedFinding | None:
    """``f`` at the stage of ``sequence`` it is decided on: the first stage training ``f.task`` when it names one,
    else ``f.stage``; None when the sequence has no such stage."""
    if f.task is not None:
        return replace(f, stage=sequence.index(f.task) + 1) if f.task in sequence else None
    return f if f.stage <= len(sequence) else None


FINDINGS: tuple[MatchedFinding, ...] = (
    MatchedFinding("1", "RL (GRPO) forgets the first task less than SFT while learning the second",
                   "Lai: FM SFT −10.4 vs GRPO −2.3 over 7 tasks (Qwen2.5-VL-7B)", "grpo", "sft", 2,
                   "first_task_drop", -1, ("prior_drop", "prior_nll")),
    MatchedFinding("2", "Prior-skill drop is smaller under RL (GRPO) than under SFT at the same new-task gain",
                   "Retaining: GRPO drop < 1 pt, SFT up to ~30–38 pts (Llama-3 / Qwen-2.5, 1–8B)", "grpo", "sft", 1,
                   "prior_drop", -1, ("prior_nll",), shift_beside=("reverse_kl_per_token",)),
    MatchedFinding("2n", "The same contrast on the continuous readout: prior-skill answer NLL",
                   "Retaining (SPEC §3.2: NLL moves before greedy accuracy falls)", "grpo", "sft", 1,
                   "prior_nll", -1, ("prior_drop",)),
    MatchedFinding("4", "EAFT forgets less than SFT at the same new-task gain",
                   "EAFT: general drop −1.0 (EAFT) vs −4.6 (SFT) at equal target accuracy (Qwen3-4B)", "eaft", "sft",
                   1, "prior_nll", -1, ("prior_drop",)),
    MatchedFinding("5", "Self-SFT (the initial model's correct samples) forgets less than SFT",
                   "Retaining: self-SFT forgets less than SFT", "self_sft", "sft", 1, "prior_nll", -1,
                   ("prior_drop",)),
    MatchedFinding("5i", "Iterative SFT (the current model's correct samples) forgets less than SFT",
                   "Retaining / Huan: on-policy SFT forgets less than off-policy SFT", "iterative_sft", "sft", 1,
                   "prior_nll", -1, ("prior_drop",)),
    MatchedFinding("6", "On the rule-shifted OOD split, SFT loses more than RL (read right after GeneralPoints)",
                   "Chu: GeneralPoints OOD, language-only: RL +3.5, SFT −8.1", "grpo", "sft", 1, "ood_drop", -1,
                   task="gpoints"),
    MatchedFinding("7", "Masking confident-conflict tokens forgets less than plain SFT",
                   "EAFT: confident conflicts drive forgetting", "conflict_sft", "sft", 1, "prior_nll", -1,
                   ("prior_drop",)),
    MatchedFinding("9", "SFT on the answers the base finds most likely forgets less than on the least likely ones "
                        "(the KL shift varied at matched gain, the optimizer unchanged)",
                   "Razor: forgetting follows the KL shift; a pilot here: 11.0 vs 24.4 pts drop at similar accuracy",
                   "sft_likely", "sft_unlikely", 1, "prior_nll", -1, ("prior_drop",)),
    MatchedFinding("8", "Replaying the prior skills' data (ptx) forgets less than SFT",
                   "classic baseline (InstructGPT's ptx, LLaMA-Factory's data mix)", "replay", "sft", 1, "prior_nll",
                   -1, ("prior_drop",)),
    MatchedFinding("10", "Negative gradients matter: GRPO forgets less than positive-only GRPO (advantages clamped "
                         "at ≥ 0, online rejection-sampling fine-tuning) at the same gain",
                   "Huan: on-policy RL keeps general skills (non-reasoning avg 45.7 → 53.2) where SFT loses them "
                   "(→ 21.1); token KL from the base RL 0.019 vs SFT 0.236 (IFEval)", "grpo", "grpo_positive", 1,
                   "prior_nll", -1, ("prior_drop",), shift_beside=("reverse_kl_per_token",)),
    MatchedFinding("11", "Self-distillation with a live teacher (SDFT) forgets the first task more than GRPO "
                         "over a sequence",
                   "Denser ≠ Better: on a 4-stage sequence (Qwen3-4B) on-policy self-distillation forgets more than "
                   "GRPO; GRPO keeps its gains (retain's sdft_live: the model shown the reference answer teaches "
                   "itself on the bare prompt, per-token forward KL(teacher ‖ student) over the vocabulary — the "
                   "direction the SDFT authors report using, though the paper writes reverse)", "sdft_live", "grpo", 2, "first_task_drop", +1,
                   ("prior_drop", "prior_nll")),
    MatchedFinding("12", "Average accuracy over the sequence: GRPO above SFT",
                   "Lai: average accuracy SFT 54.0, GRPO 60.0 (7 tasks, Qwen2.5-VL-7B)", "grpo", "sft", 2,
                   "avg_acc_loss", -1),
    MatchedFinding("12m", "Average accuracy over the sequence: joint multi-task training is the ceiling above GRPO",
                   "Lai: multi-task 62.9 vs GRPO 60.0", "multitask", "grpo", 2, "avg_acc_loss", -1),
    MatchedFinding("13", "On the knowledge graph, after SFT on the atomic facts, RL (GRPO) on two-hop questions "
                         "generalises to unseen compositions better than SFT on them",
                   "Atomic: SFT on the composite task ~90% in-distribution, ~18% zero-shot; atomic skills then RL "
                   "generalises", "grpo", "sft", 2, "composition_drop", -1, ("zeroshot_drop",), task="kg"),
    MatchedFinding("13z", "The same on the held-out relation (zero-shot), reported apart",
                   "Atomic: ~18% zero-shot after SFT on the composite task", "grpo", "sft", 2, "zeroshot_drop", -1,
                   ("composition_drop",), task="kg"),
    MatchedFinding("14", "SFT with varied prompt templates loses less on GeneralPoints' rule-shift OOD split than SFT "
                         "with one frozen template",
                   "Debunk: SFT's GeneralPoints OOD failure comes largely from one frozen prompt template",
                   "sft_varied", "sft", 1, "ood_drop", -1, task="gpoints"),
    # the vision-language findings (issue 16): the embedded VLM, decided by the same rules
    MatchedFinding("V1", "On GeneralPoints-VL's rule-shift OOD split (J/Q/K as 11/12/13), SFT loses more than RL "
                         "(read right after the GeneralPoints-VL stage)",
                   "Chu: RL improves GeneralPoints OOD accuracy (up to +9.3 pts for the vision-language variants), "
                   "SFT degrades it", "grpo", "sft", 1, "ood_drop", -1, ("visual_ood_drop",), task="gpoints_vl",
                   pictures=True, each=True),
    MatchedFinding("V2", "The same on the visual OOD split (the hands in red suits, trained on black), reported apart",
                   "Chu: RL generalises to the visual variant of GeneralPoints-VL, SFT does not", "grpo", "sft", 1,
                   "visual_ood_drop", -1, ("ood_drop",), task="gpoints_vl", pictures=True, each=True),
    MatchedFinding("V3", "Card recognition (the perception probe, per card) holds or improves under RL and falls under "
                         "SFT while learning GeneralPoints-VL",
                   "Chu: RL improves the VLM's visual recognition of the cards; SFT degrades it", "grpo", "sft", 1,
                   "perception_drop", -1, ("perception_ood_drop",), task="gpoints_vl", pictures=True, each=True),
    MatchedFinding("V3o", "The same on cards in red suits (out of the training distribution)",
                   "Chu: RL improves recognition", "grpo", "sft", 1, "perception_ood_drop", -1,
                   ("perception_drop",), task="gpoints_vl", pictures=True, each=True),
    MatchedFinding("V4", "Over the visual sequence, GRPO forgets the first task less than SFT while learning the "
                         "second", "Lai: FM SFT −10.4 vs GRPO −2.3 over 7 visual tasks (Qwen2.5-VL-7B)", "grpo",
                   "sft", 2, "first_task_drop", -1, ("perception_drop",), pictures=True, each=True),
    MatchedFinding("V5", "Average accuracy over the visual sequence: GRPO above SFT",
                   "Lai: average accuracy SFT 54.0 vs GRPO 60.0 (7 visual tasks, Qwen2.5-VL-7B)", "grpo", "sft", 2,
                   "avg_acc_loss", -1, pictures=True, each=True),
)


# ----------------------------------------------------------------------------------------------------------------
# per run: checkpoints as points


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _acc(cell: dict[str, Any] | None, half: str | None = None) -> float | None:
    if not isinstance(cell, dict):
        return None
    value = cell.get(half) if half else None
    return value if value is not None else cell.get("accuracy")


def _score(cell: dict[str, Any] | None) -> float | None:
    """A column's mean reward where its task gives partial credit (card recognition: per card), else accuracy."""
    if isinstance(cell, dict) and cell.get("score") is not None:
        return cell["score"]
    return _acc(cell)


def run_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every checkpoint of a run: ``{"stage", "task", "step", "gain", "gain_test", "train_acc", "readouts"}``
    (gains and readouts as fractions / nats; readouts missing where their columns were not evaluated)."""
    trajectories = results.get("trajectories") or []
    prior = list((results.get("metrics") or {}).get("prior_columns") or [])
    tasks = list(results.get("tasks") or [])
    if not trajectories or not trajectories[0]:
        return []
    base = trajectories[0][0]["row"]
    out = []
    for k, points in enumerate(trajectories):
        task, start = tasks[k], points[0]["row"]
        for point in points:
            row = point["row"]
            sel, test = _acc(row.get(task), "selection"), _acc(row.get(task), "test")
            sel0, test0 = _acc(start.get(task), "selection"), _acc(start.get(task), "test")
            if sel is None or sel0 is None or point.get("step") is None:
                continue
            readouts: dict[str, float] = {}
            drops = [_acc(base.get(c)) - _acc(row.get(c)) for c in prior if c in row and c in base]
            if drops and len(drops) == len(prior):
                readouts["prior_drop"] = _mean(drops)
            nll = [row[c]["nll"] - base[c]["nll"] for c in prior
                   if "nll" in row.get(c, {}) and "nll" in base.get(c, {})]
            if nll and len(nll) == len(prior):
                readouts["prior_nll"] = _mean(nll)
            if k >= 1 and tasks[0] in row and tasks[0] in start:
                readouts["first_task_drop"] = _acc(start[tasks[0]]) - _acc(row[tasks[0]])
            ood = f"{task}@ood"
            if ood in row and ood in start:
                readouts["ood_drop"] = _acc(start[ood]) - _acc(row[ood])
            for name, split in (("composition_drop", "ood_composition"), ("zeroshot_drop", "ood_zeroshot"),
                                ("visual_ood_drop", "ood_visual")):
                col = f"{task}@{split}"
                if col in row and col in start:
                    readouts[name] = _acc(start[col]) - _acc(row[col])
            for name, col in PERCEPTION.items():
                if col.partition("@")[0] not in tasks and col in row and col in start:
                    readouts[name] = _score(start[col]) - _score(row[col])
            seen = [_acc(row.get(t)) for t in tasks[: k + 1]]
            if k >= 1 and all(a is not None for a in seen):
                readouts["avg_acc_loss"] = 1.0 - _mean(seen)
            out.append({"stage": k + 1, "task": task, "step": int(point["step"]), "gain": sel - sel0,
                        "gain_test": (test - test0) if test is not None and test0 is not None else sel - sel0,
                        "train_acc": _acc(row.get(f"{task}@train")), "readouts": readouts})
    return out


def points_for(agg: dict[str, Any], stage: int, readout: str) -> list[Point]:
    """The frontier points of every run at ``stage`` that report ``readout``."""
    out = []
    for run in agg["runs"]:
        if run["seed"] is None or run["lr"] is None:
            continue
        for p in run.get("points") or []:
            if p["stage"] == stage and readout in p["readouts"] and math.isfinite(p["readouts"][readout]):
                out.append(Point(run["method"], int(run["seed"]), float(run["lr"]), p["step"], p["gain"],
                                 p["gain_test"], {readout: p["readouts"][readout]}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# did it learn?


def learned(agg: dict[str, Any], method: str, stage: int) -> dict[str, Any]:
    """Per seed, the best selection-half gain over every lr and checkpoint of ``stage`` and the test-half gain of that
    checkpoint; their means with 95% intervals; the training-prompt accuracy there; and the verdict of the rule."""
    best: dict[int, dict[str, Any]] = {}
    for run in agg["runs"]:
        if run["method"] != method or run["seed"] is None:
            continue
        for p in run.get("points") or []:
            if p["stage"] != stage:
                continue
            mine = best.get(run["seed"])
            if mine is None or (p["gain"], -p["step"]) > (mine["gain"], -mine["step"]):
                best[run["seed"]] = {**p, "lr": run["lr"]}
    if not best:
        return {"method": method, "stage": stage, "seeds": 0, "learned": False, "reason": "not run"}
    sel = mean_ci([b["gain"] for b in best.values()])
    test = mean_ci([b["gain_test"] for b in best.values()])
    ok = test.mean >= LEARNED_MIN_GAIN and test.low is not None and test.low > 0
    return {
        "method": method, "stage": stage, "task": next(iter(best.values()))["task"], "seeds": len(best),
        "selection": sel._asdict(), "test": test._asdict(), "learned": bool(ok),
        "chosen": [{"seed": s, "lr": b["lr"], "step": b["step"], "gain": b["gain"], "gain_test": b["gain_test"]}
                   for s, b in sorted(best.items())],
        "reason": "" if ok else f"gain not reached: test-half gain {test.mean * 100:+.1f} pts "
                                f"(needs ≥ +{LEARNED_MIN_GAIN * 100:g} with its interval above 0)",
    }


def fixed_tasks(agg: dict[str, Any]) -> set[str]:
    """The stage tasks the preset trains the same way in every arm (demo.json ``settings.fixed_stages``): no method
    is compared there, so neither the learned gate nor a finding reads them."""
    return set((agg.get("meta", {}).get("settings") or {}).get("fixed_stages") or {})


def learned_table(agg: dict[str, Any]) -> list[dict[str, Any]]:
    fixed = fixed_tasks(agg)
    stages = sorted({p["stage"] for r in agg["runs"] for p in r.get("points") or []
                     if agg["sequence"][p["stage"] - 1] not in fixed})
    return [learned(agg, m, s) for s in stages for m in agg["methods"]]


# ----------------------------------------------------------------------------------------------------------------
# the findings


def _fmt(v: float | None, scale: float, digits: int = 1) -> str:
    return "–" if v is None else f"{v * scale:+.{digits}f}".replace("-", "−")


def _contrast_text(levels: list[dict[str, Any]], readout: str) -> str:
    name, scale, unit = READOUTS[readout]
    parts = []
    for c in levels:
        head = f"g* {c['target'] * 100:+.1f} pts"
        if c["status"] != "ok":
            parts.append(f"{head}: {c['status']}")
            continue
        parts.append(f"{head}: Δ {_fmt(c['delta'], scale)} [{_fmt(c['low'], scale)}, {_fmt(c['high'], scale)}] "
                     f"{unit}, {c['pairs']} seeds, test-half gains {_fmt(c['gain_test_a'], 100)} vs "
                     f"{_fmt(c['gain_test_b'], 100)} pts")
    return f"{name}: " + "; ".join(parts) if parts else f"{name}: no target gain (a method gained nothing)"


def decide(agg: dict[str, Any], f: MatchedFinding) -> dict[str, Any]:
    """One finding: learned checks, target gains from gains only, the matched contrast on the deciding readout and
    on the readouts beside it, and the verdict."""
    rule = (f"stage {f.stage}; deciding readout: {READOUTS[f.readout][0]}; Δ = {f.a} − {f.b} at g* = "
            f"{', '.join(f'{x:g}' for x in TARGET_FRACTIONS)} × the smaller best mean gain, paper's side: "
            f"Δ {'<' if f.expect < 0 else '>'} 0; both methods must have learned (see 'How verdicts are decided')")
    base = {"id": f.id, "claim": f.claim, "paper": f.paper, "rule": rule, "methods": [f.a, f.b], "stage": f.stage,
            "readout": f.readout}
    present = set(agg["methods"])
    absent = [m for m in (f.a, f.b) if m not in present]
    if absent:
        return {**base, "verdict": "inconclusive", "measured": f"not run: {', '.join(absent)}", "numbers": {}}
    if f.stage > len(agg["sequence"]):
        return {**base, "verdict": "inconclusive", "measured": f"the sequence has no stage {f.stage}", "numbers": {}}
    points = points_for(agg, f.stage, f.readout)
    if not {p.method for p in points} >= {f.a, f.b}:
        return {**base, "verdict": "inconclusive", "numbers": {},
                "measured": f"{READOUTS[f.readout][0]} not measured at stage {f.stage} (no such column or checkpoints)"}
    targets = target_gains(points, f.a, f.b, TARGET_FRACTIONS)
    levels = matched_contrast(points, f.a, f.b, targets, readout=f.readout) if targets else []
    verdict = combined_verdict(levels, f.expect)
    texts = [_contrast_text(levels, f.readout)]
    beside = {}
    for r in f.beside:
        extra = points_for(agg, f.stage, r)
        if {p.method for p in extra} >= {f.a, f.b} and targets:
            beside[r] = matched_contrast(extra, f.a, f.b, targets, readout=r)
            texts.append(_contrast_text(beside[r], r) + f" → {combined_verdict(beside[r], f.expect)}")
    gains = {m: learned(agg, m, f.stage) for m in (f.a, f.b)}
    missed = [m for m, g in gains.items() if not g["learned"]]
    if f.readout == "first_task_drop":  # a first task never learned has nothing to forget: it must be learned too
        first = {m: learned(agg, m, 1) for m in (f.a, f.b)}
        missed += [f"{m} (stage 1)" for m, g in first.items() if not g["learned"] and m not in missed]
        gains.update({f"{m} (stage 1)": g for m, g in first.items()})
    for key in f.shift_beside:
        text = _shift_text(agg, f, gains, key)
        if text is not None:
            texts.append(text)
    each = _each_text(agg, f, gains) if f.each else None
    if each is not None:
        texts.append(each)
    gain_text = "; ".join(f"{m} best gain {_fmt(g['test']['mean'], 100)} pts (test half)" for m, g in gains.items()
                          if g.get("test"))
    measured = f"{gain_text}. " + " | ".join(texts)
    if missed:
        measured = f"{NOT_REACHED} by {', '.join(missed)} ({gains[missed[0]]['reason']}); as description: {measured}"
        if agg.get("meta", {}).get("preset") in SHORT_PRESETS and f.stage == 1:
            measured += f" — {SHORT_PRESETS_NOTE}"
        verdict = NOT_REACHED
    return {**base, "verdict": verdict, "measured": measured,
            "numbers": {"targets": targets, "levels": levels, "beside": beside, "learned": gains}}


def predictor_finding(agg: dict[str, Any]) -> dict[str, Any]:
    """Finding 3 done right (SPEC §3.2): does the forward KL predict prior-skill drop beyond the budget? Over runs at
    their last stage's end: drop ~ log lr (the budget: every method has the same steps) against drop ~ log lr + KL
    + KL², nested F-test and leave-one-method-out cross-validated R²."""
    claim = "The forward KL shift from the base model predicts prior-skill drop beyond what the budget predicts"
    paper = "Razor: quadratic fit R² 0.96 (toy) / 0.71 (LLM) for forward KL across runs"
    rule = ("rows = runs at the last stage's end; budget model drop ~ 1 + log lr; full model + KL + KL² (forward KL "
            "from the base, exact per position); nested F-test and leave-one-method-out CV R². Reproduced if the full "
            "model's CV R² exceeds the budget model's by ≥ 0.05 and the F-test p < 0.05; not reproduced if the CV "
            "gain ≤ 0 or p ≥ 0.5; otherwise inconclusive; fewer than 3 methods → inconclusive")
    rows = []
    for run in agg["runs"]:
        v = run["values"]
        kl = v.get("forward_kl_exact") if v.get("forward_kl_exact") is not None else v.get("forward_kl")
        if run["lr"] and v.get("prior_drop") is not None and kl is not None:
            rows.append({"method": run["method"], "log_lr": math.log(run["lr"]), "kl": kl, "drop": v["prior_drop"],
                         "nll": (run.get("points") or [{}])[-1].get("readouts", {}).get("prior_nll")})
    out = {"id": "3", "claim": claim, "paper": paper, "rule": rule, "methods": sorted({r["method"] for r in rows})}
    if len({r["method"] for r in rows}) < 3 or len({r["log_lr"] for r in rows}) < 2:
        return {**out, "verdict": "inconclusive", "measured": f"{len(rows)} runs over "
                f"{len({r['method'] for r in rows})} methods and {len({r['log_lr'] for r in rows})} lrs: the "
                "leave-one-method-out fit needs at least 3 methods and 2 lrs (`retain demo --full`)", "numbers": {}}
    fits = {"drop": nested_predictor(rows, ["log_lr"], "kl", target_key="drop")}
    if all(r["nll"] is not None for r in rows):
        fits["nll"] = nested_predictor(rows, ["log_lr"], "kl", target_key="nll")
    main = fits["drop"]

    def text(name: str, fit: dict[str, Any]) -> str:
        if fit.get("r2_full") is None:
            return f"{name}: {fit.get('reason') or 'no fit'}"
        cv = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        p = "–" if fit.get("p_value") is None else f"{fit['p_value']:.3f}"
        return (f"{name}: R² budget {fit['r2_budget']:.2f} → +KL {fit['r2_full']:.2f} (F p {p}); leave-one-method-out "
                f"CV R² {cv(fit.get('r2_cv_budget'))} → {cv(fit.get('r2_cv_full'))}, n {fit['n']}")

    measured = "; ".join(text(k, v) for k, v in fits.items())
    gain, p = main.get("gain_r2_cv"), main.get("p_value")
    if gain is None or p is None:
        verdict = "inconclusive"
    elif gain >= 0.05 and p < 0.05:
        verdict = "reproduced"
    elif gain <= 0 or p >= 0.5:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return {**out, "verdict": verdict, "measured": measured, "numbers": {"fits": fits}}


def not_run(f: MatchedFinding, why: str) -> dict[str, Any]:
    """A declared finding this preset cannot speak to: listed with what it needs, never given a verdict."""
    needs = VISION_NEEDS if f.pictures else TASK_NEEDS.get(f.task or "", FULL_NEEDS)
    return {"id": f.id, "claim": f.claim, "paper": f.paper, "verdict": NOT_RUN, "methods": [f.a, f.b],
            "stage": f.stage, "readout": f.readout, "numbers": {},
            "rule": f"stage {f.stage}; deciding readout: {READOUTS[f.readout][0]}; Δ = {f.a} − {f.b}",
            "measured": f"{why}: needs {needs}"}


def shows_pictures(sequence: list[str]) -> bool:
    """Whether a stage task of ``sequence`` shows pictures (a vision-language demo); an unknown name does not."""
    from retain import tasks as task_registry

    for name in sequence:
        try:
            if getattr(task_registry.get(name), "modality", "text") == "image":
                return True
        except RetainError:
            continue
    return False


def matched_findings(agg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every declared finding of the demo's modality — decided where the runs can speak to it, else listed as not
    run with what it needs — and, for a text demo, finding 3's nested predictor, in id order."""
    present = set(agg["methods"])
    fixed = fixed_tasks(agg)
    pictures = shows_pictures(agg["sequence"])
    out = []
    for f in (f for f in FINDINGS if f.pictures == pictures):
        absent = [m for m in (f.a, f.b) if m not in present]
        at = resolved(f, agg["sequence"])
        if absent:
            out.append(not_run(f, f"{', '.join(absent)} not in this preset"))
        elif at is not None and agg["sequence"][at.stage - 1] in fixed:
            out.append(not_run(f, f"stage {at.stage} ({agg['sequence'][at.stage - 1]}) trains every arm the same way "
                                  "in this preset"))
        elif at is None and f.task is not None:
            out.append(not_run(f, f"this preset's sequence ({' → '.join(agg['sequence'])}) has no {f.task} stage"))
        elif at is None:
            out.append(not_run(f, f"this preset's sequence has no stage {f.stage}"))
        else:
            out.append(decide(agg, at))
    if not pictures:  # the budget-vs-KL fit over the text demo's methods (its --full grid)
        out.append(predictor_finding(agg))
    return sorted(out, key=lambda f: (int("".join(ch for ch in f["id"] if ch.isdigit())), f["id"]))
