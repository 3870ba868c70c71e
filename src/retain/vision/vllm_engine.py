"""Rollouts with pictures through vLLM (``engine: vllm`` on a vision-language model; GPU, ``retain[vllm]``): the text
vLLM engine (``retain.rollout.vllm``: one shared ``vllm.LLM`` per process, weight push by name before sampling, one
``SamplingParams`` per sample with its own seed, eos cuts) with what differs for a VLM.

- Requests follow vLLM's offline multimodal input (``vllm.inputs.TextPrompt``, "Multimodal Inputs" in vLLM 0.8.3's
  docs, unchanged since): ``{"prompt": <text with one <image> placeholder>, "multi_modal_data": {"image": <PIL
  image>}}``, one per sample. vLLM runs the model's Hugging Face processor on them itself (which expands the
  placeholder into the image tokens), so the ``vllm.LLM`` is built with its tokenizer (``skip_tokenizer_init``
  off) and at most one picture per prompt. A request of text prompts only goes in as token ids, as the text engine's.
- The prompt ids handed back are the training forward's, computed as ``VisionEngine`` computes them (the processor
  over the same text and picture: ``ProcessorPrompts``), not read back from vLLM, so the log-probs of the policy's
  training forward line up with the completions position by position.
- The picture token ids (``picture_token_ids``) are banned from every completion through ``SamplingParams.logit_bias``
  = −inf on each: it exists from vLLM 0.8 on (V0 and V1), takes token ids as they are (V1 checks only that they are in
  the vocabulary) and is added to the logits before greedy argmax or sampling, which is exactly the HF path's
  ``suppress_tokens``. ``bad_words`` (also in 0.8) takes strings that vLLM tokenizes again, which is no way to name
  one special token's id.
- Weights go in under the names of the model's own checkpoint (``model.safetensors`` of a LLaVA saved by
  transformers: ``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``,
  ``language_model.lm_head.*``), which are the module names of vLLM's ``LlavaForConditionalGeneration``: its
  ``load_weights`` takes them in every version; versions since transformers 4.52 renamed the modules map the new
  names (``model.language_model.*``, ...) onto these through ``hf_to_vllm_mapper`` and leave these unchanged.

Not executed in this repository's CI (no GPU, no vllm): the logic is tested against a stand-in ``vllm`` module
(``tests/test_vllm_vision.py``); whether a given vLLM build loads the embedded VLM is not known here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator

import torch

from retain.rollout.base import SamplingRequest
from retain.rollout.vllm import VLLMEngine, policy_weights
from retain.vision.engine import ProcessorPrompts, picture_token_ids, shows_pictures, unpadded_ids

# transformers' LLaVA module names (since 4.52) -> the names its checkpoints are saved under (and vLLM's modules have)
CHECKPOINT_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def checkpoint_name(name: str) -> str:
    """A LLaVA parameter's name in its saved checkpoint (a name already in that form is unchanged)."""
    for live, saved in CHECKPOINT_PREFIXES:
        if name.startswith(live):
            return saved + name[len(live):]
    return name


class VisionVLLMEngine(ProcessorPrompts, VLLMEngine):
    """A VLM's prompts (all with pictures, or all text) through vLLM; the rest is ``VLLMEngine``'s."""

    takes_pictures = True
    llm_overrides: ClassVar[dict[str, Any]] = {"skip_tokenizer_init": False, "limit_mm_per_prompt": {"image": 1}}

    def __init__(self, model: torch.nn.Module, processor: Any, batch_size: int = 256) -> None:
        super().__init__(model, processor.tokenizer, batch_size)
        self.processor = processor
        self.suppressed = picture_token_ids(model.config)

    def weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in policy_weights(model):
            yield checkpoint_name(name), tensor

    def sampling_params(self, count: int, temperature: float, max_new_tokens: int, greedy: bool, seed: int | None,
                        **extra: Any) -> list:
        banned = {token: float("-inf") for token in self.suppressed}
        return super().sampling_params(count, temperature, max_new_tokens, greedy, seed,
                                       **({"logit_bias": banned} if banned else {}), **extra)

    def requests(self, request: SamplingRequest) -> tuple[list[list[int]], list[dict[str, Any]]]:
        """Each prompt is processed once (its ``n`` samples share its text, picture and ids)."""
        prompts = request.prompts
        pictured = shows_pictures(prompts)
        texts, images = self.processor_inputs(prompts, pictured)
        ids: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            ids += unpadded_ids(self.processed(texts[start:end], images[start:end] if pictured else None))
        rows = request.group
        if pictured:
            inputs = [{"prompt": texts[i], "multi_modal_data": {"image": images[i]}} for i in rows]
        else:
            inputs = [{"prompt_token_ids": ids[i]} for i in rows]
        return [list(ids[i]) for i in rows], inputs


__all__ = ["VisionVLLMEngine", "checkpoint_name"]
