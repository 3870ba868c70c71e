"""The lm-evaluation-harness wrapper: its import guard, and what it hands lm_eval (against a stand-in module; the
real lm-eval is an optional extra, not installed for the tests)."""

from __future__ import annotations

import sys
import types

import pytest

from retain.errors import RetainError
from retain.metrics.lmeval import evaluate_general, summarize


def test_without_lm_eval_one_clear_error(monkeypatch, micro_model, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(RetainError, match=r"pip install 'retain\[lmeval\]'"):
        evaluate_general(micro_model, tokenizer, ["arc_easy"])


@pytest.fixture()
def fake_lm_eval(monkeypatch):
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"] = {"pretrained": pretrained, "tokenizer": tokenizer, "batch_size": batch_size,
                             "training": pretrained.training}

    def simple_evaluate(**kwargs):
        calls["evaluate"] = kwargs
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01,
                                         "acc,strict-match": 0.25, "flag": True}}}

    root, models, hf = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"))
    root.simple_evaluate, hf.HFLM, root.models, models.huggingface = simple_evaluate, HFLM, models, hf
    for name, module in (("lm_eval", root), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_wraps_the_model_in_memory_and_summarizes(fake_lm_eval, micro_model, tokenizer):
    micro_model.train()
    scores = evaluate_general(micro_model, tokenizer, ["arc_easy"], num_fewshot=0, limit=10, batch_size=4, seed=3)
    assert scores == {"arc_easy": {"acc": 0.5, "acc_stderr": 0.01, "acc,strict-match": 0.25}}
    hflm, ev = fake_lm_eval["hflm"], fake_lm_eval["evaluate"]
    assert hflm["pretrained"] is micro_model and hflm["tokenizer"] is tokenizer and hflm["batch_size"] == 4
    assert hflm["training"] is False and micro_model.training  # evaluated in eval mode, then restored
    assert ev["tasks"] == ["arc_easy"] and ev["num_fewshot"] == 0 and ev["limit"] == 10
    assert ev["random_seed"] == ev["numpy_random_seed"] == ev["torch_random_seed"] == ev["fewshot_random_seed"] == 3


def test_a_lora_model_is_evaluated_merged(fake_lm_eval, micro_model, tokenizer):
    from retain.models import adapters
    from retain.methods.config import AdapterConfig

    lora = adapters.attach(micro_model, AdapterConfig(r=2, target_modules=["q_proj"]))
    evaluate_general(lora, tokenizer, ["arc_easy"])
    assert not adapters.is_adapted(fake_lm_eval["hflm"]["pretrained"]) and adapters.is_adapted(lora)


def test_no_tasks_and_non_main_ranks():
    with pytest.raises(RetainError, match="no lm-eval tasks"):
        evaluate_general(None, None, [])
    assert summarize(None) == {}


def test_real_lm_eval_on_local_tasks(tmp_path):
    """With lm-eval installed (skipped otherwise): the embedded model on two lm_eval tasks built from a local JSONL
    file (no hub access): a generation task scored by exact match, a multiple-choice one by log-likelihood."""
    pytest.importorskip("lm_eval")
    import json

    from retain.models.loading import load_model

    data = tmp_path / "reverse.jsonl"
    rows = [{"prompt": f"reverse {w}", "answer": w[::-1]} for w in ("abc", "hello", "kiwi")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "{{prompt}}"}
    gen = {**source, "task": "retain_reverse_gen", "output_type": "generate_until", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
           "metric_list": [{"metric": "exact_match"}]}
    choice = {**source, "task": "retain_reverse_mc", "output_type": "multiple_choice", "doc_to_target": 0,
              "doc_to_choice": "{{[answer, prompt[-3:]]}}", "metric_list": [{"metric": "acc"}]}
    model, tok = load_model("base")
    scores = evaluate_general(model, tok, [gen, choice], apply_chat_template=True, batch_size=2)
    assert scores["retain_reverse_gen"]["exact_match"] == 1.0  # the embedded model reverses strings
    assert 0.0 <= scores["retain_reverse_mc"]["acc"] <= 1.0
