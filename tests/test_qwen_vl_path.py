"""The Qwen2.5-VL picture path, run on CPU: a tiny random ``Qwen2_5_VLForConditionalGeneration`` (built from a config
offline, with a ``Qwen2_5_VLProcessor`` whose image processor gives a retain picture 16 patches) saved as a model
directory the way a user's VLM is, and trained / scored through retain's runner, GRPO and shift. Qwen lays pictures
out as flattened patches plus ``image_grid_thw`` and places its rotary positions by ``mm_token_type_ids`` — what
``retain.pictures.PictureInputs`` carries; LLaVA's layout (the embedded VLM) is checked unchanged beside it.

This is the real code path on a random tiny model, not the real 3B checkpoint on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_vision_run import GRPO, SFT
from transformers import (
    AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from retain import tasks
from retain.config import parse_experiment
from retain.data import collate, model_inputs
from retain.kind import model_kind
from retain.losses import token_logprobs
from retain.methods.grpo import RolloutBatch
from retain.metrics.shift import kl_shift
from retain.models.tokenizer import ASSISTANT, EOS, USER
from retain.pictures import PictureInputs
from retain.runner import run_experiment
from retain.vision.model import VISION_EMBEDDED_DIR, load_processor, load_vlm, text_view, vision_prompt_text
from retain.vision.pictures_only import PicturesOnly
from retain.vision.tasks import CountTask

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the tiny VLMs run fastest on one thread

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
# Qwen's template shape on the embedded base's chat markers: an image part is
# <|vision_start|><|image_pad|><|vision_end|>
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{% elif message['role'] == 'assistant' %}" + ASSISTANT
    + "{% endif %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def processor_class() -> type:
    """Qwen2_5_VLProcessor; without torchvision (its video processor's need) the same class without the video part,
    which is what ``retain.vision.model.load_processor`` loads there too."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return type("Qwen2_5_VLProcessor", (PicturesOnly, Qwen2_5_VLProcessor), {})
    return Qwen2_5_VLProcessor


def build_tiny_qwen_vl(path) -> None:
    """A random Qwen2.5-VL (text: 2 layers, hidden 32, multimodal rotary sections 1+1+2; vision: 2 blocks, patch 14,
    merge 2) on the embedded base's tokenizer plus Qwen's vision tokens, saved with its processor at ``path``."""
    tok = AutoTokenizer.from_pretrained(VISION_EMBEDDED_DIR.parent / "base")
    tok.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT, *VISION_TOKENS]})
    tok.chat_template = CHAT_TEMPLATE
    start, image, end, video = tok.convert_tokens_to_ids(VISION_TOKENS)
    # a retain picture (48 x 48) resizes to 56 x 56: a 4 x 4 grid of 14-pixel patches, 4 image tokens after merging
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    processor = processor_class()(image_processor=images, tokenizer=tok, video_processor=None,
                                  chat_template=CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=28,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl"
    build_tiny_qwen_vl(path)
    return path


def vcount(n: int, split: str = "train"):
    return [e.prompt for e in tasks.get("vcount").examples(split, n)]


def test_the_directory_loads_as_a_vlm_with_qwens_placeholder(qwen_dir):
    kind = model_kind(qwen_dir)
    assert type(kind).__name__ == "VisionModels"
    model, tok = kind.load(str(qwen_dir))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    prompt = vcount(1)[0]
    text = vision_prompt_text(prompt, kind.processor)
    assert text == f"{USER}<|vision_start|><|image_pad|><|vision_end|>{prompt}{ASSISTANT}"
    ids, answer, picture = kind.encode(tok, prompt, "2")
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 4  # 16 patches, merged 2 x 2
    assert picture.pixel_values.shape == (16, 3 * 2 * 14 * 14) and picture.image_grid_thw.tolist() == [[1, 4, 4]]
    # a text column is scored on the language model alone (text_view): the VLM's own logits on a text prompt
    text = torch.tensor([kind.encode(tok, "what is 3+4?", "7")[0]])
    with torch.no_grad():
        assert torch.equal(text_view(model)(input_ids=text).logits, model(input_ids=text).logits)


def test_the_embedded_vlms_prompt_text_is_unchanged_by_its_processor():
    processor = load_processor("vlm")
    for prompt in vcount(3):
        assert vision_prompt_text(prompt, processor) == vision_prompt_text(prompt)
        assert vision_prompt_text(prompt) == f"{USER}<image>{prompt}{ASSISTANT}"


def test_picking_rows_equals_processing_those_prompts_alone(qwen_dir):
    kind = model_kind(qwen_dir)
    prompts = vcount(5)
    together = kind.pictures(prompts)
    assert len(together) == 5 and together.pixel_values.shape[0] == 5 * 16
    # distinct pictures, so a wrong span would show
    assert not torch.equal(together.rows([0]).pixel_values, together.rows([1]).pixel_values)
    for index in ([3, 1], [4], [0, 2, 4], slice(1, 4)):
        picked = together.rows(index)
        chosen = prompts[index] if isinstance(index, slice) else [prompts[i] for i in index]
        alone = kind.processor(text=[vision_prompt_text(p, kind.processor) for p in chosen],
                               images=[p.image.render() for p in chosen], padding=True, return_tensors="pt")
        assert torch.equal(picked.pixel_values, alone["pixel_values"])
        assert torch.equal(picked.image_grid_thw, alone["image_grid_thw"])
        kwargs = picked.as_kwargs(alone["input_ids"])
        assert torch.equal(kwargs["mm_token_type_ids"], alone["mm_token_type_ids"])  # rebuilt from the ids
        assert set(kwargs) == {"pixel_values", "image_grid_thw", "mm_token_type_ids"}


def test_llavas_pictures_reach_the_model_as_before():
    kind = model_kind("vlm")
    _, tok = kind.load("vlm")
    prompts = vcount(4)
    pictures = kind.pictures(prompts)
    stacked = torch.cat([kind.processor(text=[vision_prompt_text(p)], images=[p.image.render()],
                                        return_tensors="pt")["pixel_values"] for p in prompts])
    assert isinstance(pictures, PictureInputs) and pictures.image_grid_thw is None and pictures.image_token_id is None
    assert torch.equal(pictures.pixel_values, stacked)
    assert torch.equal(pictures.rows([2, 0]).pixel_values, stacked[[2, 0]])
    assert torch.equal(pictures.rows(slice(1, 3)).pixel_values, stacked[1:3])
    batch = collate([kind.encode(tok, p, "1") for p in prompts], tok.pad_token_id)
    inputs = model_inputs(batch, "cpu")
    assert set(inputs) == {"input_ids", "pixel_values"} and torch.equal(inputs["pixel_values"], stacked)


class GradedCount(CountTask):
    """vcount with partial credit (the share of the completion's characters that are digits): a random model never
    counts right, so under vcount's 0/1 reward every group is flat and GRPO has nothing to push; this gives its
    groups unequal rewards, so the picture path's policy gradient runs (what is tested here, not learning to count)."""

    name = "vcount_graded"

    def reward(self, prompt: str, completion: str, answer: str | None = None) -> float:
        return sum(c.isdigit() for c in completion) / max(1, len(completion))


tasks.define(GradedCount.name, "tests/test_qwen_vl_path.py", GradedCount)


def qwen_run(qwen_dir, method: dict) -> dict:
    task = "vcount_graded" if method["name"] == "grpo" else "vcount"
    return {"model": str(qwen_dir), "method": method, "stages": [{"task": task}],
            "eval": {"tasks": ["vcount", "arith"], "n": 2, "checkpoints": 1}, "shift": {"prompts": 2}}


@pytest.mark.parametrize("method", [SFT, GRPO], ids=["sft", "grpo"])
def test_a_stage_trains_the_tiny_qwen_vl_on_pictures(qwen_dir, tmp_path, method):
    from safetensors.torch import load_file

    out = tmp_path / method["name"]
    method = {**method, "train": {**method["train"], "log_every": 1}}  # both steps' losses
    results = run_experiment(parse_experiment(qwen_run(qwen_dir, method)), out)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    if method["name"] == "grpo":
        assert all(0.0 <= s["reward"] <= 1.0 for s in steps if "reward" in s)
        assert any(s["flat_groups"] < 1.0 for s in steps if "flat_groups" in s)  # a group with a signal
    base, trained = load_file(qwen_dir / "model.safetensors"), load_file(out / "stages/1/model/model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    assert all(0.0 <= a <= 1.0 for row in results["matrix"] for a in row)
    assert all(torch.isfinite(torch.tensor(results["shift"]["forward_kl_exact"])))
    model, processor = load_vlm(out / "stages" / "1" / "model")  # a stage directory loads the same way
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_the_kl_shift_on_a_visual_task_is_finite_and_sees_the_picture(qwen_dir):
    kind = model_kind(qwen_dir)
    reference, tok = kind.load(str(qwen_dir))
    model, _ = kind.load(str(qwen_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = vcount(3, "test")
    shift = kl_shift(reference, model, tok, prompts, samples=2, max_new_tokens=4, seed=0,
                     engine=kind.engine("kv_cache"), pictures=kind.pictures)
    for direction in ("forward", "reverse"):
        stats = shift[direction]
        assert stats["samples"] == 6 and stats["tokens"] > 0
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
        assert stats["exact_per_token"] > 0  # the two models differ
    same = kl_shift(reference, reference, tok, prompts, samples=1, max_new_tokens=4, seed=0,
                    engine=kind.engine("kv_cache"), pictures=kind.pictures)
    assert abs(same["forward"]["exact_per_sequence"]) < 1e-6


def test_grpo_logprobs_of_a_sampled_row_equal_the_models_own_forward(qwen_dir):
    """GRPO's rollout batch picks each row's picture by its patch span; the log-probs it scores for one row (of a
    micro-batch that starts mid-rollout, after flat rows are dropped) equal a forward of that row alone, with the
    processor's own inputs for its prompt."""
    from retain.methods.config import method_config
    from retain.methods.grpo import GRPOObjective, _without_flat_rows
    from retain.methods.stage import MethodState, StageContext

    kind = model_kind(qwen_dir)
    model, tok = kind.load(str(qwen_dir))
    rolled: list = []  # the rollout rows' prompts, as GRPO asks the kind for their pictures
    shown = kind.pictures
    kind.pictures = lambda prompts: (rolled.extend(prompts), shown(prompts))[1]
    task = tasks.get("vcount")
    cfg = method_config({"name": "grpo", "data": {"prompts_per_step": 3, "group_size": 2}, "micro_batch_size": 4,
                         "max_new_tokens": 5})
    ctx = StageContext(model=model, reference=model, tokenizer=tok, task_name="vcount", task=task, stage_index=0,
                       seen_tasks=[], seed=0, state=MethodState(), engine=kind.engine("kv_cache"), kind=kind)
    objective = GRPOObjective(cfg, ctx)
    batches = objective.batches(0)
    assert [len(b.advantages) for b in batches] == [4, 2] and len(rolled) == 6
    second = batches[1]
    flat = RolloutBatch(second.input_ids, second.attention_mask, second.completion_mask,
                        torch.tensor([0.0, 1.0]), None, None, second.total_sequences, second.total_tokens, {},
                        second.prompt_ids, second.completion_ids, second.pictures)
    kept = _without_flat_rows(flat)  # row 1 of the second micro-batch: row 5 of the rollout
    assert len(kept.advantages) == 1 and len(kept.pictures) == 1
    prompt_ids, completion = kept.prompt_ids[0], kept.completion_ids[0]
    enc = kind.processor(text=[vision_prompt_text(rolled[5], kind.processor)], images=[rolled[5].image.render()],
                         return_tensors="pt")
    assert enc["input_ids"][0].tolist() == prompt_ids  # the engine's prompt ids are the processor's
    assert completion, "a sampled completion to score"
    with torch.no_grad():
        scored = objective._logp(model, kept)[0]
        ids = torch.tensor([prompt_ids + completion])
        types = torch.cat([enc["mm_token_type_ids"], torch.zeros((1, len(completion)), dtype=torch.long)], 1)
        logits = model(input_ids=ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                       mm_token_type_ids=types).logits[:, :-1]
        own = token_logprobs(logits, ids[:, 1:], cfg.data.temperature)[0]
    span = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(completion))
    assert kept.completion_mask[0, span].all() and kept.completion_mask[0].sum() == len(completion)
    torch.testing.assert_close(scored[span], own[span], rtol=1e-5, atol=1e-5)
    # the picture matters: row 0's picture in its place gives other log-probs
    other = RolloutBatch(kept.input_ids, kept.attention_mask, kept.completion_mask, kept.advantages, None, None,
                         kept.total_sequences, kept.total_tokens, {}, kept.prompt_ids, kept.completion_ids,
                         batches[0].pictures.rows([0]))
    assert rolled[0].image != rolled[5].image
    with torch.no_grad():
        assert not torch.allclose(objective._logp(model, other)[0][span], scored[span])


def test_the_real_sft_configs_lora_trains_the_tiny_qwen_vl(qwen_dir, tmp_path):
    """``configs/real/qwen2.5-vl-3b-instruct-sft.yaml``'s method (a per-stage LoRA adapter on the language model's
    projections, by regex) with gradient checkpointing, on the tiny model on CPU in fp32 (the real one says bf16 and
    cuda): two steps of its first stage task, GeneralPoints-VL, train the adapter only."""
    import yaml
    from safetensors.torch import load_file

    real = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs/real/qwen2.5-vl-3b-instruct-sft.yaml")
                          .read_text())
    method = {**real["method"], "batch_size": 4, "micro_batch_size": 2,
              "train": {"lr": 1e-2, "max_grad_norm": 1.0, "log_every": 1}}
    config = {**{k: real[k] for k in ("model_kind", "seed", "gradient_checkpointing")}, "model": str(qwen_dir),
              "device": "cpu", "method": method, "stages": [{"task": "gpoints_vl", "steps": 2}],
              "eval": {"tasks": ["gpoints_vl"], "n": 2, "checkpoints": 1}, "shift": {"prompts": 0}}
    out = tmp_path / "lora"
    run_experiment(parse_experiment(config), out)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    base, trained = load_file(qwen_dir / "model.safetensors"), load_file(out / "stages/1/model/model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    # the merged adapter: the language model's projections only (saved as Qwen's checkpoints name them, model.layers.*)
    assert changed and all(k.startswith("model.layers.") and k.endswith("_proj.weight") for k in changed)
    assert any("self_attn" in k for k in changed) and any("mlp" in k for k in changed)
    assert not any("visual" in k for k in changed)  # the vision tower and merger stay frozen
