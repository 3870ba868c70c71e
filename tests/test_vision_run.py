"""``retain run`` on the embedded VLM: a visual sequence under SFT and GRPO through the one runner (pictures through
data, rollout, reward, loss, evaluation and shift), resume after a finished stage, the token analysis on visual SFT
targets, and the configs it refuses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from retain import tasks
from retain.config import parse_experiment
from retain.errors import RetainError
from retain.runner import run_experiment

COLUMNS = ["vcount", "vcolor", "cards", "arith"]


def visual_run(method: dict) -> dict:
    return {"model": "vlm", "method": method, "stages": [{"task": "vcount"}, {"task": "vcolor"}],
            "eval": {"tasks": COLUMNS, "n": 4, "checkpoints": 2, "checkpoint_tasks": ["vcount"]},
            "shift": {"prompts": 3}}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the tiny VLM runs fastest on one thread


SFT = {"name": "sft", "batch_size": 4, "train": {"steps": 2, "lr": 1e-3}}
GRPO = {"name": "grpo", "data": {"prompts_per_step": 2, "group_size": 4}, "train": {"steps": 2, "lr": 1e-3}}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "sft"
    return out, run_experiment(parse_experiment(visual_run(SFT)), out)


def check_matrix(results: dict) -> None:
    assert results["tasks"] == ["vcount", "vcolor"] and results["eval_tasks"] == COLUMNS
    assert len(results["matrix"]) == 3 and all(len(row) == len(COLUMNS) for row in results["matrix"])
    assert all(0.0 <= a <= 1.0 for row in results["matrix"] for a in row)
    assert results["metrics"]["prior_columns"] == ["cards", "arith"]  # perception and the text priors
    assert all(kl >= -1e-6 for kl in results["shift"]["forward_kl_exact"])  # over text tokens given the picture
    assert len(results["shift"]["forward_kl"]) == 2


def test_sft_run_trains_the_vlm_on_pictures(sft_run):
    from safetensors.torch import load_file

    from retain.vision.model import VISION_EMBEDDED_DIR, load_vlm

    out, results = sft_run
    check_matrix(results)
    stage = json.loads((out / "stages" / "1" / "stage.json").read_text())
    assert 0.0 <= stage["row"]["cards"]["score"] <= 1.0  # card recognition, per card
    assert [p["step"] for p in stage["trajectory"]] == [1] and set(stage["trajectory"][0]["row"]) == {"vcount", "vcolor"}
    base, trained = load_file(VISION_EMBEDDED_DIR / "model.safetensors"), load_file(out / "stages/1/model/model.safetensors")
    tower = [k for k in base if "vision_tower" in k]
    assert tower and any(not torch.equal(base[k], trained[k]) for k in tower)  # the loss reached the pictures
    model, processor = load_vlm(out / "stages" / "2" / "model")  # a stage's directory loads the Hugging Face way
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.tokenizer.pad_token_id is not None


def test_grpo_run_scores_rollouts_of_pictures(tmp_path):
    results = run_experiment(parse_experiment(visual_run(GRPO)), tmp_path / "grpo")
    check_matrix(results)
    steps = [json.loads(line) for line in (tmp_path / "grpo" / "steps.jsonl").read_text().splitlines()]
    rewarded = [s for s in steps if "reward" in s]
    assert {s["stage"] for s in rewarded} == {1, 2} and all(0.0 <= s["reward"] <= 1.0 for s in rewarded)
    assert any(s["reward"] > 0 for s in rewarded)  # the base counts and names colours a little: the reward reads them


def test_resume_after_a_finished_stage_gives_the_same_results(sft_run, tmp_path):
    out, results = sft_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "results.json").unlink()
    shutil.rmtree(again / "stages" / "2")  # killed after stage 1 was done
    resumed = run_experiment(parse_experiment(visual_run(SFT)), again)
    assert resumed["matrix"] == results["matrix"] and resumed["shift"] == results["shift"]


def test_token_analysis_reads_visual_targets_given_the_picture():
    from retain.analysis.tokens import token_stats
    from retain.kind import model_kind

    kind = model_kind("vlm")
    model, tok = kind.load("vlm")
    examples = tasks.get("vcount").examples("train", 6)
    pairs = [(e.prompt, e.answer) for e in examples]
    seen = token_stats(model, tok, pairs, encode=kind.encode)
    assert len(seen.prob) == sum(len(e.answer) + 1 for e in examples)  # each answer's characters and its eos
    # the same targets with every picture replaced by another: the model's probabilities move with what it sees
    swapped = [(type(p)(str(p), examples[(i + 1) % 6].image, None), a) for i, (p, a) in enumerate(pairs)]
    assert not torch.allclose(torch.tensor(seen.prob), torch.tensor(token_stats(model, tok, swapped, encode=kind.encode).prob))


@pytest.mark.parametrize("change, refused", [
    ({"model": "base"}, "stages[0].task: task 'vcount' shows pictures, and model 'base' is a text model"),
    ({"method": "opd"}, "method: method 'opd' cannot train a vision-language model: loss.kind 'teacher_kl'"),
    ({"method": {"name": "rl_sample_sft", "data": {"source_model": "vlm"}}},
     "'rl_sample_sft' cannot train a vision-language model: data.source_model"),
    ({"mode": "streaming"}, "mode: model 'vlm' is a vision-language model; streaming mode trains text models only"),
    ({"trust_remote_code": True}, "trust_remote_code: model 'vlm' is a vision-language model; retain loads VLMs"),
])
def test_configs_a_vlm_run_cannot_take_are_refused_in_one_line(change, refused):
    with pytest.raises(RetainError) as err:
        parse_experiment({**visual_run(SFT), **change})
    assert refused in str(err.value) and "\n" not in str(err.value)


def test_a_text_model_refuses_a_visual_eval_column():
    with pytest.raises(RetainError, match=r"eval.tasks: task 'cards' shows pictures"):
        parse_experiment({"model": "base", "stages": [{"task": "arith"}], "eval": {"tasks": ["arith", "cards"]}})


def test_sampled_completions_never_hold_a_picture_token():
    """A GRPO run on the embedded VLM (seed 1, temperature 1) once sampled the ``<image>`` token: the policy's next
    forward over prompt + completion then counted one picture slot too many and failed. The engine suppresses the
    picture tokens; here a policy pushed to want ``<image>`` (+50 on its logit) samples it without suppression and
    never with it, and the forward over prompt + completion with the pictures runs."""
    from retain.vision.engine import VisionEngine, picture_token_ids
    from retain.vision.model import load_vlm

    model, processor = load_vlm("vlm")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert picture_token_ids(model.config) == [image_id]

    def wants_pictures(module, args, logits):
        logits[..., image_id] += 50.0
        return logits

    hook = model.lm_head.register_forward_hook(wants_pictures)
    try:
        prompts = [e.prompt for e in tasks.get("vcount").examples("test", 2)]
        engine = VisionEngine(model, processor)
        engine.suppressed = []
        unguarded = engine.generate(prompts, n=2, max_new_tokens=3, seed=0)
        assert any(image_id in c for c in unguarded.completion_ids)
        engine = VisionEngine(model, processor)
        rollout = engine.generate(prompts, n=2, max_new_tokens=3, seed=0)
    finally:
        hook.remove()
    assert all(image_id not in c for c in rollout.completion_ids) and all(rollout.completion_ids)
    for prompt, ids, completion in zip(rollout.prompts, rollout.prompt_ids, rollout.completion_ids):
        pixels = processor.image_processor(prompt.image.render(), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids + completion]), pixel_values=pixels)
