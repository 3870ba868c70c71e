"""Token analysis of an SFT dataset under a model: how sure the model is at each target token, and whether the
target disagrees with it (a confident conflict, SPEC §2.3).

For every answer token (the answer's characters and the closing eos) of every (prompt, answer) pair: the
full-vocabulary predictive entropy H_t (nats) and the probability p_t the model gives the target token, both at
temperature 1, with teacher forcing on the target prefix. A token is a confident conflict when H_t < entropy_max
**and** p_t < prob_max — absolute thresholds, defaults 0.5 nats and 0.1, stated in every summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from retain.losses import CONFLICT_ENTROPY_MAX, CONFLICT_PROB_MAX, token_entropy, token_logprobs
from retain.data import encode_text
from retain.logprobs import Encoder, teacher_forced

ENTROPY_MAX = CONFLICT_ENTROPY_MAX
PROB_MAX = CONFLICT_PROB_MAX


@dataclass
class TokenStats:
    """Flat per-token arrays over a dataset (one entry per answer token)."""

    entropy: np.ndarray  # nats
    prob: np.ndarray  # p(target token)
    example: np.ndarray  # index of the (prompt, answer) pair
    position: np.ndarray  # index of the token within its answer
    token: np.ndarray  # target token id

    def conflict_mask(self, entropy_max: float = ENTROPY_MAX, prob_max: float = PROB_MAX) -> np.ndarray:
        return (self.entropy < entropy_max) & (self.prob < prob_max)

    def summary(self, entropy_max: float = ENTROPY_MAX, prob_max: float = PROB_MAX) -> dict[str, float]:
        conflicts = self.conflict_mask(entropy_max, prob_max)
        n = max(1, len(self.entropy))
        return {
            "tokens": int(len(self.entropy)),
            "examples": int(self.example.max() + 1) if len(self.example) else 0,
            "conflict_share": float(conflicts.sum() / n),
            "examples_with_conflict": float(
                len(np.unique(self.example[conflicts])) / max(1, int(self.example.max() + 1))
            ) if len(self.example) else 0.0,
            "low_entropy_share": float((self.entropy < entropy_max).sum() / n),
            "mean_entropy": float(self.entropy.mean()) if len(self.entropy) else 0.0,
            "mean_prob": float(self.prob.mean()) if len(self.prob) else 0.0,
            "entropy_max": entropy_max,
            "prob_max": prob_max,
        }

    def to_rows(self) -> list[dict[str, float]]:
        """Plot-ready records."""
        return [
            {"example": int(e), "position": int(p), "token": int(t), "entropy": float(h), "prob": float(q)}
            for e, p, t, h, q in zip(self.example, self.position, self.token, self.entropy, self.prob)
        ]


@torch.no_grad()
def token_stats(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 256,
    encode: Encoder = encode_text,
) -> TokenStats:
    """Per-token entropy and target probability of ``model`` on the answers of ``pairs``. ``encode``: the model
    kind's (``retain.kind``): a VLM's hands each picture prompt's image, so visual SFT targets are analysed given it."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("entropy", "prob", "example", "position", "token")}
    for start, logits, targets, mask in teacher_forced(model, tokenizer, pairs, batch_size, encode):
        rows, cols_idx = mask.nonzero(as_tuple=True)
        first = mask.float().argmax(dim=1)  # first answer position per row
        cols["entropy"].append(token_entropy(logits)[mask].cpu().numpy())
        cols["prob"].append(token_logprobs(logits, targets).exp()[mask].cpu().numpy())
        cols["example"].append((rows + start).cpu().numpy())
        cols["position"].append((cols_idx - first[rows]).cpu().numpy())
        cols["token"].append(targets[mask].cpu().numpy())
    return TokenStats(**{k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})
