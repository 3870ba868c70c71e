"""The demo's experimental design (SPEC §2.4): equal budgets, a log-spaced lr grid, fixed full evaluation splits
with checkpoints, the plan as a sweep grid — checked on the presets themselves, without training anything."""

from __future__ import annotations

import math

import pytest

from retain.config import parse_experiment
from retain.demo import PRESETS, demo_sweep, plan, run_demo
from retain.errors import RetainError
from retain.sweep import expand


@pytest.mark.parametrize("name", ["default", "core", "full", "atomic"])
def test_every_method_gets_the_same_steps_warmup_and_lr_grid(name: str) -> None:
    preset = PRESETS[name]
    runs = expand(demo_sweep(preset, preset.methods), name)
    assert len(runs) == len(preset.methods) * len(preset.lrs) * len(preset.seeds)
    budgets = set()
    for run in runs:
        for k in range(len(run.experiment.stages)):
            train = run.experiment.stage_method(k).train
            budgets.add((train.steps, train.warmup_steps))
    assert budgets == {(preset.steps, preset.warmup_steps)} and preset.warmup_steps > 0
    lrs = sorted(preset.lrs)
    assert len(lrs) >= 4
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # log-spaced
    per_method = {m: sorted({r.values["method.train.lr"] for r in runs if r.values["method"]["name"] == m})
                  for m in preset.methods}
    assert all(v == lrs for v in per_method.values())  # one grid for every method


@pytest.mark.parametrize("name", ["quick", "default", "core", "full"])
def test_evaluation_is_fixed_full_splits_with_checkpoints_and_nll(name: str) -> None:
    preset = PRESETS[name]
    first, other = (parse_experiment(preset.experiment("x", "sft", preset.lrs[0], s, "base")) for s in (0, 1))
    assert first.eval.n is None and first.eval.seed == other.eval.seed  # the same prompts for every seed
    assert first.nll_columns() == ["facts", "reverse", "arith"]
    # every OOD column at every checkpoint: findings 6 and 14 decide GeneralPoints' OOD drop at matched gain
    ood = {"gpoints@ood"} if "gpoints" in preset.sequence else set()
    assert set(first.checkpoint_columns()) == {*preset.sequence, *ood, "facts", "reverse", "arith"}
    assert len(first.eval.checkpoint_steps(preset.steps)) >= (4 if name == "quick" else 5)
    grpo = parse_experiment(preset.experiment("x", "grpo", preset.lrs[0], 0, "base")).stage_method(0)
    assert grpo.data.reward == "binary"


def test_the_core_contrast_has_its_seeds_and_the_full_preset_eight() -> None:
    assert {"sft", "grpo"} <= set(PRESETS["default"].methods)
    assert len(PRESETS["full"].seeds) >= 8 and len(PRESETS["full"].sequence) >= 2
    core = PRESETS["core"]  # finding 2 with power: 8 seeds at --full's stage budget
    assert core.methods == ["sft", "grpo"] and len(core.seeds) >= 8 and core.steps == PRESETS["full"].steps
    assert {"sft", "grpo", "self_sft", "iterative_sft", "eaft", "conflict_sft", "replay", "multitask", "sft_likely",
            "sft_unlikely", "grpo_positive", "sdft_live", "sft_varied", "dft", "psft", "chord", "sdft"} == set(
        PRESETS["full"].methods)


def test_methods_on_their_own_samples_get_grpos_rollout_budget() -> None:
    preset = PRESETS["full"]
    for name in ("grpo_positive", "sdft_live", "sdft", "chord"):
        method = parse_experiment(preset.experiment("x", name, 1e-4, 0, "base")).stage_method(0)
        assert (method.data.prompts_per_step, method.data.group_size, method.data.reward) == (
            preset.grpo_prompts, preset.grpo_group, "binary")
        assert preset.budget(name) == preset.budget("grpo")
    assert parse_experiment(preset.experiment("x", "grpo_positive", 1e-4, 0, "base")).stage_method(0).loss.positive_only


def test_replay_in_the_demo_replays_the_prior_skills() -> None:
    preset = PRESETS["full"]
    method = parse_experiment(preset.experiment("x", "replay", 1e-4, 0, "base")).stage_method(0)
    assert method.replay is not None and method.replay.prior_ratio == preset.replay_prior > 0


def test_plan_lists_sweep_directories_and_budgets_state_sequences() -> None:
    preset = PRESETS["default"]
    runs = plan(preset, ["sft", "grpo"])
    assert runs[0]["dir"].startswith("runs/method=sft,method.train.lr=")
    assert {(r["method"], r["lr"], r["seed"]) for r in runs} == {
        (m, lr, s) for m in ("sft", "grpo") for lr in preset.lrs for s in preset.seeds}
    assert preset.budget("grpo")["sequences"] == preset.steps * preset.grpo_prompts * preset.grpo_group
    assert preset.budget("sft")["steps"] == preset.budget("grpo")["steps"]
    assert all(math.isfinite(r["lr"]) for r in runs)


def test_bad_demo_arguments_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(RetainError, match="unknown demo preset"):
        run_demo(tmp_path, "nope")
    with pytest.raises(RetainError, match="unknown method"):
        run_demo(tmp_path, "quick", methods=["sft", "nope"])
    with pytest.raises(RetainError, match="--lrs"):
        run_demo(tmp_path, "quick", lrs=[-1.0])
    assert not any(tmp_path.iterdir())  # nothing written


def test_stage_steps_and_sft_target_apply_to_every_method_alike() -> None:
    from retain.demo import DemoPreset

    preset = DemoPreset(name="x", sequence=["sort", "gpoints"], methods=["sft", "grpo", "sft_likely", "multitask"],
                        seeds=[0], lrs=[1e-4], steps=8, stage_steps={"gpoints": 3}, sft_target="every")
    runs = expand(demo_sweep(preset, preset.methods), "x")
    for run in runs:
        assert [run.experiment.stage_method(k).train.steps for k in range(2)] == [8, 3]
    data = {r.values["method"]["name"]: r.experiment.stage_method(0).data for r in runs}
    assert data["sft"].target == "every"
    assert data["sft_likely"].target == "likely"  # a method's own target is kept
    assert data["multitask"].target == "canonical" and data["grpo"].kind == "on_policy"
    assert preset.budget("sft")["stage_steps"] == {"sort": 8, "gpoints": 3}
    with pytest.raises(ValueError, match="stage_steps: kg not in the sequence"):
        DemoPreset(name="x", sequence=["sort"], seeds=[0], lrs=[1e-4], steps=8, stage_steps={"kg": 2})
    with pytest.raises(ValueError, match="stage_steps"):
        DemoPreset(name="x", sequence=["sort"], seeds=[0], lrs=[1e-4], steps=8, stage_steps={"sort": 0})
