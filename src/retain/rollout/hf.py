"""Rollout engines on a Hugging Face model in this process, sharing the training model's weights.

Both implement only the completion step of ``RolloutEngine``'s template (seeding, rows, eval mode, eos cuts and
decoding are the base class's).

- ``HFGenerateEngine`` (engine ``hf``): plain ``model.generate`` (KV cache), the reference.
- ``KVCacheSamplerEngine`` (default, engine ``kv_cache``; ``cached``, its old name, is still accepted): the same
  computation — left-padded prefill, then one token at a time through the model's KV cache — as a short loop
  without generate's per-step machinery (logits processors, stopping criteria objects, output bookkeeping), which dominates for small models. It samples from
  softmax(logits / temperature) with no top-k/top-p, which is what GRPO's log-probabilities assume; greedy is argmax.
  What it does not compute, on the same results (greedy completions are token-identical to ``HFGenerateEngine``):

  * each distinct prompt is prefilled once per batch and its cache copied to its ``n`` sample rows;
  * prefixes shared by several prompts of a batch (the chat template's opening, a task's instruction) are prefilled
    once, in levels, their cache rows copied to the prompts that extend them (``retain.rollout.prefix`` plans the cuts
    by cost; with no cut worth a forward it is one left-padded prefill). Task prompts share most of their tokens: this
    cuts the prefill — most of a greedy evaluation's time — by 2-4x on the embedded tasks (kg 0.37, countdown 0.23 of
    the padded token positions);
  * rows are batched sorted by prompt length (results go back in request order), so a batch has little or no
    left padding — none at all means no attention mask;
  * finished rows leave the batch (their cache rows are dropped) once a quarter of it has finished: completions of
    one batch have very different lengths, and a copy of the cache costs about what a decoding step does;
  * full-attention layers cache into a buffer of the batch's final length instead of re-concatenating every step.

  Sampling is seeded (``seed`` seeds torch's global generator, as for ``HFGenerateEngine``) and reproducible for the
  same request and batch size; the draws differ from ``model.generate``'s, the distribution does not.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from retain.data import left_pad
from retain.rollout.base import RolloutEngine, SamplingRequest
from retain.rollout.prefix import prefix_plan

# one more prefill forward, priced in token positions (prefix_plan): at the embedded model's size on CPU a forward's
# fixed cost is about what 20-40 token positions of compute are
PREFIX_LEVEL_COST = 32
DROP_SHARE = 4  # drop finished rows from a decoding batch once at least 1/DROP_SHARE of its rows have finished


class HFGenerateEngine(RolloutEngine):
    def complete(self, request: SamplingRequest) -> tuple[list[list[int]], list[list[int]]]:
        prompt_ids = [self.encode(p) for p in request.flat]
        device = next(self.model.parameters()).device
        completions: list[list[int]] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            ids, mask = left_pad(prompt_ids[start : start + self.batch_size], self.tok.pad_token_id)
            completions += self._sample(ids.to(device), mask.to(device), request).tolist()
        return prompt_ids, completions

    def _sample(self, ids, mask, request: SamplingRequest) -> torch.Tensor:
        greedy = request.greedy
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=not greedy,
            temperature=None if greedy else request.temperature,
            top_k=None if greedy else 0,
            top_p=None if greedy else 1.0,
            max_new_tokens=request.max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
        )
        return out[:, ids.shape[1] :]


class KVCacheSamplerEngine(RolloutEngine):
    def complete(self, request: SamplingRequest) -> tuple[list[list[int]], list[list[int]]]:
        flat = request.flat
        distinct = list(dict.fromkeys(request.prompts))
        encoded = {p: self.encode(p) for p in distinct}
        rank = {p: i for i, p in enumerate(distinct)}
        prompt_ids = [encoded[p] for p in flat]
        # Rows sorted by prompt length (then prompt): a batch holds few lengths (little or no left padding) and the
        # samples of one prompt sit together, so each distinct prompt is prefilled once per batch.
        order = sorted(range(len(flat)), key=lambda r: (len(prompt_ids[r]), rank[flat[r]], r))
        completions: list[list[int]] = [[] for _ in flat]
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            new = self._sample_rows([flat[r] for r in rows], encoded, device, request.temperature,
                                    request.max_new_tokens, request.greedy)
            for r, c in zip(rows, new):
                completions[r] = c
        return prompt_ids, completions

    def _sample_rows(self, row_prompts, encoded, device, temperature, max_new_tokens, greedy) -> list[list[int]]:
        """Completions for one batch of rows (rows of one prompt adjacent): prefill each distinct prompt once, copy
        its cache to its rows, then decode one token at a time, dropping rows from the batch as they finish."""
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        distinct = list(dict.fromkeys(row_prompts))
        index = {p: i for i, p in enumerate(distinct)}
        out, cache, mask, positions = self._prefill([encoded[p] for p in distinct], device, max_new_tokens)
        padded = mask is not None
        logits = out.logits[:, -1, :]
        rows = len(row_prompts)
        next_pos = positions[:, -1] + 1
        if rows != len(distinct):
            expand = torch.tensor([index[p] for p in row_prompts], device=device)
            cache.batch_select_indices(expand)
            logits, next_pos = logits[expand], next_pos[expand]
            mask = mask[expand] if padded else None
        prompt_len = cache.get_seq_length()
        if padded:  # the whole attention mask up front; step t attends to its first prompt_len + t + 1 columns
            mask = torch.cat([mask, mask.new_ones(rows, max_new_tokens)], dim=1)
        tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        active = torch.arange(rows, device=device)  # output row of each batch row
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            if greedy:
                token = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs, 1).squeeze(-1)
            token = token.masked_fill(done, pad)
            tokens[active, t] = token
            if t == max_new_tokens - 1:
                break
            done |= token == eos
            finished = int(done.sum())
            if finished == len(done):
                break
            if finished and finished * DROP_SHARE >= len(done):
                keep = (~done).nonzero().squeeze(-1)
                active, token, next_pos, done = active[keep], token[keep], next_pos[keep], done[keep]
                cache.batch_select_indices(keep)
                if padded:
                    mask = mask[keep]
            out = self.model(
                input_ids=token.unsqueeze(-1), attention_mask=mask[:, : prompt_len + t + 1] if padded else None,
                position_ids=next_pos.unsqueeze(-1), cache=cache, use_cache=True,
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        return tokens.tolist()  # cut at eos once, by RolloutEngine.run

    def _prefill(self, prompts: list[list[int]], device, max_new_tokens: int):
        """Prefill distinct prompts: (model output with the last column's logits, cache, attention mask over the
        cache's columns or None when no row is padded, position ids of the last level). Shared prefixes are computed
        once per level (``prefix_plan``); each prompt's rest comes last, right-aligned (its padding, if any, sits
        between its prefix and its rest, masked), so the last column of every row is its prompt's last token. With
        no cut this is one left-padded prefill of whole prompts."""
        width = max(len(p) for p in prompts)
        cache = self._new_cache(width + max_new_tokens)
        start, rows = 0, None  # columns computed so far; each prompt's cache row (None: one row per prompt)
        for cut, heads, row in prefix_plan(prompts, PREFIX_LEVEL_COST):
            if rows is not None:
                cache.batch_select_indices(torch.tensor([rows[h] for h in heads], device=device))
            ids = torch.tensor([prompts[h][start:cut] for h in heads], device=device)
            self.model(input_ids=ids, position_ids=torch.arange(start, cut, device=device).expand(len(heads), -1),
                       cache=cache, use_cache=True, logits_to_keep=1)
            start, rows = cut, row
        if rows is not None:
            cache.batch_select_indices(torch.tensor(rows, device=device))
        ids, rest_mask = left_pad([p[start:] for p in prompts], self.tok.pad_token_id)
        mask = torch.cat([rest_mask.new_ones(len(prompts), start), rest_mask], dim=1).to(device)
        padded = bool((rest_mask == 0).any())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        out = self.model(
            input_ids=ids.to(device), attention_mask=mask if padded else None, position_ids=positions, cache=cache,
            use_cache=True, logits_to_keep=1,
        )
        return out, cache, mask if padded else None, positions

    def _new_cache(self, capacity: int) -> Cache:
        """A buffer cache of ``capacity`` positions when every layer is full attention, else transformers' own."""
        from transformers import DynamicCache

        config = getattr(self.model, "config", None)
        text = config.get_text_config(decoder=True) if config is not None else None
        layers = getattr(text, "num_hidden_layers", None)
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if not isinstance(layers, int) or kinds != {"full_attention"}:
            return DynamicCache(config=config)  # sliding-window or hybrid layers: transformers' own cache
        return Cache(layers=[_BufferLayer(capacity) for _ in range(layers)])


class _BufferLayer(DynamicLayer):
    """A full-attention cache layer that writes into a buffer of the batch's final length instead of concatenating
    every step (DynamicLayer's ``torch.cat`` copies the whole cache per token)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            batch, heads, _, _ = key_states.shape
            self.device = key_states.device
            self._k = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
            self._v = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:  # copies the filled columns only (the rest of the buffer is still to be written)
            self._k, self._v = self._selected(self._k, indices), self._selected(self._v, indices)
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def _selected(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = buffer.new_empty((len(indices),) + buffer.shape[1:])
        torch.index_select(buffer[:, :, : self.length], 0, indices, out=out[:, :, : self.length])
        return out
