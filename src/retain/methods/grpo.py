"""GRPO's objective (SPEC §2.1): on-policy groups, group-relative advantages, clipped policy gradient, optional β·KL.

Every ``updates_per_batch`` (μ) optimizer steps the current policy samples ``group_size`` completions for each of
``prompts_per_step`` train prompts (seeded by (seed, step)); the task's reward scores them. Log-probabilities use
logits / temperature, for the policy, the sampling policy and the reference alike. With μ = 1 the ratio is exactly
1 and old log-probs are the current ones, detached; with μ > 1 they are computed once per rollout batch. The
reference is the stage's starting model. Micro-batches contribute their share of the aggregation over the whole
rollout batch (``grpo``: sequences; ``bnpo``/``dapo``: tokens; ``dr_grpo``: sequences × max length).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from retain.evaluate import DEFAULT_MAX_NEW_TOKENS
from retain.losses import aggregate, group_advantages, grpo_token_loss, token_logprobs
from retain.methods.config import GRPOLoss, MethodConfig, OnPolicyData
from retain.methods.stage import StageContext
from retain.rollout import make_engine


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # [B, L-1] aligned with logits[:, :-1]: True where the target is a completion token
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor | None  # [B, L-1]
    ref_logp: torch.Tensor | None
    total_sequences: int
    total_tokens: int
    metrics: dict[str, float]


class GRPOObjective:
    def __init__(self, cfg: MethodConfig, ctx: StageContext) -> None:
        assert isinstance(cfg.data, OnPolicyData) and isinstance(cfg.loss, GRPOLoss)
        self.data, self.lossc, self.ctx = cfg.data, cfg.loss, ctx
        self.micro = cfg.micro_batch_size or cfg.data.prompts_per_step * cfg.data.group_size
        self.max_new = cfg.max_new_tokens or getattr(ctx.task, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        self.prompts = [e.prompt for e in ctx.task.examples("train", None, seed=0)]
        self.engine = make_engine(ctx.engine, ctx.model, ctx.tokenizer)
        self._cached: tuple[int, list[RolloutBatch]] | None = None

    def batches(self, step: int) -> list[RolloutBatch]:
        first_step = step - step % self.data.updates_per_batch
        if self._cached is None or self._cached[0] != first_step:
            self._cached = (first_step, self._rollout(first_step))
        return self._cached[1]

    @torch.no_grad()
    def _rollout(self, step: int) -> list[RolloutBatch]:
        d, ctx = self.data, self.ctx
        rng = random.Random(ctx.seed * 1_000_003 + step)
        chosen = rng.sample(self.prompts, min(d.prompts_per_step, len(self.prompts)))
        roll = self.engine.generate(
            chosen, n=d.group_size, temperature=d.temperature, max_new_tokens=self.max_new,
            seed=ctx.seed * 1_000_003 + step,
        )
        rewards = [ctx.task.reward(p, t) for p, t in zip(roll.prompts, roll.texts)]
        advantages = group_advantages(rewards, d.group_size, self.lossc.scale, self.lossc.adv_eps)
        correct = [r >= 1.0 for r in rewards]
        groups = torch.tensor(rewards, dtype=torch.float32).view(-1, d.group_size)
        metrics = {
            "reward": float(groups.mean()),
            "accuracy": sum(correct) / len(correct),
            "completion_len": sum(len(c) for c in roll.completion_ids) / len(roll),
            "truncated": sum(roll.truncated) / len(roll),
            "flat_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
        }
        pad = ctx.tokenizer.pad_token_id
        seqs = [p + c for p, c in zip(roll.prompt_ids, roll.completion_ids)]
        length = max(len(s) for s in seqs)
        n = len(seqs)
        input_ids = torch.full((n, length), pad, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        completion = torch.zeros((n, length - 1), dtype=torch.bool)
        for i, (p, c) in enumerate(zip(roll.prompt_ids, roll.completion_ids)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention[i, : len(p) + len(c)] = 1
            completion[i, len(p) - 1 : len(p) + len(c) - 1] = True
        total_tokens = int(completion.sum())
        out = []
        for s in range(0, n, self.micro):
            sl = slice(s, s + self.micro)
            ids, att, comp = input_ids[sl], attention[sl], completion[sl]
            old = self._logp(ctx.model, ids, att) if d.updates_per_batch > 1 else None
            ref = self._logp(ctx.reference, ids, att) if self.lossc.beta > 0 else None
            out.append(RolloutBatch(ids, att, comp, advantages[sl], old, ref, n, total_tokens, metrics))
        return out

    def _logp(self, model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits[:, :-1]
        return token_logprobs(logits, ids[:, 1:].to(device), self.data.temperature)

    def loss(self, model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        logp = self._logp(model, batch.input_ids, batch.attention_mask)
        mask = batch.completion_mask.to(device)
        per_token, stats = grpo_token_loss(
            logp,
            None if batch.old_logp is None else batch.old_logp.to(device),
            batch.advantages.to(device),
            None if batch.ref_logp is None else batch.ref_logp.to(device),
            beta=self.lossc.beta,
            eps_low=self.lossc.eps_low,
            eps_high=self.lossc.eps_high,
            kl_kind=self.lossc.kl,
            mask=mask,
        )
        mode, share = self.lossc.aggregation, len(batch.advantages) / batch.total_sequences
        if mode == "grpo":
            loss = aggregate(per_token, mask, "grpo") * share
        elif mode == "dr_grpo":
            loss = aggregate(per_token, mask, "dr_grpo", max_completion_length=self.max_new) * share
        else:  # bnpo and dapo: token sum over the whole rollout batch's completion tokens
            loss = aggregate(per_token, mask, "dapo", num_items=batch.total_tokens)
        return loss, {**batch.metrics, **{k: float(v) for k, v in stats.items()}}
