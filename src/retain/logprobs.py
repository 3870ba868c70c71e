"""Log-probabilities of given (prompt, answer) texts under a model, batched, teacher-forced, float32.

Used to pick SFT targets by likelihood (SPEC §2.4) and to measure distribution shift (SPEC §3.1).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from retain.data import IGNORE, TokenPair, collate, encode_text, model_inputs
from retain.losses import token_logprobs

# (tokenizer, prompt, answer) -> a training item's tokens (and picture): a model kind's ``encode`` (retain.kind)
Encoder = Callable[[PreTrainedTokenizerBase, str, str], TokenPair]


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 256,
    encode: Encoder = encode_text,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of ``(start, logits, targets, mask)``: ``logits[:, t]`` predicts ``targets[:, t]``; ``mask`` marks the
    answer tokens (eos included); ``start`` is the index of the batch's first pair. The model is in eval mode while
    iterating and restored after. ``encode``: the model kind's (a VLM's also hands the prompt's picture)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            encoded = [encode(tokenizer, p, a) for p, a in chunk]
            batch = collate(encoded, tokenizer.pad_token_id)
            logits = model(**model_inputs(batch, device)).logits
            targets = batch.labels[:, 1:].to(device)
            yield start, logits[:, :-1], targets, targets != IGNORE
    finally:
        model.train(was_training)


def answer_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 256,
    temperature: float = 1.0,
    encode: Encoder = encode_text,
) -> list[list[float]]:
    """Per-token log π(answer_t | prompt, answer_<t) for each pair; the answer's eos is the last token."""
    out: list[list[float]] = []
    for _, logits, targets, mask in teacher_forced(model, tokenizer, pairs, batch_size, encode):
        logp = token_logprobs(logits, targets, temperature)
        out.extend(row[m].tolist() for row, m in zip(logp.cpu(), mask.cpu()))
    return out


def sequence_logprobs(model, tokenizer, pairs, batch_size: int = 256, encode: Encoder = encode_text) -> list[float]:
    """Σ_t log π(answer_t | ...) per pair."""
    return [sum(row) for row in answer_logprobs(model, tokenizer, pairs, batch_size, encode=encode)]
