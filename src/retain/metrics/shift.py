"""Distribution shift between a reference model π0 and a finetuned model π on a task's prompts (SPEC §3.1).

- forward KL (Razor): E_{x~task} KL(π0(·|x) ‖ π(·|x)). Sample y ~ π0 (temperature 1, ``samples`` per prompt) and
  average Σ_t [log π0(y_t) − log π(y_t)] per sequence (the Monte-Carlo estimate), plus the exact per-position KL
  Σ_t KL(π0(·|x,y<t) ‖ π(·|x,y<t)) over the full vocabulary along the same samples (same expectation, lower
  variance).
- reverse KL (Huan): the same with y ~ π and the roles swapped: KL(π ‖ π0).
Reported per sequence (mean over samples of the per-sequence sum) and per token (total over all sampled tokens /
their number). The sampled tokens include the closing eos; a sample cut by ``max_new_tokens`` counts as it is.
- weight L2: ‖θ − θ0‖₂ over the parameters the two models share by name.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from retain.losses import distill_kl, token_logprobs
from retain.pictures import PictureInputs
from retain.rollout import EngineChoice, make_engine


@torch.no_grad()
def _pair_stats(sampler: torch.nn.Module, other: torch.nn.Module, prompt_ids, completion_ids, pad_id: int,
                batch_size: int = 128, pictures: PictureInputs | None = None):
    """Per-sample sums of log p_sampler − log p_other and of the exact KL(p_sampler ‖ p_other), and token counts.
    ``pictures``: one picture per row (a VLM's prompts), which both models see."""
    device = next(sampler.parameters()).device
    mc, exact, tokens = [], [], []
    for start in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]
        length = max(len(p) + len(c) for p, c in zip(ps, cs))
        ids = torch.full((len(ps), length), pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        mask = torch.zeros((len(ps), length - 1), dtype=torch.bool)
        for i, (p, c) in enumerate(zip(ps, cs)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            att[i, : len(p) + len(c)] = 1
            mask[i, len(p) - 1 : len(p) + len(c) - 1] = True
        ids, att, mask = ids.to(device), att.to(device), mask.to(device)
        shown = {} if pictures is None else pictures.rows(slice(start, start + batch_size)).to(device).as_kwargs(ids)
        la = sampler(input_ids=ids, attention_mask=att, **shown).logits[:, :-1]
        lb = other(input_ids=ids, attention_mask=att, **shown).logits[:, :-1]
        targets = ids[:, 1:]
        diff = token_logprobs(la, targets) - token_logprobs(lb, targets)
        kl = distill_kl(lb, la, mask, direction="forward")  # KL(teacher=sampler ‖ student=other)
        zero = torch.zeros((), device=device)
        mc.extend(torch.where(mask, diff, zero).sum(-1).tolist())
        exact.extend(torch.where(mask, kl, zero).sum(-1).tolist())
        tokens.extend(mask.sum(-1).tolist())
    return mc, exact, tokens


def _summary(mc: list[float], exact: list[float], tokens: list[int]) -> dict[str, float]:
    n, total_tokens = max(1, len(mc)), max(1, sum(tokens))
    return {
        "per_sequence": sum(mc) / n,
        "per_token": sum(mc) / total_tokens,
        "exact_per_sequence": sum(exact) / n,
        "exact_per_token": sum(exact) / total_tokens,
        "samples": len(mc),
        "tokens": int(sum(tokens)),
    }


def kl_shift(
    reference: torch.nn.Module,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    samples: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    engine: EngineChoice = "kv_cache",
    pictures: Callable[[Sequence[str]], PictureInputs | None] | None = None,
) -> dict[str, dict[str, float]]:
    """``{"forward": KL(π0‖π) stats, "reverse": KL(π‖π0) stats}``, each as ``_summary`` describes. For a VLM,
    ``engine`` is its engine and ``pictures`` its kind's (``retain.kind``): the KL is then over the text tokens
    given the picture, both models seeing it."""
    out = {}
    for direction, sampler, other in (("forward", reference, model), ("reverse", model, reference)):
        roll = make_engine(engine, sampler, tokenizer).generate(
            list(prompts), n=samples, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed
        )
        shown = None if pictures is None else pictures(roll.prompts)
        mc, exact, tokens = _pair_stats(sampler, other, roll.prompt_ids, roll.completion_ids, tokenizer.pad_token_id,
                                        pictures=shown)
        out[direction] = _summary(mc, exact, tokens)
    return out


@torch.no_grad()
def weight_l2(reference: torch.nn.Module, model: torch.nn.Module) -> float:
    ref = dict(reference.named_parameters())
    total = 0.0
    for name, p in model.named_parameters():
        if name in ref and ref[name].shape == p.shape:
            total += float((p.detach().float() - ref[name].detach().float().to(p.device)).pow(2).sum())
    return total**0.5
