"""Rollouts and evaluation with pictures: the prompt and its image go through the processor, then ``generate``.

``VisionEngine.generate`` takes prompts and their images (PIL) and returns the same ``Rollout`` as the text engines
(one entry per sample, prompt-major), so scoring and the methods read it the same way. It calls the model's own
``generate`` with whatever the processor returns (``pixel_values``, and ``image_grid_thw`` for Qwen2-VL), which is
the path a real VLM takes; sampling is softmax(logits / temperature) with no top-k / top-p, greedy is argmax. Seeding,
rows, eval mode, eos cuts and decoding are ``RolloutEngine``'s template; this engine's completion step is the
processor and ``generate``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from retain.evaluate import halves, sampled_scores
from retain.rollout.base import Rollout, RolloutEngine, SamplingRequest
from retain.vision.model import vision_prompt_text


class VisionEngine(RolloutEngine):
    """Implements only the completion step of ``RolloutEngine``'s template; ``generate`` takes the pictures."""

    def __init__(self, model: torch.nn.Module, processor: Any, batch_size: int = 256) -> None:
        super().__init__(model, processor.tokenizer, batch_size)
        self.processor = processor

    def generate(  # type: ignore[override] - a picture per prompt
        self,
        prompts: Sequence[str],
        images: Sequence[Any],
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 16,
        greedy: bool = False,
        seed: int | None = None,
    ) -> Rollout:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        return self.run(SamplingRequest(list(prompts), n, temperature, max_new_tokens, greedy, seed, list(images)))

    def complete(self, request: SamplingRequest) -> tuple[list[list[int]], list[list[int]]]:
        prompts, images, greedy = request.prompts, request.images, request.greedy
        self.tok.padding_side = "left"
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        sampling = {} if greedy else {"temperature": request.temperature, "top_k": 0, "top_p": 1.0}
        prompt_ids: list[list[int]] = []
        completions: list[list[int]] = []
        group = request.group
        for start in range(0, len(group), self.batch_size):
            rows = group[start : start + self.batch_size]
            enc = self.processor(text=[vision_prompt_text(prompts[i]) for i in rows],
                                 images=[images[i] for i in rows], padding=True, return_tensors="pt")
            generated = self.model.generate(**enc, do_sample=not greedy, max_new_tokens=request.max_new_tokens,
                                            eos_token_id=eos, pad_token_id=pad, **sampling)
            width = enc["input_ids"].shape[1]
            for ids, mask, new in zip(enc["input_ids"], enc["attention_mask"], generated[:, width:]):
                completion = new.tolist()
                prompt_ids.append(ids[mask.bool()].tolist())
                completions.append(completion if eos in completion else [t for t in completion if t != pad])
        return prompt_ids, completions


def evaluate_visual(
    engine: VisionEngine, task_name: str, n: int | None = 200, samples: int = 0, split: str = "test", seed: int = 0
) -> dict[str, Any]:
    """As ``retain.evaluate.evaluate_task`` for a visual task: greedy accuracy (+ pass@K with ``samples``), and
    ``score``, the mean reward (for ``cards``: the share of cards named right)."""
    from retain import tasks as task_registry

    task = task_registry.get(task_name)
    examples = task.examples(split, n, seed=seed)
    prompts, images = [e.prompt for e in examples], [e.image.render() for e in examples]
    max_new = getattr(task, "max_new_tokens", 16)
    greedy = engine.generate(prompts, images, n=1, greedy=True, max_new_tokens=max_new)
    rewards = [task.reward(e.prompt, t, e.answer) for e, t in zip(examples, greedy.texts)]
    correct = [r >= 1.0 for r in rewards]
    result: dict[str, Any] = {"accuracy": sum(correct) / max(1, len(correct)), "score": sum(rewards) / max(1, len(rewards)),
                              "n": len(correct), "split": split, **halves(correct),
                              "correct": "".join("1" if c else "0" for c in correct)}
    if samples > 0:
        sampled = engine.generate(prompts, images, n=samples, temperature=1.0, max_new_tokens=max_new, seed=seed + 1)
        result.update(sampled_scores(task, examples, sampled, samples))
    return result
