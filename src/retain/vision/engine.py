"""Rollouts with pictures: each prompt (a ``PicturePrompt``, which carries its picture) goes through the processor with
its image, then ``generate``.

``VisionEngine.generate`` takes the same arguments and returns the same ``Rollout`` as the text engines (one entry per
sample, prompt-major; ``prompts`` keep their pictures), so the methods, scoring and the shift read it the same way.
It calls the model's own ``generate`` with whatever the processor returns (``pixel_values``, and ``image_grid_thw``
for Qwen2-VL), which is the path a real VLM takes; sampling is softmax(logits / temperature) with no top-k / top-p,
greedy is argmax. Seeding, rows, eval mode, eos cuts and decoding are ``RolloutEngine``'s template; this engine's
completion step is the processor and ``generate``. A request is all pictured prompts or all text prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from retain.errors import RetainError
from retain.rollout.base import RolloutEngine, SamplingRequest
from retain.vision.model import vision_prompt_text


# the config fields where Hugging Face VLMs name the token ids they reserve for pictures (LLaVA's image token;
# Qwen2-VL's image, video and vision-span tokens)
PICTURE_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                        "vision_end_token_id")


def picture_token_ids(config: Any) -> list[int]:
    """The token ids ``config`` reserves for pictures. A sampled completion must never hold one: the policy's next
    forward over prompt + completion would read it as one more picture slot and fail (``Image features and image
    tokens do not match``), which a GRPO run on the embedded VLM hit at temperature 1."""
    ids = {getattr(config, name, None) for name in PICTURE_TOKEN_FIELDS}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def shows_pictures(prompts: Sequence[Any]) -> bool:
    """Whether a request's prompts show pictures: all of them or none (a request that mixes them is refused)."""
    pictured = sum(getattr(p, "image", None) is not None for p in prompts)
    if 0 < pictured < len(prompts):
        raise RetainError(f"a rollout request mixes {pictured} prompts with pictures and "
                          f"{len(prompts) - pictured} without")
    return pictured > 0


class ProcessorPrompts:
    """How a VLM's engines turn prompts into model input — the processor's text, pictures and ids — shared by
    ``VisionEngine`` and ``retain.vision.vllm_engine.VisionVLLMEngine`` so that both hand the training loop the very
    prompt ids its forward will see. Mixed into a ``RolloutEngine`` that has a ``processor``."""

    processor: Any

    def processor_inputs(self, prompts: Sequence[Any], pictured: bool) -> tuple[list[str], list[Any] | None]:
        """Each prompt's text (a picture prompt's written through the processor's chat template with the model's own
        placeholder — LLaVA's ``<image>``, Qwen's ``<|vision_start|><|image_pad|><|vision_end|>`` — a text prompt under
        the chat template) and, when the prompts show pictures, each one's rendered picture (a PIL image)."""
        texts = [vision_prompt_text(p, self.processor) if pictured else self._text(p) for p in prompts]
        return texts, [p.image.render() for p in prompts] if pictured else None

    def processed(self, texts: list[str], images: list[Any] | None) -> Any:
        """The processor's batch (left-padded ``input_ids``, ``attention_mask``, ``pixel_values``): each
        ``<image>`` expanded into the model's image tokens."""
        self.tok.padding_side = "left"
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")

    def _text(self, prompt: str) -> str:
        """A text prompt under the chat template, as the text engines encode it."""
        return self.tok.decode(self.encode(prompt))


def unpadded_ids(enc: Any) -> list[list[int]]:
    """Each row's prompt ids without its padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]


class VisionEngine(ProcessorPrompts, RolloutEngine):
    """Implements only the completion step of ``RolloutEngine``'s template. The picture tokens are suppressed in
    every completion (their logits set to −inf before sampling or argmax); their probability under the policy is
    negligible, so the sampling distribution is the policy's, renormalised without them."""

    takes_pictures = True

    def __init__(self, model: torch.nn.Module, processor: Any, batch_size: int = 256) -> None:
        super().__init__(model, processor.tokenizer, batch_size)
        self.processor = processor
        self.suppressed = picture_token_ids(model.config)

    def complete(self, request: SamplingRequest) -> tuple[list[list[int]], list[list[int]]]:
        prompts, greedy = request.prompts, request.greedy
        pictured = shows_pictures(prompts)
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        device = next(self.model.parameters()).device
        sampling = {} if greedy else {"temperature": request.temperature, "top_k": 0, "top_p": 1.0}
        prompt_ids: list[list[int]] = []
        completions: list[list[int]] = []
        group = request.group
        for start in range(0, len(group), self.batch_size):
            rows = group[start : start + self.batch_size]
            enc = self.processed(*self.processor_inputs([prompts[i] for i in rows], pictured)).to(device)
            generated = self.model.generate(**enc, do_sample=not greedy, max_new_tokens=request.max_new_tokens,
                                            eos_token_id=eos, pad_token_id=pad, suppress_tokens=self.suppressed or None,
                                            **sampling)
            width = enc["input_ids"].shape[1]
            prompt_ids += unpadded_ids(enc)
            for new in generated[:, width:]:
                completion = new.tolist()
                completions.append(completion if eos in completion else [t for t in completion if t != pad])
        return prompt_ids, completions
