"""Pretraining on a short budget (the recipe runs, writes a loadable model, is deterministic) and the shipped
embedded base model (it knows its prior skills, leaves headroom on the sequence tasks)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from retain.evaluate import evaluate
from retain.models.loading import load_model
from retain.pretrain import PretrainConfig, pretrain

SHORT = dict(steps=6, batch_size=8, eval_n=4, eval_samples=2, warmup_steps=1,
             mixture={"reverse": 1.0, "arith": 1.0, "countdown": 0.5})


def test_short_pretraining_writes_a_loadable_model_deterministically(tmp_path):
    a = pretrain(PretrainConfig(**SHORT), tmp_path / "a")
    pretrain(PretrainConfig(**SHORT), tmp_path / "b")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "eval.json", "pretrain.json"):
        assert (tmp_path / "a" / name).exists(), name
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)  # same seed, same weights
    assert set(a["eval"]) == {"reverse", "arith", "countdown"} and a["eval"]["arith"]["k"] == 2
    assert json.loads((tmp_path / "a" / "pretrain.json").read_text())["peak_rss_mb"] > 0
    model, tok = load_model(tmp_path / "a")
    assert sum(p.numel() for p in model.parameters()) == a["parameters"]
    other = pretrain(PretrainConfig(**{**SHORT, "seed": 1}), tmp_path / "c")
    wc = load_file(tmp_path / "c" / "model.safetensors")
    assert any(not (wa[k] == wc[k]).all() for k in wa)
    assert not (tmp_path / "a.tmp").exists()
    from retain.files import verify_manifest

    assert verify_manifest(tmp_path / "a") is None  # published like a stage's model: with its files' sha256


def test_pretrain_config_rejects_unknown_task_and_preset():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown task 'nope'"):
        PretrainConfig(mixture={"nope": 1.0})
    with pytest.raises(ValidationError, match="unknown preset"):
        PretrainConfig(preset="huge")


@pytest.fixture(scope="module")
def base():
    return load_model("base")


def test_embedded_base_knows_its_prior_skills(base):
    model, tok = base
    scores = evaluate(model, tok, "prior", n=96)
    assert all(s["accuracy"] >= 0.9 for s in scores.values()), scores


def test_embedded_base_leaves_headroom_with_signal_on_the_sequence(base):
    model, tok = base
    scores = evaluate(model, tok, "sequence", n=96, samples=16)
    for name, s in scores.items():  # room for the demo's +10-pt learned gate three times over (sort sits at ~60%)
        assert s["accuracy"] <= 0.7, (name, s)
        assert s["pass_at_k"] >= 0.05, (name, s)


def test_cli_eval_json_shape(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "retain.cli", "eval", "--model", "base", "--tasks", "arith,reverse", "--n", "8",
         "--samples", "2", "--json"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)
    assert set(scores) == {"arith", "reverse"}
    assert {"accuracy", "pass_at_k", "k", "n"} <= set(scores["arith"]) and scores["arith"]["k"] == 2


def test_a_second_phase_continues_a_model_and_keeps_its_history(tmp_path):
    """``init``: the phase starts from the given model (not from scratch) and its pretrain.json carries the
    phases before it, oldest first; the CLI refuses --phase sort without --init in one line."""
    from retain.pretrain import SORT_MIXTURE, PretrainConfig, pretrain

    cfg = PretrainConfig(init="base", steps=1, batch_size=4, lr=1e-9, schedule="constant", warmup_steps=0,
                         mixture=dict(SORT_MIXTURE), eval_n=4, eval_samples=0)
    result = pretrain(cfg, tmp_path / "phase2")
    record = json.loads((tmp_path / "phase2" / "pretrain.json").read_text())
    assert record["config"]["init"] == "base" and record["config"]["steps"] == 1
    assert [p["config"]["steps"] for p in record["earlier_phases"]] == [2000, 320]  # the shipped base's two phases
    assert result["eval"]["facts"]["accuracy"] == 1.0  # a 1e-9 step from the base keeps its facts: not from scratch
    out = subprocess.run([sys.executable, "-m", "retain.cli", "pretrain", "--phase", "sort", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "--phase sort continues a model: give --init DIR" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
