"""The vision side: pictures drawn deterministically, the visual tasks' splits and verifiers, the embedded VLM's
architecture round-tripping through save_pretrained / from_pretrained, and a short ``retain pretrain --vision``."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from retain import tasks
from retain.models.loading import load_tokenizer
from retain.vision.model import IMAGE, IMAGE_TOKENS, build_vlm, text_view, vision_prompt_text
from retain.vision.render import SIZE, CardScene, NumberScene, ShapeScene
from retain.vision.tasks import recognition_score

VISUAL = ("cards", "gpoints_vl", "vcount", "vcolor", "vspatial", "vdigits")


def _pixels(scene) -> bytes:
    return np.asarray(scene.render()).tobytes()


def test_pictures_are_deterministic_per_seed():
    scenes = [CardScene((1, 10, 13), ("spade", "heart", "club"), seed=3),
              ShapeScene(((0, "circle", "red"), (4, "square", "blue")), seed=1), NumberScene("472", "yellow", seed=2)]
    for scene in scenes:
        image = scene.render()
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        assert _pixels(scene) == _pixels(scene)  # same scene, same pixels
        from dataclasses import replace

        assert _pixels(replace(scene, seed=scene.seed + 1)) != _pixels(scene)  # the nuisance seed changes them
    # pinned: a change in drawing (or in numpy's PCG64 stream) shows up here
    digest = hashlib.sha256(b"".join(_pixels(s) for s in scenes)).hexdigest()[:16]
    assert digest == PINNED_DIGEST, digest


PINNED_DIGEST = "ec1abab48cf35bd2"


def test_red_suits_change_the_ink():
    def inks(scene):
        px = np.asarray(scene.render()).astype(int)
        dark = (px.max(-1) < 70).sum()
        red = ((px[..., 0] > 150) & (px[..., 1] < 80) & (px[..., 2] < 80)).sum()
        return dark, red

    black_dark, black_red = inks(CardScene((4, 9, 12), ("spade", "club", "spade")))
    red_dark, red_red = inks(CardScene((4, 9, 12), ("heart", "diamond", "heart")))
    assert black_dark > 60 and black_red == 0 and red_red > 60 and red_dark == 0


def test_visual_tasks_are_registered_with_disjoint_held_out_content():
    assert set(VISUAL) <= set(tasks.names())
    assert tasks.resolve("vprior,vsequence") == list(VISUAL)
    for name in ("vcount", "vcolor", "vspatial", "vdigits"):
        task = tasks.get(name)
        keys = {split: {e.meta["key"] for e in task.examples(split)} for split in task.splits}
        assert all(len(keys[s]) >= 200 for s in task.splits), {s: len(k) for s, k in keys.items()}
        assert not keys["pretrain"] & keys["test"] and not keys["train"] & keys["test"]
    cards = tasks.get("cards")
    train = {tuple(sorted(e.meta["ranks"])) for e in cards.examples("train")}
    test = {tuple(sorted(e.meta["ranks"])) for e in cards.examples("test")}
    assert not train & test and len(train) + len(test) == 455  # every 3-card rank multiset, on one side
    assert all(s in ("heart", "diamond") for e in cards.examples("ood") for s in e.image.suits)


def test_reference_answers_score_one_and_examples_are_deterministic():
    for name in VISUAL:
        task = tasks.get(name)
        for split in task.splits:
            examples = task.examples(split, 8, seed=3)
            assert examples == task.examples(split, 8, seed=3)
            assert [e.image for e in examples] == [e.image for e in task.examples(split, 8, seed=3)]
            for e in examples:
                assert all(task.reward(e.prompt, a, e.answer) == 1.0 for a in e.answers), (name, e)
                assert task.reward(e.prompt, e.answer) == 1.0  # the picture prompt carries its reference
                assert task.reward(str(e.prompt), e.answer) == 0.0  # its text alone: nothing to check against


def test_card_recognition_is_scored_per_card():
    shown = [4, 7, 13]
    assert recognition_score("7 k 4", shown) == 1.0  # any order
    assert recognition_score("7 k", shown) == pytest.approx(2 / 3)
    assert recognition_score("7 k 4 4", shown) == pytest.approx(3 / 4)  # an extra card costs
    assert recognition_score("7 7 7", shown) == pytest.approx(1 / 3)
    assert recognition_score("7 k four", shown) == 0.0 and recognition_score("", shown) == 0.0
    task = tasks.get("cards")
    assert task.reward("which cards?", "k 4\nmore", "4 7 k") == pytest.approx(2 / 3)
    assert not task.is_correct("which cards?", "k 4", "4 7 k") and task.is_correct("which cards?", "k 7 4", "4 7 k")


def test_gpoints_vl_scores_the_expression_against_the_hand_shown():
    task = tasks.get("gpoints_vl")
    prompt, answer = "j=q=k=10, make 12", "7 k 4: 4*(10-7)"
    assert task.reward(prompt, "7 k 4: 4*(10-7)", answer) == 1.0
    assert task.reward(prompt, "4*(10-7)", answer) == 1.0  # the card list is optional
    assert task.reward(prompt, "7 q 4: 4*(10-7)", answer) == 1.0  # only the expression is scored
    assert task.reward(prompt, "7 k 4: 4+10-7", answer) == 0.2  # the hand's values, another value
    assert task.reward(prompt, "7 k 4: 3*4", answer) == 0.1  # other numbers
    assert task.reward("j=11 q=12 k=13, make 12", "7 k 4: 4*(10-7)", answer) == 0.1  # under the rule, k is 13
    assert task.reward(prompt, "7 k 4: __import__('os')", answer) == 0.0
    text = tasks.get("gpoints")
    assert [e.meta["target"] for e in task.examples("test", 5)] == [e.meta["target"] for e in text.examples("test", 5)]
    assert all(s in ("heart", "diamond") for e in task.examples("ood_visual", 5) for s in e.image.suits)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return build_vlm("base")


def test_image_token_is_appended_and_text_encodes_as_for_the_base(vlm):
    model, processor = vlm
    base_tok, tok = load_tokenizer("base"), processor.tokenizer
    assert tok.convert_tokens_to_ids(IMAGE) == len(base_tok) == model.config.image_token_id
    text = "<|user|>cards 4 7 k, j=q=k=10, make 12<|assistant|>4*(10-7)</s>"
    assert tok(text, add_special_tokens=False)["input_ids"] == base_tok(text, add_special_tokens=False)["input_ids"]
    enc = processor(text=[vision_prompt_text("which cards?")], images=[CardScene((4,), ("spade",)).render()])
    assert enc["input_ids"][0].count(model.config.image_token_id) == IMAGE_TOKENS


def test_vlm_round_trips_through_save_pretrained(vlm, tmp_path):
    model, processor = vlm
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, use_safetensors=True).eval()
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    images = [CardScene((4, 7, 13), ("spade", "club", "spade")).render(), ShapeScene(((3, "circle", "red"),)).render()]
    texts = [vision_prompt_text("which cards?"), vision_prompt_text("how many circles?")]
    a = processor(text=texts, images=images, padding=True, return_tensors="pt")
    b = loaded_processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, loaded(**b).logits)


def test_language_model_starts_as_the_embedded_base(vlm):
    from retain.models.loading import load_model

    model, processor = vlm
    base, tok = load_model("base")
    ids = tok("<|user|>3+4=<|assistant|>7", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = text_view(model)(input_ids=ids).logits[..., : len(tok)]
        theirs = base(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_short_vision_pretraining_writes_a_loadable_vlm_deterministically(tmp_path):
    from retain.vision.model import load_vlm
    from retain.vision.pretrain import VisionPretrainConfig, pretrain_vision

    short = dict(aux_steps=2, aux_batch_size=4, steps=2, batch_size=4, warmup_steps=1, eval_n=2, eval_samples=2,
                 mixture={"arith": 1.0, "cards": 1.0, "vcount": 1.0})  # one kind of each: text, cards, shapes
    threads = torch.get_num_threads()
    a = pretrain_vision(VisionPretrainConfig(**short), tmp_path / "a")
    assert torch.get_num_threads() == threads  # restored
    pretrain_vision(VisionPretrainConfig(**short), tmp_path / "b")
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    scores = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(scores) == {"facts", "reverse", "arith", "cards", "cards@ood", "vcount"}
    assert scores["cards"]["k"] == 2 and 0.0 <= scores["cards"]["score"] <= 1.0
    model, processor = load_vlm(tmp_path / "a")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) == a["parameters"]


def test_text_evaluation_refuses_a_visual_task(micro_model, tokenizer):
    from retain.errors import RetainError
    from retain.evaluate import evaluate

    with pytest.raises(RetainError, match="'vcount' shows pictures"):
        evaluate(micro_model, tokenizer, ["vcount"], n=2)


def test_shipped_vlm_loads_and_keeps_its_recorded_skills():
    """The checkpoint in src/retain/embedded/vlm (retain pretrain --vision, seed 0): it loads the Hugging Face way,
    knows the text prior skills and reads cards, as its eval.json records (a small re-measurement here)."""
    from retain.evaluate import evaluate, evaluate_task
    from retain.vision.engine import VisionEngine
    from retain.vision.model import VISION_EMBEDDED_DIR, load_vlm

    recorded = json.loads((VISION_EMBEDDED_DIR / "eval.json").read_text())
    assert all(recorded[t]["accuracy"] >= 0.9 for t in ("facts", "reverse", "arith")) and recorded["cards"]["accuracy"] >= 0.9
    model, processor = load_vlm("vlm")
    assert evaluate(text_view(model), processor.tokenizer, ["arith"], n=24)["arith"]["accuracy"] >= 0.9
    cards = evaluate_task(VisionEngine(model, processor), "cards", n=24)
    assert cards["correct"] == recorded["cards"]["correct"][:24]  # greedy, the same first items


def test_text_pretraining_refuses_a_visual_task():
    from pydantic import ValidationError

    from retain.pretrain import PretrainConfig

    with pytest.raises(ValidationError, match="'cards' shows pictures"):
        PretrainConfig(mixture={"arith": 1.0, "cards": 1.0})
