"""The vision demo (``retain demo --vision``): its design, checked on the preset without training; the visual findings
(GeneralPoints-VL's rule and visual OOD, card recognition, Lai's forgetting over a visual sequence) decided by the
matched-gain rule on fabricated runs; and one end-to-end run of the preset at a microscopic budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_loading_cli import run_cli
from test_matched_report import N_HALF, by_id, cell, prior_cells, seed_noise, task_cell, write_demo

from retain.config import ExperimentConfig, parse_experiment
from retain.demo import PRESETS, demo_sweep, plan, run_demo
from retain.errors import RetainError
from retain.report.aggregate import aggregate
from retain.report.matched import FINDINGS, NOT_RUN, READOUTS, run_points, shows_pictures
from retain.results import compute_metrics
from retain.sweep import expand

VISION = PRESETS["vision"]
SEQ = ["gpoints_vl", "vcolor"]
VISUAL_IDS = ["V1", "V2", "V3", "V3o", "V4", "V5"]


# ----------------------------------------------------------------------------------------------------------------
# the design


def test_vision_preset_gives_sft_and_grpo_the_same_steps_on_the_embedded_vlm() -> None:
    runs = expand(demo_sweep(VISION, VISION.methods), "vision")
    assert VISION.model == "vlm" and VISION.methods == ["sft", "grpo"] and VISION.sequence == SEQ
    assert len(runs) == 2 * len(VISION.lrs) * len(VISION.seeds) and len(VISION.seeds) >= 3
    assert {r.experiment.model for r in runs} == {"vlm"}
    # each stage the same steps for both methods: GeneralPoints-VL the preset's steps, vcolor its own
    for k, task in enumerate(SEQ):
        budgets = {(r.experiment.stage_method(k).train.steps, r.experiment.stage_method(k).train.warmup_steps)
                   for r in runs}
        assert budgets == {(VISION.steps_of(task), VISION.warmup_steps)}
    assert VISION.steps_of("gpoints_vl") == VISION.steps and VISION.steps_of("vcolor") == VISION.stage_steps["vcolor"]
    # SFT draws among every correct answer of a GeneralPoints-VL prompt; GRPO samples its own
    sft = parse_experiment(VISION.experiment("x", "sft", VISION.lrs[0], 0, "vlm")).stage_method(0)
    assert sft.data.kind == "offline" and sft.data.target == VISION.sft_target == "every"
    # one lr grid for both methods; fewer than 4 lrs only with the reason stated in the preset
    per_method = {m: sorted({r.values["method.train.lr"] for r in runs if r.values["method"]["name"] == m})
                  for m in VISION.methods}
    assert per_method["sft"] == per_method["grpo"] == sorted(VISION.lrs)
    assert len(VISION.lrs) >= 4 or len(VISION.lr_note) > 40
    grpo = parse_experiment(VISION.experiment("x", "grpo", VISION.lrs[0], 0, "vlm")).stage_method(0)
    assert grpo.data.reward == "binary"
    assert VISION.budget("grpo")["sequences"] == VISION.steps * 8 * 8 and VISION.budget("sft")["sequences_per_step"] == 16


def test_vision_preset_evaluates_fixed_splits_with_the_ood_and_perception_columns_at_checkpoints() -> None:
    first, other = (parse_experiment(VISION.experiment("x", "sft", VISION.lrs[0], s, "vlm")) for s in (0, 1))
    assert first.eval.n is None and first.eval.seed == other.eval.seed  # the same prompts for every run and seed
    cols = first.eval_tasks()
    assert cols == ["gpoints_vl", "vcolor", "gpoints_vl@ood", "gpoints_vl@ood_visual", "cards", "cards@ood", "facts",
                    "reverse", "arith", "gpoints_vl@train", "vcolor@train"]
    assert set(first.checkpoint_columns()) == {"gpoints_vl", "vcolor", "gpoints_vl@ood", "gpoints_vl@ood_visual",
                                               "cards", "cards@ood"}
    assert len(first.eval.checkpoint_steps(VISION.steps)) >= 4
    assert first.nll_columns() == ["facts", "reverse", "arith"]
    # card recognition is every hand of its test split (155) and its red-suit twin; GeneralPoints-VL's held-out split
    # whole (492 puzzles, cut into selection and test halves)
    assert first.eval.count("cards") is None and first.eval.count("gpoints_vl") is None


def test_a_text_preset_keeps_its_columns() -> None:
    assert PRESETS["default"].eval_columns() == ["sort", "prior", "sort@train"]
    assert PRESETS["full"].eval_columns() == ["sort", "gpoints", "gpoints@ood", "prior", "sort@train",
                                              "gpoints@train"]
    assert PRESETS["default"].model == "base" and PRESETS["default"].checkpoint_prior


def test_a_method_the_vlm_cannot_take_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(RetainError, match="method 'opd' cannot train a vision-language model") as err:
        run_demo(tmp_path / "d", "vision", methods=["sft", "opd"])
    assert "\n" not in str(err.value) and not (tmp_path / "d").exists()
    assert plan(VISION, ["sft"])[0]["dir"].startswith("runs/method=sft,method.train.lr=")


@pytest.mark.parametrize("args,needle", [
    (["demo", "--vision", "--quick"], "--quick, --full, --vision and --preset exclude each other"),
    (["demo", "--vision", "--preset", "core"], "exclude each other"),
])
def test_cli_refuses_a_vision_demo_mixed_with_another_preset(tmp_path: Path, args: list[str], needle: str) -> None:
    result = run_cli(*args, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# fabricated vision demos: results.json as the runner writes them for the preset's columns


def vision_results(method: str, lr: float, seed: int, trajectories: list[list[dict[str, Any]]]) -> dict[str, Any]:
    tasks = SEQ[: len(trajectories)]
    cfg = ExperimentConfig(name=f"{method}_{lr:g}_{seed}", model="vlm", seed=seed,
                           method={"name": method, "train": {"lr": lr}}, stages=[{"task": t} for t in tasks],
                           eval={"tasks": [c for c in VISION.eval_columns() if c.partition("@")[0] in (*tasks, "cards")
                                           or c in ("prior",)], "n": 96})
    cols = cfg.eval_tasks()
    ends = [trajectories[0][0]["row"]] + [t[-1]["row"] for t in trajectories]
    matrix = [[row[c]["accuracy"] for c in cols] for row in ends]
    return {"config": cfg.model_dump(mode="json"), "seeds": {"run": seed}, "tasks": tasks, "eval_tasks": cols,
            "matrix": matrix, "eval_n": [[row[c]["n"] for c in cols] for row in ends],
            "metrics": compute_metrics(cfg, cols, matrix), "shift": {}, "trajectories": trajectories}


def scored(score: float) -> dict[str, Any]:
    """A card-recognition cell: per-card score (what the perception readouts read) beside all-cards accuracy."""
    return {**cell(max(0.0, score - 0.3)), "score": float(score)}


GP0, OOD0, VOOD0, CARDS0, CARDS_OOD0, VCOLOR0 = 0.125, 0.05, 0.02, 0.98, 0.34, 0.27
GAINS = (0.0625, 0.125, 0.1875, 0.25)  # binary fractions: the targets ¼ ½ ¾ × 0.25 are these gains exactly


def base_row() -> dict[str, Any]:
    return {"gpoints_vl": task_cell(GP0, GP0), "gpoints_vl@ood": cell(OOD0), "gpoints_vl@ood_visual": cell(VOOD0),
            "cards": scored(CARDS0), "cards@ood": scored(CARDS_OOD0), "vcolor": task_cell(VCOLOR0, VCOLOR0),
            "gpoints_vl@train": cell(GP0), "vcolor@train": cell(VCOLOR0), **prior_cells(0.95, 1.0)}


def law_run(law: dict[str, float], noise: float, gains1=GAINS, gains2=GAINS,
            stages: int = 2) -> list[list[dict[str, Any]]]:
    """gpoints_vl → vcolor. Stage 1: at held-out gain g, the rule-OOD and visual-OOD accuracies and the per-card
    scores fall by ``law[readout] × g`` (+ ``noise``); stage 2: vcolor gains, gpoints_vl falls by
    ``law["first"] × g + noise`` from where stage 2 started. Checkpoint rows hold the preset's checkpoint columns."""
    base = base_row()
    s1 = [{"step": 0, "row": base}]
    for k, g in enumerate(gains1, 1):
        row = {"gpoints_vl": task_cell(GP0 + g, GP0 + g),
               "gpoints_vl@ood": cell(OOD0 - law["ood"] * g - noise),
               "gpoints_vl@ood_visual": cell(VOOD0 - law["vood"] * g - noise),
               "cards": scored(CARDS0 - law["cards"] * g - noise), "cards@ood": scored(CARDS_OOD0 - law["cards_ood"] * g - noise)}
        if k == len(gains1):
            row = {**base, **row, "gpoints_vl@train": cell(GP0 + g + 0.1)}
        s1.append({"step": 25 * k, "row": row})
    if stages == 1:
        return [s1]
    end1 = s1[-1]["row"]
    s2 = [{"step": 0, "row": end1}]
    for k, g in enumerate(gains2, 1):
        row = {**{c: end1[c] for c in ("gpoints_vl@ood", "gpoints_vl@ood_visual", "cards", "cards@ood")},
               "vcolor": task_cell(VCOLOR0 + g, VCOLOR0 + g), "gpoints_vl": cell(end1["gpoints_vl"]["accuracy"]
                                                                                   - law["first"] * g - noise)}
        if k == len(gains2):
            row = {**end1, **row, "vcolor@train": cell(VCOLOR0 + g + 0.1)}
        s2.append({"step": 25 * k, "row": row})
    return [s1, s2]


SFT_LAW = {"ood": 0.2, "vood": 0.1, "cards": 0.3, "cards_ood": 0.4, "first": 0.5}  # SFT loses on every readout
GRPO_LAW = {"ood": -0.1, "vood": -0.05, "cards": 0.0, "cards_ood": -0.2, "first": 0.1}  # GRPO gains OOD, keeps cards


def chu_demo(root: Path, laws: dict[str, dict[str, float]]) -> Path:
    runs = []
    for s in range(8):
        for m, law in laws.items():
            runs.append((m, 1e-4, s, vision_results(m, 1e-4, s, law_run(law, seed_noise(s) if m == "sft" else 0.0))))
    return write_demo(root, runs)


def test_the_visual_findings_are_declared_for_pictures_with_known_readouts() -> None:
    visual = [f for f in FINDINGS if f.pictures]
    assert [f.id for f in visual] == VISUAL_IDS
    assert all((f.a, f.b, f.expect) == ("grpo", "sft", -1) and f.readout in READOUTS for f in visual)
    assert {f.id: f.readout for f in visual} == {"V1": "ood_drop", "V2": "visual_ood_drop", "V3": "perception_drop",
                                                 "V3o": "perception_ood_drop", "V4": "first_task_drop",
                                                 "V5": "avg_acc_loss"}
    assert all(f.task == "gpoints_vl" for f in visual[:4]) and all(f.stage == 2 for f in visual[4:])
    assert shows_pictures(SEQ) and not shows_pictures(["sort", "gpoints"]) and not shows_pictures(["nope.jsonl"])


def test_visual_readouts_by_hand() -> None:
    traj = law_run(SFT_LAW, 0.0)
    pts = run_points(vision_results("sft", 1e-4, 0, traj))
    assert [(p["stage"], p["step"]) for p in pts] == [(1, s) for s in (0, 25, 50, 75, 100)] + [
        (2, s) for s in (0, 25, 50, 75, 100)]
    end1, end2 = pts[4], pts[9]
    assert end1["gain"] == 0.25
    # OOD accuracies lost since the stage started: 0.2 × 0.25 (rule), 0.1 × 0.25 (red suits)
    assert end1["readouts"]["ood_drop"] == pytest.approx(0.05)
    assert end1["readouts"]["visual_ood_drop"] == pytest.approx(0.025)
    # card recognition read on its per-card score, not all-cards accuracy: 0.3 × 0.25 and 0.4 × 0.25
    assert end1["readouts"]["perception_drop"] == pytest.approx(0.075)
    assert end1["readouts"]["perception_ood_drop"] == pytest.approx(0.10)
    assert "prior_drop" in end1["readouts"] and "prior_drop" not in pts[2]["readouts"]  # text priors at ends only
    # stage 2: gpoints_vl 0.375 → 0.375 − 0.5 × 0.25; average accuracy over both tasks (0.25 + 0.52) / 2
    assert end2["readouts"]["first_task_drop"] == pytest.approx(0.125)
    assert end2["readouts"]["avg_acc_loss"] == pytest.approx(1 - (0.25 + 0.52) / 2)
    assert end2["readouts"]["perception_drop"] == pytest.approx(0.0)  # stage 2 leaves the cards as stage 1 ended


def test_visual_findings_reproduced_when_grpo_keeps_ood_and_perception(tmp_path: Path) -> None:
    agg = aggregate(chu_demo(tmp_path, {"sft": SFT_LAW, "grpo": GRPO_LAW}))
    f = by_id(agg)
    assert list(f) == VISUAL_IDS  # a vision demo lists the visual findings only, no text finding nor the predictor
    for fid in VISUAL_IDS:
        assert f[fid]["verdict"] == "reproduced", (fid, f[fid]["measured"])
        assert all(c["status"] == "ok" and c["pairs"] == 8 for c in f[fid]["numbers"]["levels"])
    # V1 by hand: targets ¼ ½ ¾ of the 0.25 gain; f(g*) = the least OOD drop at gain ≥ g*: SFT's drop grows with
    # gain (its checkpoint at g*: 0.2·g* + noise), GRPO's falls (its last, −0.1 × 0.25); noise averages to 0
    v1 = f["V1"]["numbers"]
    assert v1["targets"] == list(GAINS[:3])
    for c, g in zip(v1["levels"], GAINS):
        assert c["delta"] == pytest.approx(-0.1 * 0.25 - 0.2 * g, abs=1e-12)
    assert "→ reproduced" in f["V1"]["measured"]  # the visual OOD beside it points the same way
    # each method's own change at each seed's best checkpoint (the end): SFT lost 0.2 × 0.25, GRPO gained 0.025
    assert "under each method at each seed's best checkpoint" in f["V1"]["measured"]
    assert "grpo −2.5 [−2.5, −2.5] vs sft +5.0 [+4.4, +5.6] pts" in f["V1"]["measured"]
    # V3: SFT's per-card score falls 0.3 × g*; GRPO's does not move
    for c, g in zip(f["V3"]["numbers"]["levels"], GAINS):
        assert c["delta"] == pytest.approx(-0.3 * g, abs=1e-12)
    # V4 along stage 2: the first-task drop grows with vcolor's gain, so f(g*) sits at g*: Δ = (0.1 − 0.5)·g*.
    # V5: 1 − average accuracy falls with gain for both (vcolor +g, gpoints_vl −0.5g or −0.1g), so f(g*) is the
    # last checkpoint at every level: Δ = −(0.9 − 0.5) × 0.25 / 2
    for c4, c5, g in zip(f["V4"]["numbers"]["levels"], f["V5"]["numbers"]["levels"], GAINS):
        assert c4["delta"] == pytest.approx((0.1 - 0.5) * g, abs=1e-12)
        assert c5["delta"] == pytest.approx(-(0.9 - 0.5) * 0.25 / 2, abs=1e-12)

    swapped = by_id(aggregate(chu_demo(tmp_path / "swapped", {"sft": GRPO_LAW, "grpo": SFT_LAW})))
    assert swapped["V1"]["verdict"] == "not reproduced" and swapped["V4"]["verdict"] == "not reproduced"


def test_a_text_demo_lists_no_visual_finding(tmp_path: Path) -> None:
    from test_matched_report import law_demo

    ids = list(by_id(aggregate(law_demo(tmp_path, 3, seeds=2))))
    assert not any(i.startswith("V") for i in ids) and "3" in ids


def test_visual_findings_where_the_methods_differ_only_by_lr_are_not_reproduced(tmp_path: Path) -> None:
    """One law for both methods: every readout grows with x = lr × step (gain = 0.3·(1 − e^(−x/8)), binomial on
    N_HALF prompts a half; OOD, visual OOD and per-card drops 0.01·x), SFT on a √2-larger lr grid. At the end SFT has
    lost clearly more OOD accuracy, but at matched gain there is nothing to find."""
    rng = np.random.default_rng(7)
    runs = []
    for m, shift in (("sft", math.sqrt(2.0)), ("grpo", 1.0)):
        for i in range(4):
            lr = 1e-5 * 2.0**i * shift
            for s in range(8):
                base = base_row()
                points = [{"step": 0, "row": base}]
                for k in range(1, 5):
                    x = lr * 25 * k / 5e-4
                    sel, test = rng.binomial(N_HALF, GP0 + 0.3 * (1 - math.exp(-x / 8)), size=2) / N_HALF
                    drop = 0.01 * x
                    row = {"gpoints_vl": task_cell(float(sel), float(test)),
                           "gpoints_vl@ood": cell(OOD0 + 0.2 - drop + rng.normal(0, 0.005)),
                           "gpoints_vl@ood_visual": cell(VOOD0 + 0.2 - drop + rng.normal(0, 0.005)),
                           "cards": scored(CARDS0 - drop + rng.normal(0, 0.005)),
                           "cards@ood": scored(CARDS_OOD0 - drop + rng.normal(0, 0.005))}
                    points.append({"step": 25 * k, "row": {**base, **row} if k == 4 else row})
                runs.append((m, lr, s, vision_results(m, lr, s, [points])))
    agg = aggregate(write_demo(tmp_path, runs))
    end = {m: np.mean([p["readouts"]["ood_drop"] for r in agg["runs"] if r["method"] == m for p in r["points"]
                       if p["step"] == 100]) for m in ("sft", "grpo")}
    assert end["sft"] - end["grpo"] > 0.01  # the naive end-of-training reading: "GRPO loses less OOD"
    f = by_id(agg)
    for fid in ("V1", "V2", "V3", "V3o"):
        assert f[fid]["verdict"] in ("inconclusive", "not reproduced"), (fid, f[fid]["measured"])
        assert all(abs(c["delta"]) < (end["sft"] - end["grpo"]) / 2 for c in f[fid]["numbers"]["levels"])
    # one stage: the visual sequence's findings are listed, not run, pointing at the preset that runs them
    assert f["V4"]["verdict"] == f["V5"]["verdict"] == NOT_RUN
    assert "needs `retain demo --vision`" in f["V4"]["measured"]


def test_a_method_that_never_learns_gpoints_vl_is_not_reached(tmp_path: Path) -> None:
    runs = []
    for s in range(4):
        runs.append(("sft", 1e-4, s, vision_results("sft", 1e-4, s, law_run(SFT_LAW, seed_noise(s)))))
        runs.append(("grpo", 1e-4, s, vision_results("grpo", 1e-4, s, law_run(
            GRPO_LAW, 0.0, gains1=(0.01, 0.02, 0.03, 0.04)))))
    f = by_id(aggregate(write_demo(tmp_path, runs)))
    assert all(f[i]["verdict"] == "not reached" for i in ("V1", "V2", "V3", "V3o", "V4")), f["V1"]["measured"]
    assert "not reached by grpo" in f["V1"]["measured"] and "as description" in f["V1"]["measured"]


# ----------------------------------------------------------------------------------------------------------------
# end to end, microscopic


def test_the_vision_demo_runs_end_to_end_at_a_microscopic_budget(tmp_path: Path, monkeypatch, one_thread) -> None:
    columns = VISION.eval_columns()
    tiny = VISION.model_copy(update={
        "seeds": [0], "lrs": [1e-4], "steps": 2, "stage_steps": {}, "warmup_steps": 0, "checkpoints": 1, "sft_batch": 2,
        "grpo_prompts": 2, "grpo_group": 2, "shift_prompts": 2, "token_examples": 4,
        "n_per_task": {c: 4 for c in [*columns, "facts", "reverse", "arith"] if c != "prior"}})
    monkeypatch.setitem(PRESETS, "vision", tiny)
    summary = run_demo(tmp_path, "vision", workers=0)
    assert summary["preset"] == "vision" and not summary["failed"] and len(summary["runs"]) == 2
    assert summary["base_model"].endswith("embedded/vlm") and set(summary["tokens"]) == set(SEQ)
    agg = aggregate(tmp_path)
    assert agg["eval_tasks"][:6] == ["gpoints_vl", "vcolor", "gpoints_vl@ood", "gpoints_vl@ood_visual", "cards",
                                     "cards@ood"]
    # the runner's own rows feed the visual readouts: the OOD splits and card recognition (per-card score) at stage 1
    stage1 = [p for r in agg["runs"] for p in r["points"] if p["stage"] == 1]
    assert len(stage1) == 4 and all({"ood_drop", "visual_ood_drop", "perception_drop", "perception_ood_drop"}
                                    <= set(p["readouts"]) for p in stage1)
    summary_json = json.loads((tmp_path / "report_files" / "summary.json").read_text())
    assert [f["id"] for f in summary_json["matched"]] == VISUAL_IDS  # every visual finding, with a verdict
    assert all(f["verdict"] in ("reproduced", "not reproduced", "inconclusive", "not reached")
               for f in summary_json["matched"])
    md = (tmp_path / "report.md").read_text()
    assert all(f"| {fid} |" in md for fid in VISUAL_IDS)
