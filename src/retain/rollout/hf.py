"""Rollout engines on a Hugging Face model in this process, sharing the training model's weights.

- ``HFGenerateEngine``: plain ``model.generate`` (KV cache), the reference.
- ``CachedSamplerEngine`` (default): the same computation — left-padded prefill, then one token at a time through
  the model's KV cache — as a short loop without generate's per-step machinery (logits processors, stopping
  criteria objects, output bookkeeping), which dominates for small models. It samples from
  softmax(logits / temperature) with no top-k/top-p, which is what GRPO's log-probabilities assume.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from retain.data import encode_prompt, left_pad
from retain.rollout.base import Rollout, RolloutEngine


class _HFEngineBase(RolloutEngine):
    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256) -> None:
        self.model = model
        self.tok = tokenizer
        self.batch_size = batch_size
        self._prompt_cache: dict[str, list[int]] = {}

    def _encode(self, prompt: str) -> list[int]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            ids = self._prompt_cache[prompt] = encode_prompt(self.tok, prompt)
        return ids

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        greedy: bool = False,
        seed: int | None = None,
    ) -> Rollout:
        if seed is not None:
            torch.manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        group = [i for i in range(len(prompts)) for _ in range(n)]
        prompt_ids = [self._encode(p) for p in flat]
        completions: list[list[int]] = []
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(flat), self.batch_size):
                    ids, mask = left_pad(prompt_ids[start : start + self.batch_size], self.tok.pad_token_id)
                    new = self._sample(ids.to(device), mask.to(device), temperature, max_new_tokens, greedy)
                    completions.extend(self._cut(row) for row in new.tolist())
        finally:
            self.model.train(was_training)
        eos = self.tok.eos_token_id
        truncated = [not (c and c[-1] == eos) for c in completions]
        texts = [self.tok.decode(c[:-1] if not t else c, skip_special_tokens=True) for c, t in zip(completions, truncated)]
        return Rollout(flat, prompt_ids, completions, texts, group, truncated)

    def _cut(self, row: list[int]) -> list[int]:
        eos = self.tok.eos_token_id
        return row[: row.index(eos) + 1] if eos in row else row

    def _sample(self, ids, mask, temperature, max_new_tokens, greedy) -> torch.Tensor:
        raise NotImplementedError


class HFGenerateEngine(_HFEngineBase):
    def _sample(self, ids, mask, temperature, max_new_tokens, greedy) -> torch.Tensor:
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else 0,
            top_p=None if greedy else 1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
        )
        return out[:, ids.shape[1] :]


class CachedSamplerEngine(_HFEngineBase):
    def _sample(self, ids, mask, temperature, max_new_tokens, greedy) -> torch.Tensor:
        from transformers import DynamicCache

        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        batch = ids.shape[0]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        next_pos = positions[:, -1:] + 1
        done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        tokens = []
        logits = out.logits[:, -1, :]
        for _ in range(max_new_tokens):
            if greedy:
                token = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs, 1).squeeze(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
            done |= token == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)  # finished rows are cut at eos later
            out = self.model(
                input_ids=token.unsqueeze(-1), attention_mask=mask, position_ids=next_pos,
                cache=cache, use_cache=True,
            )
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :]
        return torch.stack(tokens, dim=1)
