"""At home in the ecosystem: a reward function in TRL's signature from a user module (and TRL's own, unchanged), the
GRPO no-signal warning, model cards, TensorBoard and MLflow tracking read back through their own readers, and the
notebook API — on two tiny runs shared by the tests below."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import retain
from retain.config import parse_experiment
from retain.errors import RetainError
from retain.files import read_jsonl, verify_manifest
from retain.preflight import FLAT_LIMIT, WATCH_STEPS, FlatGroupWatch, signal_warning
from retain.runner import run_experiment
from retain.tasks import get

USER_MODULE = '''
def even_length(prompts, completions, answer, **columns):
    """1.0 for a completion of even length, 0.0 for odd; None (unscorable) where the row's answer is 'skip'."""
    return [None if a == "skip" else float(len(c) % 2 == 0) for c, a in zip(completions, answer)]
'''
WORDS = ["abc", "kiwi", "hello", "stone", "lamp", "frog", "milk", "dusk", "tree", "rock", "sand", "wind"]


def write_rows(path: Path) -> Path:
    rows = [{"prompt": f"reverse {w}", "answer": "skip" if i % 3 == 0 else w[::-1],
             "split": "train" if i < 8 else "test"} for i, w in enumerate(WORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "eco_user_rewards.py").write_text(USER_MODULE)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("eco_user_rewards", None)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, user_module, one_thread):
    """A micro model: SFT on arith, then GRPO on a dataset whose reward is the user's function; TensorBoard and
    MLflow both on."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from retain.models.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tracked")
    tok = build_tokenizer()
    torch.manual_seed(0)
    micro = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    micro.save_pretrained(root / "micro")
    tok.save_pretrained(root / "micro")
    grpo = {"name": "grpo", "data": {"prompts_per_step": 2, "group_size": 4}, "max_new_tokens": 8,
            "train": {"lr": 1e-2, "log_every": 1}}
    config = {
        "name": "eco", "model": str(root / "micro"), "report_to": ["tensorboard", "mlflow"],
        "datasets": {"rev": {"path": str(write_rows(root / "rev.jsonl")), "reward": "eco_user_rewards:even_length"}},
        "method": {"name": "sft", "batch_size": 4, "train": {"lr": 1e-2, "log_every": 1}},
        "stages": [{"task": "arith", "steps": 2}, {"task": "rev", "steps": 2, "method": grpo}],
        "eval": {"tasks": ["arith"], "n": 4}, "shift": {"prompts": 2},
    }
    out = root / "run"
    results = retain.run(config, out)
    return out, results


def test_notebook_api_tables(tracked_run):
    out, res = tracked_run
    raw = json.loads((out / "results.json").read_text())
    assert res.results == raw and retain.load(out).results == raw
    m = res.matrix
    assert list(m.columns) == raw["eval_tasks"] and m.index.names == ["stage", "task"]
    assert list(m.index) == [(0, "base"), (1, "arith"), (2, "rev")]
    assert m.to_numpy().tolist() == raw["matrix"]
    assert list(res.shift.index) == [1, 2] and res.shift["weight_l2"].tolist() == raw["shift"]["weight_l2"]
    assert res.metrics["average_accuracy"] == raw["metrics"]["average_accuracy"]
    steps = res.steps
    assert len(steps) == len(read_jsonl(out / "steps.jsonl")) == 4 and steps["stage"].tolist() == [1, 1, 2, 2]
    table = retain.compare([out])
    assert len(table) == 1 and table.loc[0, "average_accuracy"] == raw["metrics"]["average_accuracy"]
    assert (res.model_dir(2) / "model.safetensors").exists()
    with pytest.raises(RetainError, match="no stage 3"):
        res.model_dir(3)


def test_user_reward_function_trains_grpo_and_is_recorded(tracked_run):
    out, res = tracked_run
    assert res.results["rewards"] == {"rev": "eco_user_rewards.even_length"}
    grpo_steps = [s for s in read_jsonl(out / "steps.jsonl") if s["stage"] == 2]
    assert all("unscorable" in s and 0.0 <= s["reward"] <= 1.0 for s in grpo_steps)
    task = get("rev")
    assert task.reward("reverse abc", "ab") is None  # the row's answer is 'skip': unscorable, as TRL's None
    assert task.reward("reverse kiwi", "ab") == 1.0 and task.reward("reverse kiwi", "abc") == 0.0
    # accuracy is the verifier's, not the reward's: the matrix measures the task, whatever GRPO trains on
    assert task.is_correct("reverse kiwi", "iwik") and not task.is_correct("reverse kiwi", "ab")


def test_tensorboard_scalars_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, res = tracked_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = lambda name: [(e.step, e.value) for e in events.Scalars(name)]  # noqa: E731
    logged = read_jsonl(out / "steps.jsonl")
    # one step axis across stages: stage 2's steps follow stage 1's
    assert scalars("train/loss") == [(i + 1, pytest.approx(s["loss"])) for i, s in enumerate(logged)]
    assert scalars("train/reward") == [(3, pytest.approx(logged[2]["reward"])), (4, pytest.approx(logged[3]["reward"]))]
    assert [v for _, v in scalars("train/grad_norm")] == pytest.approx([s["grad_norm"] for s in logged])
    column = res.results["eval_tasks"].index("arith")
    assert scalars("eval/arith/accuracy") == [(k * 2, pytest.approx(row[column]))
                                              for k, row in enumerate(res.results["matrix"])]
    assert scalars("shift/weight_l2") == [(2, pytest.approx(res.results["shift"]["weight_l2"][0])),
                                          (4, pytest.approx(res.results["shift"]["weight_l2"][1]))]
    assert scalars("metrics/average_accuracy") == [(4, pytest.approx(res.metrics["average_accuracy"]))]
    assert "accuracy_matrix/text_summary" in events.Tags()["tensors"]


def test_mlflow_scalars_read_back(tracked_run):
    from mlflow.tracking import MlflowClient

    out, res = tracked_run
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("eco")
    (run,) = client.search_runs([experiment.experiment_id])
    history = lambda name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]  # noqa: E731
    logged = read_jsonl(out / "steps.jsonl")
    assert sorted(history("train/loss")) == [(i + 1, pytest.approx(s["loss"])) for i, s in enumerate(logged)]
    assert sorted(history("shift/from_base/forward/per_sequence")) == [
        (2 * (k + 1), pytest.approx(v)) for k, v in enumerate(res.results["shift"]["forward_kl"])]
    matrix = json.loads(Path(client.download_artifacts(run.info.run_id, "accuracy_matrix.json", str(out))).read_text())
    assert [row[1:] for row in matrix["data"]] == res.results["matrix"]
    assert matrix["columns"] == ["stage", *res.results["eval_tasks"]]


def test_every_stage_model_has_a_model_card(tracked_run):
    from huggingface_hub import ModelCard

    import retain as package

    out, res = tracked_run
    for stage, method in ((1, "sft"), (2, "grpo")):
        model_dir = res.model_dir(stage)
        assert verify_manifest(model_dir, required=True) is None  # the card is part of the verified directory
        card = ModelCard.load(model_dir / "README.md")
        assert card.data.library_name == "transformers" and {"retain", method} <= set(card.data.tags)
        assert f"after stage {stage} of 2" in card.text and f"retain {package.__version__}" in card.text
        row = json.loads((out / "stages" / str(stage) / "stage.json").read_text())["row"]
        for column, cell in row.items():
            assert f"| {column} | {cell['accuracy']:.4f} | {cell['n']} |" in card.text
        weight_l2 = res.results["shift"]["weight_l2"][stage - 1]
        assert f"| weight L2 distance | {weight_l2:.4f} |" in card.text
    assert "GRPO reward eco_user_rewards.even_length" in (res.model_dir(2) / "README.md").read_text()


def test_grpo_without_signal_warns_with_trl_reward_unchanged(tmp_path, one_thread):
    """The embedded base never writes <think>…</think>: TRL's think_format_reward, used as is, scores it 0."""
    from retain.report.aggregate import aggregate
    from retain.report.html import render_markdown

    cfg = parse_experiment({
        "name": "flat", "model": "base",
        "datasets": {"think": {"path": str(write_rows(tmp_path / "rev.jsonl")), "conversational": True,
                               "reward": "trl.rewards:think_format_reward"}},
        "method": {"name": "grpo", "data": {"prompts_per_step": 2, "group_size": 2}, "max_new_tokens": 6,
                   "train": {"lr": 1e-3}},
        "stages": [{"task": "think", "steps": 1}], "eval": {"tasks": [], "n": 2}, "shift": {"prompts": 0},
    })
    out = tmp_path / "run"
    results = run_experiment(cfg, out)
    (event,) = [e for e in read_jsonl(out / "events.jsonl") if e.get("kind") == "no_signal"]
    assert event["task"] == "think" and event["stage"] == 1 and event["pass_at_k"] == 0.0 and event["k"] == 2
    assert "'think'" in event["message"] and "pass@2" in event["message"] and "an SFT stage" in event["message"]
    assert [w["message"] for w in results["warnings"]] == [event["message"]]
    assert results["rewards"] == {"think": "trl.rewards.format_rewards.think_format_reward"}
    agg = aggregate(out)
    markdown = render_markdown({**agg, "matched": [], "learned": []}, [])
    assert "## Run warnings" in markdown and event["message"] in markdown
    assert "trl.rewards.format_rewards.think_format_reward" in markdown


def test_flat_groups_in_the_first_steps_warn_once():
    said = []
    watch = FlatGroupWatch("kg", 2, lambda message, flat: said.append((message, flat)))
    for _ in range(WATCH_STEPS + 2):
        watch({"step": 1, "flat_groups": 1.0})
    assert len(said) == 1 and said[0][1] == 1.0 and "stage 2 on 'kg'" in said[0][0] and "SFT stage" in said[0][0]
    quiet = FlatGroupWatch("kg", 1, lambda message, flat: said.append(message))
    for flat in (FLAT_LIMIT, FLAT_LIMIT, FLAT_LIMIT, 1.0):  # at the limit is not above it; later steps are not read
        quiet({"flat_groups": flat})
    assert len(said) == 1
    assert signal_warning("kg", 1, {"k": 8, "prompts": 32, "pass_at_k": 0.25, "flat_groups": 0.5}) is None


@pytest.mark.parametrize("reward,needle", [
    ("no_colon", "expected 'package.module:function'"),
    ("eco_missing_module_xyz:f", "cannot import module 'eco_missing_module_xyz'"),
    ("eco_user_rewards:nope", "has no attribute 'nope'"),
    ("eco_user_rewards:__doc__", "not a function"),
])
def test_bad_reward_spec_is_one_error_naming_the_field(tmp_path, user_module, reward, needle):
    data = {"datasets": {"rev": {"path": str(write_rows(tmp_path / "rev.jsonl")), "reward": reward}},
            "stages": [{"task": "rev"}]}
    with pytest.raises(RetainError, match="datasets.rev.reward") as err:
        parse_experiment(data, "exp.yaml")
    assert needle in str(err.value) and str(err.value).startswith("exp.yaml: ")


def test_dataset_names_and_trackers_are_checked(tmp_path, monkeypatch):
    rows = str(write_rows(tmp_path / "rev.jsonl"))
    with pytest.raises(RetainError, match="datasets.arith: task name 'arith' is built in"):
        parse_experiment({"datasets": {"arith": {"path": rows}}, "stages": [{"task": "arith"}]})
    with pytest.raises(RetainError, match="report_to"):
        parse_experiment({"report_to": ["comet"], "stages": [{"task": "arith"}]})
    import importlib.util

    from retain.tracking import Tracking, parse_report_to

    assert parse_report_to("tensorboard, mlflow,none") == ["tensorboard", "mlflow"]
    with pytest.raises(RetainError, match="unknown tracker 'wandbx'"):
        parse_report_to("wandbx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = parse_experiment({"report_to": ["mlflow"], "stages": [{"task": "arith"}]})
    with pytest.raises(RetainError, match=r"mlflow needs the mlflow package: pip install 'retain\[tracking\]'"):
        Tracking(cfg, tmp_path / "run")
    assert "report_to" not in cfg.model_dump()  # trackers watch a run; they are not part of what it is


# ---- lm-evaluation-harness tasks as columns of the accuracy matrix ----------------------------------------------


def test_lm_eval_tasks_are_matrix_columns_after_every_stage(tmp_path, micro_dir, monkeypatch, one_thread):
    """Against a stand-in lm_eval (its real run is the next test): called once per evaluation row with the model in
    memory, and its metric lands in that row's column."""
    import types

    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls.append({"training": pretrained.training, "batch_size": batch_size})

    def simple_evaluate(**kwargs):
        calls[-1].update(tasks=kwargs["tasks"], limit=kwargs["limit"], num_fewshot=kwargs["num_fewshot"])
        return {"results": {"general": {"alias": "general", "acc,none": len(calls) / 10, "acc_stderr,none": 0.1}},
                "n-samples": {"general": {"original": 50, "effective": 5}}}

    root, models, hf = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"))
    root.simple_evaluate, hf.HFLM, root.models, models.huggingface = simple_evaluate, HFLM, models, hf
    for name, module in (("lm_eval", root), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, module)
    cfg = parse_experiment({
        "model": str(micro_dir), "method": {"name": "sft", "batch_size": 4, "train": {"lr": 1e-2}},
        "stages": [{"task": "arith", "steps": 1}, {"task": "reverse", "steps": 1}],
        "eval": {"tasks": ["arith"], "n": 2, "lm_eval": {"tasks": ["general"], "limit": 5, "num_fewshot": 0}},
        "shift": {"prompts": 0},
    })
    results = run_experiment(cfg, tmp_path / "run")
    column = results["eval_tasks"].index("lm_eval:general")
    assert [row[column] for row in results["matrix"]] == pytest.approx([0.1, 0.2, 0.3])
    assert [n[column] for n in results["eval_n"]] == [5, 5, 5]
    assert calls == [{"training": False, "batch_size": 8, "tasks": ["general"], "limit": 5, "num_fewshot": 0}] * 3
    assert "lm_eval:general" in results["metrics"]["prior_columns"]  # forgetting of it counts as prior drop


def test_real_lm_eval_task_as_a_column(tmp_path, one_thread):
    """With lm-eval installed (skipped otherwise): a generation task from a local JSONL file, no hub."""
    pytest.importorskip("lm_eval")
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse {w}", "answer": w[::-1]}) + "\n" for w in WORDS[:3]))
    task = {"task": "retain_reverse_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{prompt}}", "output_type": "generate_until",
            "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}],
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}}
    cfg = parse_experiment({
        "model": "base", "method": {"name": "sft", "batch_size": 4, "train": {"lr": 1e-4}},
        "stages": [{"task": "arith", "steps": 1}],
        "eval": {"tasks": [], "n": 2, "lm_eval": {"tasks": [task], "apply_chat_template": True, "batch_size": 3}},
        "shift": {"prompts": 0},
    })
    results = run_experiment(cfg, tmp_path / "run")
    column = results["eval_tasks"].index("lm_eval:retain_reverse_gen")
    assert results["matrix"][0][column] == 1.0  # the embedded model reverses strings
    assert 0.0 <= results["matrix"][1][column] <= 1.0 and results["eval_n"][1][column] == 3
    cell = json.loads((tmp_path / "run" / "stages" / "1" / "stage.json").read_text())["row"][
        "lm_eval:retain_reverse_gen"]
    assert cell["metric"] == "exact_match" and cell["scores"]["exact_match"] == results["matrix"][1][column]


def test_a_sweeps_runs_are_runs_of_one_mlflow_experiment(tmp_path, micro_dir, one_thread):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from retain.sweep import parse_sweep, run_sweep

    sweep = parse_sweep({
        "name": "grid", "model": str(micro_dir), "method": {"name": "sft", "batch_size": 2, "train": {"lr": 1e-2}},
        "stages": [{"task": "arith", "steps": 1}], "eval": {"tasks": [], "n": 2}, "shift": {"prompts": 0},
        "grid": {"seed": [0, 1]},
    })
    summary = run_sweep(sweep, tmp_path / "sweep", workers=0, report_to=["mlflow"])
    assert not summary["failed"]
    client = MlflowClient(tracking_uri=(tmp_path / "sweep" / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["seed=0", "seed=1"]
    assert all(r.info.status == "FINISHED" and "train/loss" in r.data.metrics for r in runs)
