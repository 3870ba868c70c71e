"""The readouts the matched-gain verdicts stand on: fixed full splits with selection / test halves, per-item flips,
prior-skill answer NLL, in-stage checkpoint trajectories (and their resume), GRPO's binary reward, prior replay."""

from __future__ import annotations

import math
import random

import pytest

from retain.config import parse_experiment
from retain.errors import RetainError
from retain.evaluate import answer_nll, flips, halves
from retain.runner import run_experiment


def test_halves_split_even_and_odd_positions() -> None:
    got = halves([True, False, True, True, False])  # selection = positions 0, 2, 4; test = 1, 3
    assert got == {"selection": pytest.approx(2 / 3), "test": pytest.approx(1 / 2)}
    assert halves([]) == {"selection": None, "test": None}


def test_flips_count_transitions_item_by_item() -> None:
    assert flips("1100", "1010") == {"forgotten": 1, "learned": 1, "n": 4}
    assert flips("111", "111") == {"forgotten": 0, "learned": 0, "n": 3}
    with pytest.raises(ValueError, match="same items"):
        flips("10", "101")


def test_answer_nll_is_the_teacher_forced_answer_loss(micro_model, tokenizer) -> None:
    from retain import tasks as task_registry
    from retain.logprobs import answer_logprobs

    got = answer_nll(micro_model, tokenizer, "arith", n=7, seed=3)
    examples = task_registry.get("arith").examples("test", 7, seed=3)
    rows = answer_logprobs(micro_model, tokenizer, [(e.prompt, e.answer) for e in examples])
    total = -sum(sum(r) for r in rows)
    assert got["n"] == 7
    assert got["nll"] == pytest.approx(total / 7)
    assert got["nll_per_token"] == pytest.approx(total / sum(len(r) for r in rows))
    assert got["nll"] > 0  # a random model is unsure of every answer


def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step() -> None:
    cfg = parse_experiment({"stages": [{"task": "arith"}], "eval": {"checkpoints": 5}})
    assert cfg.eval.checkpoint_steps(40) == [8, 16, 24, 32, 40]
    assert cfg.eval.checkpoint_steps(3) == [1, 2, 3]  # fewer steps than checkpoints: every step
    assert cfg.eval.checkpoint_steps(0) == [0]


def test_eval_config_names_bad_columns() -> None:
    with pytest.raises(RetainError, match="eval.nll"):
        parse_experiment({"stages": [{"task": "arith"}], "eval": {"tasks": ["arith"], "nll": ["facts"]}})
    with pytest.raises(RetainError, match="n_per_task"):
        parse_experiment({"stages": [{"task": "arith"}], "eval": {"n_per_task": {"arith": 0}}})


def _experiment(model_dir, checkpoint_every=None, steps=6):
    train = {"lr": 1e-2, "steps": steps, "warmup_steps": 2}
    if checkpoint_every:
        train["checkpoint_every"] = checkpoint_every
    return parse_experiment({
        "name": "traj", "model": str(model_dir), "seed": 5,
        "method": {"name": "sft", "batch_size": 4, "train": train},
        "stages": [{"task": "arith"}, {"task": "reverse"}],
        "eval": {"tasks": ["arith", "reverse", "facts"], "n": 10, "n_per_task": {"facts": 6}, "seed": 0,
                 "checkpoints": 3, "checkpoint_tasks": ["facts"], "nll": ["facts"]},
        "shift": {"prompts": 0},
    })


def test_trajectories_hold_every_checkpoint_with_fixed_prompts(micro_dir, tmp_path) -> None:
    results = run_experiment(_experiment(micro_dir), tmp_path / "run")
    traj = results["trajectories"]
    assert [[p["step"] for p in stage] for stage in traj] == [[0, 2, 4, 6], [0, 2, 4, 6]]
    assert traj[1][0]["row"] == traj[0][-1]["row"]  # stage 2 starts where stage 1 ended
    inner = traj[0][1]["row"]
    assert set(inner) == {"arith", "reverse", "facts"}  # the stage tasks always, plus the checkpoint columns
    assert inner["facts"]["n"] == 6 and len(inner["facts"]["correct"]) == 6 and "nll" in inner["facts"]
    end = traj[0][-1]["row"]
    assert set(end) == set(results["eval_tasks"]) and "nll" not in end["arith"]
    for stage in traj:  # the NLL moves as the weights do (lr 1e-2), and every cell reports its halves
        nlls = [p["row"]["facts"]["nll"] for p in stage]
        assert len(set(nlls)) == len(nlls)
        assert all(p["row"]["arith"]["selection"] is not None for p in stage)
    assert set(results["flips"]) == set(results["eval_tasks"])
    # eval.seed fixes the prompts: another run seed is evaluated on the very same items
    other = _experiment(micro_dir).model_copy(update={"seed": 6})
    from retain.stage_eval import evaluate_row
    from retain.models.loading import load_model

    model, tok = load_model(str(micro_dir))
    assert evaluate_row(model, tok, other)["facts"]["correct"] == traj[0][0]["row"]["facts"]["correct"]


def test_checkpoint_evaluation_leaves_training_unchanged(micro_dir, tmp_path) -> None:
    with_points = run_experiment(_experiment(micro_dir), tmp_path / "a")
    plain_cfg = _experiment(micro_dir)
    plain_cfg = plain_cfg.model_copy(update={"eval": plain_cfg.eval.model_copy(update={"checkpoints": 1})})
    plain = run_experiment(plain_cfg, tmp_path / "b")
    assert with_points["matrix"] == plain["matrix"]  # the RNG state is restored around every evaluation


def test_a_stage_resumed_mid_way_keeps_and_completes_its_points(micro_dir, tmp_path, monkeypatch) -> None:
    """Kill the run while it evaluates the checkpoint at step 4 (after the Trainer saved that step's checkpoint):
    the resume evaluates step 4 from the checkpoint's weights and the trajectory equals an uninterrupted run's."""
    from retain import stage_eval

    cfg = _experiment(micro_dir, checkpoint_every=2)
    whole = run_experiment(cfg, tmp_path / "whole")
    calls = {"n": 0}
    real = stage_eval.evaluate_row

    def dying(model, tok, c, columns=None):
        if columns is not None:
            calls["n"] += 1
            if calls["n"] == 2:  # the second in-stage point of stage 1: step 4
                raise KeyboardInterrupt
        return real(model, tok, c, columns)

    monkeypatch.setattr(stage_eval, "evaluate_row", dying)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut")
    monkeypatch.setattr(stage_eval, "evaluate_row", real)
    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["trajectories"] == whole["trajectories"]
    assert resumed["matrix"] == whole["matrix"]


def test_binary_reward_scores_correct_one_and_everything_else_zero(micro_model, tokenizer) -> None:
    from retain import tasks as task_registry
    from retain.methods.config import method_config
    from retain.methods.grpo import GRPOObjective
    from retain.methods.stage import MethodState, StageContext

    task = task_registry.get("gpoints")
    ex = task.examples("train", 1, seed=0)[0]
    ctx = StageContext(model=micro_model, reference=micro_model, tokenizer=tokenizer, task_name="gpoints", task=task,
                       stage_index=0, seen_tasks=[], seed=0, state=MethodState(), engine="kv_cache", log=None)
    values = ex.meta.get("values") or ()
    wrong_value = "+".join(str(v) for v in values) if values else "1+1"
    shaped = GRPOObjective(method_config({"name": "grpo", "data": {"reward": "task"}}), ctx)
    binary = GRPOObjective(method_config({"name": "grpo", "data": {"reward": "binary"}}), ctx)
    assert binary._reward(ex.prompt, ex.answer) == 1.0 == shaped._reward(ex.prompt, ex.answer)
    assert binary._reward(ex.prompt, "junk") == 0.0
    partial = shaped._reward(ex.prompt, wrong_value)
    if 0 < partial < 1:  # a legal expression with the hand's values but another value: shaped gives partial credit
        assert binary._reward(ex.prompt, wrong_value) == 0.0


def test_prior_replay_mixes_the_prior_skills_into_every_batch() -> None:
    from retain.methods.sources import FixedPairs, WithReplay, prior_pairs

    prior = prior_pairs(["prior"])
    assert set(prior) == {"facts", "reverse", "arith"} and all(prior.values())
    own = FixedPairs([("p", "a")], "own")
    mixed = WithReplay(own, {}, 0.0, prior, 0.25)
    batch = mixed.sample(random.Random(0), 32, 0)
    assert len(batch) == 32 and sum(p == ("p", "a") for p in batch) == 24  # round(0.25 · 32) = 8 replayed
    prior_set = {pair for pairs in prior.values() for pair in pairs}
    assert all(p in prior_set for p in batch if p != ("p", "a"))
    tiny = WithReplay(own, {}, 0.0, prior, 0.9)
    assert sum(p == ("p", "a") for p in tiny.sample(random.Random(0), 2, 0)) == 1  # the stage's task keeps one


def test_replay_config_checks_its_shares() -> None:
    from retain.methods.config import method_config

    with pytest.raises(RetainError, match="ratio"):
        method_config({"name": "replay", "replay": {"ratio": 0.0}})
    with pytest.raises(RetainError, match="prior_tasks"):
        method_config({"name": "replay", "replay": {"prior_ratio": 0.2, "prior_tasks": ["nope"]}})
    assert method_config({"name": "replay", "replay": {"ratio": 0.0, "prior_ratio": 0.3}}).replay.prior_ratio == 0.3


def test_nll_readout_is_finite_for_every_prior_column(micro_dir, tmp_path) -> None:
    results = run_experiment(_experiment(micro_dir, steps=2), tmp_path / "r")
    for stage in results["trajectories"]:
        for point in stage:
            assert math.isfinite(point["row"]["facts"]["nll"])
