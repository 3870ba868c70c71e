"""The embedded vision-language model: LLaVA's architecture with a tiny CLIP vision tower on the embedded text base.

Why LLaVA (``LlavaForConditionalGeneration``) rather than Qwen2-VL: its language model *is* a ``Qwen2Model``, so the
embedded base's weights load unchanged (Qwen2-VL's text model is its own class with multimodal rotary positions),
and every picture becomes a fixed number of tokens (``IMAGE_TOKENS``: the 6 x 6 patches of a 48 x 48 picture), which
keeps prompts, batching and the token analyses simple. What retain calls on it — ``AutoProcessor``, the processor's
``__call__`` with ``images=``, ``AutoModelForImageTextToText``, ``generate(pixel_values=...)`` — is what a real VLM
(Qwen2.5-VL) takes too.

The tokenizer is the base's, plus one special token ``<image>`` appended (id 102): every text token keeps its id, so
text prompts encode exactly as for the base. The processor expands each ``<image>`` into ``IMAGE_TOKENS`` copies and
the model puts the projected patch features there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText, AutoProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
    LlavaProcessor, PreTrainedModel, ProcessorMixin, Qwen2ForCausalLM,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from retain.errors import RetainError
from retain.models.loading import load_model, resolve_model_path
from retain.models.tokenizer import ASSISTANT, EOS, USER
from retain.vision.render import SIZE

IMAGE = "<image>"
PATCH = 16  # a card slot or a shape cell is one patch column / one patch: 9 image tokens, cheap on CPU
IMAGE_TOKENS = (SIZE // PATCH) ** 2
VISION_EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded" / "vlm"
VLM = "vlm"

# name -> (hidden, layers, heads, intermediate) of the vision tower
VISION_PRESETS: dict[str, tuple[int, int, int, int]] = {"tiny": (96, 3, 4, 256), "small": (128, 4, 4, 384)}

# The base's template, with message content as a string (text) or a list of {"type": "image"} / {"type": "text"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE + "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def vision_prompt_text(prompt: str, processor: ProcessorMixin | None = None) -> str:
    """The model input for a picture followed by a question, as text. With ``processor``, its chat template's (one
    image part, then the question): each model's own placeholder — Qwen2-VL's
    ``<|vision_start|><|image_pad|><|vision_end|>``, the embedded VLM's ``<image>`` (the same text as without it).
    Without one (or with no chat template), the embedded VLM's form: ``<image>`` before the question."""
    if processor is not None and getattr(processor, "chat_template", None):
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(prompt)}]}
        return processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
    return f"{USER}{IMAGE}{prompt}{ASSISTANT}"


def build_vlm(base: str | Path = "base", vision: str = "tiny") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA model whose language model is ``base`` (weights copied) and whose vision tower and projector are freshly
    initialised (seed torch first for a deterministic init), with its processor."""
    if vision not in VISION_PRESETS:
        raise RetainError(f"unknown vision preset {vision!r} (presets: {', '.join(VISION_PRESETS)})")
    text_model, tok = load_model(base)
    if not isinstance(text_model, Qwen2ForCausalLM):
        raise RetainError(f"the VLM's language model must be a Qwen2ForCausalLM, {base!r} is {type(text_model).__name__}")
    if IMAGE in tok.get_vocab():
        raise RetainError(f"the tokenizer of {base!r} already has an {IMAGE} token")
    old_vocab = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT, IMAGE]})
    image_id = tok.convert_tokens_to_ids(IMAGE)
    if image_id != old_vocab:
        raise RetainError(f"{IMAGE} got id {image_id}, expected {old_vocab} (appended after every text token)")
    hidden, layers, heads, inter = VISION_PRESETS[vision]
    text_config = text_model.config.to_dict()
    text_config["vocab_size"] = len(tok)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
            image_size=SIZE, patch_size=PATCH,
        ),
        text_config=text_config,
        image_token_id=image_id,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLIP's class token: one image token per patch
        projector_hidden_act="gelu",
        tie_word_embeddings=text_model.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    state = text_model.model.state_dict()
    old = state["embed_tokens.weight"]
    # the new row starts at the mean embedding (what resize_token_embeddings does); it is only ever an output logit,
    # since the model overwrites image positions with picture features
    state["embed_tokens.weight"] = torch.cat([old, old.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state)
    # picture features start at the scale of the text embeddings: a fresh projector's output is ~50x larger and
    # would swamp the language model's attention before the projector has learnt anything
    with torch.no_grad():
        scale = old.norm(dim=-1).mean() / model.model.multi_modal_projector.linear_2.weight.shape[0] ** 0.5
        model.model.multi_modal_projector.linear_2.weight.mul_(scale / model.model.multi_modal_projector.linear_2.weight.std())
        model.model.multi_modal_projector.linear_2.bias.zero_()
    if not config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(torch.cat([text_model.lm_head.weight, old.mean(0, keepdim=True)]))
    tok.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_resize=True, do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE,
    )
    model.eval()
    return model, processor


def resolve_vlm_path(spec: str | Path) -> str:
    """``vlm`` → the embedded VLM's directory; else as ``retain.models.loading.resolve_model_path``."""
    if str(spec) == VLM:
        if not (VISION_EMBEDDED_DIR / "config.json").exists():
            raise RetainError(f"the embedded VLM is missing at {VISION_EMBEDDED_DIR}; run `retain pretrain --vision`")
        return str(VISION_EMBEDDED_DIR)
    return resolve_model_path(spec)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as this process sees it now (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else the
    default), read at call time rather than when huggingface_hub was imported."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return constants.HF_HUB_CACHE


def model_config_file(spec: str | Path) -> Path | None:
    """The config.json that says what ``spec`` is, found without the network: a local directory's own (``vlm``
    included), or a hub name's in the local Hugging Face cache; None when there is none to read (a hub name never
    downloaded, or not a model retain can resolve: the loader then says why)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        resolved = resolve_vlm_path(spec)
    except RetainError:
        return None
    local = Path(resolved) / "config.json"
    if local.is_file():
        return local
    if Path(resolved).exists():
        return None
    try:
        cached = try_to_load_from_cache(resolved, "config.json", cache_dir=hub_cache_dir())
    except (HFValidationError, ValueError):
        return None
    return Path(cached) if isinstance(cached, str) else None  # None, or the cache's "known not to exist" marker


def has_vision_tower(config: Path) -> bool:
    try:
        return "vision_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def is_vlm(spec: str | Path) -> bool:
    """``vlm``, a local model directory or a cached hub model whose config has a vision tower (a VLM saved with its
    processor); a hub name not in the local cache is not looked up (``vlm_unknown`` says so)."""
    config = model_config_file(spec)
    return config is not None and has_vision_tower(config)


def vlm_unknown(spec: str | Path) -> bool:
    """True for a hub name whose config is not in the local cache: whether it is a VLM would need a download."""
    try:
        resolved = resolve_vlm_path(spec)
    except RetainError:
        return False
    return not Path(resolved).exists() and model_config_file(spec) is None


def load_processor(spec: str | Path) -> ProcessorMixin:
    """The processor of a saved VLM directory or hub name (its tokenizer left-padding, for generation)."""
    path = resolve_vlm_path(spec)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError as err:  # Qwen2-VL's video processor needs torchvision; retain shows pictures only
        from retain.vision.pictures_only import pictures_only_processor

        processor = pictures_only_processor(path, err)
    except (OSError, ValueError) as err:
        raise RetainError(f"cannot load the processor of {spec!r}: {str(err).strip().splitlines()[0]}") from None
    processor.tokenizer.padding_side = "left"
    return processor


def load_vlm(spec: str | Path, dtype: torch.dtype | str = torch.float32) -> tuple[PreTrainedModel, ProcessorMixin]:
    """(model, processor) of a saved VLM directory or hub name, the Hugging Face way (safetensors only)."""
    processor = load_processor(spec)
    try:
        model = AutoModelForImageTextToText.from_pretrained(resolve_vlm_path(spec), use_safetensors=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise RetainError(f"cannot load the VLM {spec!r}: {str(err).strip().splitlines()[0]}") from None
    model.eval()
    return model, processor


def text_view(model: LlavaForConditionalGeneration) -> Qwen2ForCausalLM:
    """The VLM's language model as a causal LM sharing its tensors, for text-only evaluation and training."""
    view = Qwen2ForCausalLM(model.config.text_config)
    view.model = model.model.language_model
    view.lm_head = model.lm_head
    view.train(model.training)
    return view
