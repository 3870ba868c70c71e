"""The vLLM engine for a vision-language model (``retain.vision.vllm_engine``) on CPU, against the stand-in ``vllm``
module (``vllm_stand_in``) and the embedded VLM: what goes into vLLM (the requests with their pictures, the banned
picture tokens, the weights under their checkpoint names), what comes back to the training loop (the processor's
prompt ids, the eos cuts), and how a config picks it. What a real vLLM does with those calls is not tested here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from vllm_stand_in import LLM, stand_in_vllm

from retain import tasks
from retain.config import parse_experiment
from retain.errors import RetainError
from retain.rollout import make_engine
from retain.tasks.base import PicturePrompt
from retain.vision.engine import VisionEngine, picture_token_ids
from retain.vision.kind import VisionModels
from retain.vision.model import IMAGE, IMAGE_TOKENS, VISION_EMBEDDED_DIR, load_vlm, vision_prompt_text
from retain.vision.vllm_engine import VisionVLLMEngine, checkpoint_name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny VLM runs fastest on one thread (and two threads thrash on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def vlm():
    return load_vlm("vlm")


@pytest.fixture()
def fake_vllm(monkeypatch, vlm):
    with stand_in_vllm(monkeypatch, vlm[1].tokenizer.eos_token_id) as module:
        yield module


def picture_prompts(k: int = 2) -> list[PicturePrompt]:
    return [e.prompt for e in tasks.get("vcount").examples("test", k)]


class Shown:
    """A picture that renders as one PIL image object, to follow that very object into the requests."""

    def __init__(self, image):
        self.image = image

    def render(self):
        return self.image


def engine_for(vlm) -> VisionVLLMEngine:
    model, processor = vlm
    engine = VisionModels("vlm", processor).engine("vllm")(model, processor.tokenizer)  # the config's choice
    assert type(engine) is VisionVLLMEngine
    return engine


def test_llm_built_with_the_tokenizer_and_one_picture_a_prompt(fake_vllm, vlm):
    model, _ = vlm
    engine_for(vlm)
    (llm,) = LLM.instances
    assert llm.kwargs["model"] == model.config._name_or_path == str(VISION_EMBEDDED_DIR)
    assert llm.kwargs["skip_tokenizer_init"] is False  # vLLM tokenizes the prompt text and runs the processor itself
    assert llm.kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"  # the text engine's arguments otherwise


def test_requests_carry_each_prompts_picture_and_placeholder_text(fake_vllm, vlm):
    shown = [PicturePrompt(str(p), Shown(p.image.render()), p.answer) for p in picture_prompts()]
    engine = engine_for(vlm)
    engine.generate(shown, n=3, temperature=0.7, max_new_tokens=4, seed=5)
    (llm,) = LLM.instances
    inputs, _ = llm.requests[-1]
    assert len(inputs) == 6
    for row, request in enumerate(inputs):
        prompt = shown[row // 3]
        assert set(request) == {"prompt", "multi_modal_data"}
        assert request["prompt"] == vision_prompt_text(prompt) and request["prompt"].count(IMAGE) == 1
        assert request["multi_modal_data"]["image"] is prompt.image.image  # the very picture rendered for it

    real = picture_prompts()
    engine.generate(real, n=2, max_new_tokens=2, seed=0)
    inputs, _ = llm.requests[-1]
    pixels = [np.asarray(p.image.render()) for p in real]
    assert not np.array_equal(pixels[0], pixels[1])  # two different pictures: the check below can tell them apart
    for row, request in enumerate(inputs):
        assert np.array_equal(np.asarray(request["multi_modal_data"]["image"]), pixels[row // 2])


def test_picture_tokens_banned_in_every_sample(fake_vllm, vlm):
    model, processor = vlm
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert picture_token_ids(model.config) == [image_id] == [102]
    engine = engine_for(vlm)
    engine.generate(picture_prompts(), n=3, temperature=0.7, max_new_tokens=4, seed=11)
    (llm,) = LLM.instances
    _, params = llm.requests[-1]
    assert len(params) == 6 and all(p.logit_bias == {image_id: float("-inf")} for p in params)
    # the text engine's sampling otherwise: per-sample seeds, eos stop, no detokenizing
    assert [p.seed for p in params] == [11 * 1_000_003 + i for i in range(6)]
    assert all(p.temperature == 0.7 and p.max_tokens == 4 and p.n == 1 for p in params)
    assert all(p.stop_token_ids == [processor.tokenizer.eos_token_id] and p.detokenize is False for p in params)
    engine.generate(picture_prompts(1), greedy=True, max_new_tokens=2)
    (greedy,) = llm.requests[-1][1]
    assert greedy.temperature == 0.0 and greedy.seed is None and greedy.logit_bias == {image_id: float("-inf")}


def test_prompt_ids_are_the_hf_engines(fake_vllm, vlm):
    model, processor = vlm
    prompts = picture_prompts(3)
    ours = engine_for(vlm).generate(prompts, n=2, temperature=0.7, max_new_tokens=3, seed=0)
    hf = VisionEngine(model, processor, batch_size=4).generate(prompts, n=2, greedy=True, max_new_tokens=1)
    assert ours.prompt_ids == hf.prompt_ids
    # the processor's expansion of the placeholder (what the training forward sees), not the text's single <image>
    assert all(ids.count(102) == IMAGE_TOKENS == 9 for ids in ours.prompt_ids)
    assert ours.prompts == hf.prompts and ours.group == hf.group == [0, 0, 1, 1, 2, 2]


def test_text_prompts_go_in_as_the_hf_engines_ids(fake_vllm, vlm):
    model, processor = vlm
    prompts = ["reverse abc", "reverse hello"]
    ours = engine_for(vlm).generate(prompts, n=2, max_new_tokens=2, seed=0)
    (llm,) = LLM.instances
    inputs, _ = llm.requests[-1]
    hf = VisionEngine(model, processor).generate(prompts, n=2, greedy=True, max_new_tokens=1)
    assert ours.prompt_ids == hf.prompt_ids
    assert inputs == [{"prompt_token_ids": ids} for ids in hf.prompt_ids]


def test_completions_cut_at_eos_as_the_text_engine(fake_vllm, vlm):
    eos = vlm[1].tokenizer.eos_token_id
    roll = engine_for(vlm).generate(picture_prompts(), n=3, temperature=0.7, max_new_tokens=4, seed=11)
    assert roll.completion_ids[0] == [5, 6, eos]  # cut at the first eos
    assert roll.completion_ids[1] == [6] * 4 and roll.truncated[1]  # ran to max_new_tokens
    assert roll.completion_ids[2] == [6, 5, eos]  # stopped at eos that vLLM did not report
    assert roll.truncated == [False, True, False] * 2
    assert roll.texts[0] == vlm[1].tokenizer.decode([5, 6], skip_special_tokens=True)


def test_a_mixed_request_is_refused_before_vllm(fake_vllm, vlm):
    engine = engine_for(vlm)
    with pytest.raises(RetainError, match="mixes 1 prompts with pictures and 1 without"):
        engine.generate([picture_prompts(1)[0], "reverse abc"], max_new_tokens=2)
    (llm,) = LLM.instances
    assert llm.requests == []


def test_weights_go_in_under_the_checkpoints_names_and_follow_training(fake_vllm, vlm):
    model, processor = vlm
    with safe_open(str(VISION_EMBEDDED_DIR / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    engine = engine_for(vlm)
    prompts = picture_prompts(1)
    roll = engine.generate(prompts, max_new_tokens=2, seed=0)
    (llm,) = LLM.instances
    assert len(llm.pushes) == 1 and set(llm.pushes[0]) == saved
    assert any(n.startswith("vision_tower.") for n in saved)
    assert any(n.startswith("language_model.model.") for n in saved)
    live = {checkpoint_name(n): p for n, p in model.named_parameters()}
    assert all(torch.equal(llm.pushes[0][n], live[n]) for n in saved)

    # a training step over the rollout's own ids and picture (the forward lines its image tokens up with the picture)
    pixels = processor.image_processor(prompts[0].image.render(), return_tensors="pt")["pixel_values"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([roll.prompt_ids[0] + roll.completion_ids[0]])
    model(input_ids=ids, pixel_values=pixels).logits.mean().backward()
    opt.step()
    engine.generate(prompts, max_new_tokens=2, seed=0)
    assert len(llm.pushes) == 2 and set(llm.pushes[1]) == saved
    assert all(torch.equal(llm.pushes[1][n], live[n]) for n in saved)
    moved = [n for n in saved if not torch.equal(llm.pushes[1][n], llm.pushes[0][n])]
    assert any(n.startswith("vision_tower.") for n in moved) and any(n.startswith("language_model.") for n in moved)
    assert any(n.startswith("multi_modal_projector.") for n in moved)


def test_checkpoint_names_of_the_live_models_modules():
    assert checkpoint_name("model.language_model.norm.weight") == "language_model.model.norm.weight"
    assert checkpoint_name("model.vision_tower.post_layernorm.bias") == "vision_tower.post_layernorm.bias"
    assert checkpoint_name("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"
    assert checkpoint_name("lm_head.weight") == "language_model.lm_head.weight"
    assert checkpoint_name("vision_tower.post_layernorm.bias") == "vision_tower.post_layernorm.bias"  # saved form kept


def test_a_vlm_config_with_engine_vllm_validates_and_picks_the_vlm_engine(fake_vllm, vlm):
    cfg = parse_experiment({"model": "vlm", "engine": "vllm", "method": {"name": "grpo"},
                            "stages": [{"task": "vcount"}], "eval": {"tasks": ["vcount", "arith"], "n": 2}})
    assert cfg.kind().name == "vision" and cfg.engine == "vllm"
    model, processor = vlm
    assert type(make_engine(cfg.rollout_engine(), model, processor.tokenizer)) is VisionVLLMEngine
    hf = parse_experiment({"model": "vlm", "stages": [{"task": "vcount"}]})
    assert type(make_engine(hf.rollout_engine(), model, processor.tokenizer)) is VisionEngine


def test_text_columns_of_a_vlm_evaluate_through_the_same_vllm_engine(fake_vllm, vlm):
    model, processor = vlm
    evaluate = VisionModels("vlm", processor).evaluator(model, processor.tokenizer, "vllm")
    evaluate("vcount", n=2)
    evaluate("arith", n=2)
    (llm,) = LLM.instances  # one vLLM engine, the VLM's, for both columns
    (pictured, _), (text, _) = llm.requests
    assert all("multi_modal_data" in r for r in pictured) and all(set(r) == {"prompt_token_ids"} for r in text)


def test_grpo_trains_a_vlm_through_the_vllm_engine(fake_vllm, vlm):
    """The rollouts' prompt ids go straight into GRPO's forward with the pictures: a prompt id list without the
    placeholder's expansion would fail there (image features and image tokens do not match)."""
    from retain.methods.build import train_stage

    model, processor = vlm
    kind = VisionModels("vlm", processor)
    method = {"name": "grpo", "data": {"prompts_per_step": 2, "group_size": 3}, "train": {"steps": 2, "lr": 1e-3}}
    train_stage(model, processor.tokenizer, "vcount", method, engine=kind.engine("vllm"), kind=kind, device="cpu")
    (llm,) = LLM.instances
    assert len(llm.requests) == 2 and all(len(r[0]) == 6 for r in llm.requests)
    assert all("multi_modal_data" in r for inputs, _ in llm.requests for r in inputs)
    assert len(llm.pushes) >= 2  # the policy's weights went in before each rollout
