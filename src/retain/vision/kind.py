"""The vision-language model kind (``retain.kind``'s seam): what the runner and the method parts need to train and
measure a VLM with the same code as a text model.

- Loading and saving the Hugging Face way: the model with ``AutoModelForImageTextToText``, the processor saved beside
  every stage's weights (so a stage directory loads with ``load_vlm`` and resumes).
- A prompt that shows a picture (``PicturePrompt``) is encoded by the processor (its ``<image>`` expanded to the
  model's image tokens) and hands its pixel values along: ``encode`` gives SFT's items (``retain.data.collate``
  stacks the pictures of a batch's rows), ``pictures`` the rollout rows' pictures for GRPO's and the shift's
  forwards. A text prompt encodes as for the text base (every text id is unchanged in the VLM's tokenizer).
- Rollouts go through ``VisionEngine`` (the processor and ``generate``), or ``VisionVLLMEngine`` with ``engine: vllm``.
- A column of a visual task is evaluated on the VLM with its pictures; a text column (the prior skills) on the VLM's
  language model alone (``text_view``, sharing its weights), with the configured text engine (with ``vllm``: the
  VLM's vLLM engine, given the text prompts alone).

What it cannot run is refused when the config is validated (``refusal``), each with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from retain import tasks as task_registry
from retain.data import TokenPair, encode_answer, encode_text
from retain.evaluate import evaluate_task
from retain.kind import ColumnEvaluator
from retain.models.loading import enable_gradient_checkpointing, torch_dtype
from retain.pictures import PictureInputs
from retain.rollout import EngineChoice, make_engine
from retain.vision.engine import VisionEngine
from retain.vision.model import (
    has_vision_tower, is_vlm, load_processor, load_vlm, model_config_file, resolve_vlm_path, text_view, vision_prompt_text,
    vlm_unknown,
)


class VisionModels:
    """A LLaVA-style VLM and its processor (loaded once from ``spec``; every stage's checkpoint saves the same one)."""

    name = "vision"
    # LLaVA reads the vision tower's hidden states, never its pooled output, so CLIP's post_layernorm gets no
    # gradient: DDP must look for such parameters. A single process is wrapped in DDP too when vLLM's in-process
    # launcher has set LOCAL_RANK (accelerate reads it as a launch), so this is needed with ``engine: vllm`` on one GPU.
    unused_parameters = True

    def __init__(self, spec: str | Path | None, processor: Any = None) -> None:
        self.spec = spec
        self._processor: Any = processor
        self._encoded: dict[str, tuple[list[int], PictureInputs]] = {}  # prompt -> (ids, pictures): processed once

    @classmethod
    def claims(cls, spec: str | Path) -> bool:
        return is_vlm(spec)

    @classmethod
    def cannot_tell(cls, spec: str | Path) -> bool:
        """A hub name whose config is not in the local cache: whether it is a VLM would need a download."""
        return vlm_unknown(spec)

    @classmethod
    def contradicts(cls, spec: str | Path) -> bool:
        """``spec`` has a config to read (local, or cached) and it has no vision tower: it cannot load as a VLM."""
        config = model_config_file(spec)
        return config is not None and not has_vision_tower(config)

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._processor = load_processor(self.spec)
        return self._processor

    def resolve(self, spec: str | Path) -> str:
        return resolve_vlm_path(spec)

    def load(self, spec: Any, *, trust_remote_code: bool = False, dtype: Any = None, device: Any = None,
             gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        """As ``retain.models.loading.load_model`` (no remote code: a config asking for it is refused)."""
        model, processor = load_vlm(spec, torch_dtype(dtype))
        self._processor = self._processor or processor
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if device is not None:
            model.to(device)
        return model, self.processor.tokenizer

    def saved_with(self, tokenizer: PreTrainedTokenizerBase) -> Any:
        return self.processor

    def encode(self, tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> TokenPair:
        image = getattr(prompt, "image", None)
        if image is None:
            return encode_text(tokenizer, prompt, answer)
        ids, pixels = self._pictured(prompt)
        return ids, encode_answer(tokenizer, answer), pixels

    def pictures(self, prompts: Sequence[str]) -> PictureInputs | None:
        return PictureInputs.cat([self._pictured(p)[1] for p in prompts if getattr(p, "image", None) is not None])

    def _pictured(self, prompt: Any) -> tuple[list[int], PictureInputs]:
        """A picture prompt's ids (its picture placeholder expanded) and its picture inputs, processed once a run."""
        if prompt not in self._encoded:
            processor = self.processor
            enc = processor(text=[vision_prompt_text(prompt, processor)], images=[prompt.image.render()],
                            return_tensors="pt")
            picture = PictureInputs.from_processed(enc, getattr(processor, "image_token_id", None))
            self._encoded[prompt] = (enc["input_ids"][0].tolist(), picture)
        return self._encoded[prompt]

    def engine(self, choice: EngineChoice) -> EngineChoice:
        """``vllm``: the VLM through vLLM (``VisionVLLMEngine``); any other choice: its processor and ``generate``."""
        if choice == "vllm":  # imported here only, as retain.rollout.make_engine imports the text vLLM engine
            from retain.vision.vllm_engine import VisionVLLMEngine

            return lambda model, tokenizer: VisionVLLMEngine(model, self.processor)
        return lambda model, tokenizer: VisionEngine(model, self.processor)

    def evaluator(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, engine: EngineChoice
                  ) -> ColumnEvaluator:
        pictures = self.engine(engine)(model, tokenizer)
        # vLLM holds the whole VLM: its text columns go through that engine (the language model, no picture), not a
        # second vLLM engine for the text view (whose config names no checkpoint of its own)
        text = pictures if engine == "vllm" else make_engine(engine, text_view(model), tokenizer)

        def evaluate(task_name: str, **kwargs: Any) -> dict[str, Any]:
            shows = getattr(task_registry.get(task_name), "modality", "text") == "image"
            return evaluate_task(pictures if shows else text, task_name, **kwargs)

        return evaluate

    def refusal(self, method: Any, where: str) -> str | None:
        from retain.methods.config import TeacherKLLoss

        for uses, why in (
            (isinstance(method.loss, TeacherKLLoss),
             ("loss.kind 'teacher_kl': on-policy distillation scores the student's samples under a teacher loaded "
              "as a text model, which never sees the picture")),
            (getattr(method.data, "source_model", None) is not None,
             "data.source_model: the source model is loaded as a text model and samples without the picture"),
        ):
            if uses:
                return f"{where}: method {method.name!r} cannot train a vision-language model: {why}"
        return None


__all__ = ["VisionModels"]
