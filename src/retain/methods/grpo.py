"""GRPO's objective (SPEC §2.1): on-policy groups, group-relative advantages, clipped policy gradient, optional β·KL.

Every ``updates_per_batch`` (μ) optimizer steps the current policy samples ``group_size`` completions for each of
``prompts_per_step`` train prompts (seeded by (seed, step)); the task's reward scores them. Log-probabilities use
logits / temperature, for the policy, the sampling policy and the reference alike. With μ = 1 the ratio is exactly
1 and old log-probs are the current ones, detached; with μ > 1 they are computed once per rollout batch. The
reference is the stage's starting model. Micro-batches contribute their share of the aggregation over the whole
rollout batch (``grpo``: sequences; ``bnpo``/``dapo``: tokens; ``dr_grpo``: sequences × max length).

On a vision-language model (``ctx.kind``, ``retain.kind``) the prompts carry their pictures: the engine samples
given them, the reward reads each picture's reference (``PicturePrompt``), and every forward of the loss gets the
rows' pictures (``retain.pictures.PictureInputs``; those rows are not packed).

Under DDP (several processes) the rollout is sharded by prompt: each rank samples the whole groups of its contiguous
share of the step's prompts (seed × world size + rank), and the parts are gathered, so every rank holds the same
rollout batch — the prompt order of one process — and the Trainer hands each rank its share of the micro-batches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from retain import distributed
from retain.errors import RetainError
from retain.evaluate import DEFAULT_MAX_NEW_TOKENS
from retain.losses import aggregate, group_advantages, grpo_token_loss, token_logprobs
from retain.methods.config import GRPOLoss, MethodConfig, OnPolicyData
from retain.methods.stage import StageContext
from retain.pictures import PictureInputs
from retain.rollout import Rollout, make_engine
from retain.tasks.base import CORRECT


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
    prompt_ids: list[list[int]] | None = None  # the rows' prompt / completion tokens: what the packed forward runs
    completion_ids: list[list[int]] | None = None
    pictures: PictureInputs | None = None  # one picture per row, for a VLM on a visual task (rows not packed)


class GRPOObjective:
    """``grpo`` replaces the config's loss for objectives that reuse GRPO's rollouts with a loss of their own
    (on-policy distillation: advantages are then only logged)."""

    def __init__(self, cfg: MethodConfig, ctx: StageContext, grpo: GRPOLoss | None = None) -> None:
        lossc = grpo if grpo is not None else cfg.loss
        assert isinstance(cfg.data, OnPolicyData) and isinstance(lossc, GRPOLoss)
        self.data, self.lossc, self.ctx = cfg.data, lossc, ctx
        rows = cfg.data.prompts_per_step * cfg.data.group_size
        self.micro = cfg.micro_batch_size or -(-rows // distributed.world_size())  # one share per process
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
        roll = self._generate(chosen, ctx.seed * 1_000_003 + step)
        rewards = [_scorable(self._reward(p, t)) for p, t in zip(roll.prompts, roll.texts)]
        advantages = group_advantages(rewards, d.group_size, self.lossc.scale, self.lossc.adv_eps)
        if self.lossc.positive_only:  # no sample is pushed down; a clamped row (A = 0) is dropped from the forward
            advantages = advantages.clamp(min=0.0)
        correct = [r >= 1.0 for r in rewards]
        groups = torch.tensor(rewards, dtype=torch.float32).view(-1, d.group_size)
        valid = ~torch.isnan(groups)
        g_max = torch.where(valid, groups, -torch.inf).amax(1)
        g_min = torch.where(valid, groups, torch.inf).amin(1)
        metrics = {
            "reward": float(groups[valid].mean()) if valid.any() else 0.0,
            "accuracy": sum(correct) / len(correct),
            "completion_len": sum(len(c) for c in roll.completion_ids) / len(roll),
            "truncated": sum(roll.truncated) / len(roll),
            # groups whose scorable rewards are all equal (advantage 0: no signal), and rewards that were not scorable
            "flat_groups": float(((g_max == g_min) | (valid.sum(1) <= 1)).float().mean()),
            "unscorable": float((~valid).float().mean()),
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
        pictures = ctx.kind.pictures(roll.prompts)  # the pictures the samples were drawn from (None: text)
        if pictures is not None and len(pictures) != n:
            raise RetainError(f"GRPO on {ctx.task_name!r}: {len(pictures)} pictures for {n} rollout rows")
        out = []
        for s in range(0, n, self.micro):
            sl = slice(s, s + self.micro)
            batch = RolloutBatch(
                input_ids[sl], attention[sl], completion[sl], advantages[sl], None, None, n, total_tokens, metrics,
                roll.prompt_ids[sl], roll.completion_ids[sl], None if pictures is None else pictures.rows(sl),
            )
            if d.updates_per_batch > 1:
                batch.old_logp = self._logp(ctx.model, batch)
            if self.lossc.beta > 0:
                batch.ref_logp = self._logp(ctx.reference, batch)
            out.append(batch)
        return out

    def _reward(self, prompt: str, text: str) -> float:
        reward = self.ctx.task.reward(prompt, text)
        if self.data.reward == "binary":  # an unscorable reward stays unscorable (advantage 0), not wrong
            value = _scorable(reward)
            return value if math.isnan(value) else float(value >= CORRECT)
        return reward

    def _generate(self, prompts: list[str], seed: int) -> Rollout:
        d = self.data
        self.engine.sync_weights(self.ctx.model)  # engines with their own copy of the weights (vLLM) refresh it
        world = distributed.world_size()
        if world == 1:
            return self.engine.generate(prompts, n=d.group_size, temperature=d.temperature,
                                        max_new_tokens=self.max_new, seed=seed)
        rank = distributed.rank()
        mine = distributed.shard(prompts, rank, world)
        part = self.engine.generate(mine, n=d.group_size, temperature=d.temperature, max_new_tokens=self.max_new,
                                    seed=seed * world + rank) if mine else None
        return Rollout.concat([p for p in distributed.all_gather_objects(part) if p is not None])

    def _logp(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """[B, L-1] log-probs of each row's next token (valid where ``completion_mask``)."""
        device = next(model.parameters()).device
        if batch.prompt_ids is not None and batch.pictures is None and packable(model):
            return packed_logp(model, batch.prompt_ids, batch.completion_ids, batch.input_ids.shape[1],
                               self.data.temperature, device)
        ids, att = batch.input_ids.to(device), batch.attention_mask
        pictures = {} if batch.pictures is None else batch.pictures.to(device).as_kwargs(ids)
        logits = model(input_ids=ids, attention_mask=att.to(device), **pictures).logits[:, :-1]
        return token_logprobs(logits, ids[:, 1:], self.data.temperature)

    def loss(self, model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        if self.lossc.beta == 0:
            batch = _without_flat_rows(batch)
        logp = self._logp(model, batch)
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


def _scorable(reward) -> float:
    """A reward as a float, NaN when it is not a finite number (None, NaN, ±inf): such a completion gets advantage 0
    and is counted in the ``unscorable`` metric instead of turning its group's advantages, or the loss, into NaN."""
    try:
        value = float(reward)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _without_flat_rows(batch: RolloutBatch) -> RolloutBatch:
    """The rows whose advantage is not exactly 0. With β = 0 a row with A = 0 has per-token loss −min(ρA, clip(ρ)A)
    = 0 and zero gradient, and every normaliser (the share of ``total_sequences``, ``total_tokens``) counts the whole
    rollout batch, so leaving them out of the forward changes neither loss nor gradient (only the clip/ratio
    statistics, which are then over the rows that train). One row is kept if none is left (loss 0, gradient 0)."""
    keep = (batch.advantages != 0).nonzero().squeeze(-1)
    if len(keep) == len(batch.advantages):
        return batch
    if len(keep) == 0:
        keep = keep.new_zeros(1)
    rows = keep.tolist()
    pick = lambda t: None if t is None else t[keep]  # noqa: E731
    return RolloutBatch(
        batch.input_ids[keep], batch.attention_mask[keep], batch.completion_mask[keep], batch.advantages[keep],
        pick(batch.old_logp), pick(batch.ref_logp), batch.total_sequences, batch.total_tokens, batch.metrics,
        None if batch.prompt_ids is None else [batch.prompt_ids[i] for i in rows],
        None if batch.completion_ids is None else [batch.completion_ids[i] for i in rows],
        None if batch.pictures is None else batch.pictures.rows(rows),
    )


PACK_LIMIT = 1024  # longest packed row (prompt + completions); a group longer than this spreads over several rows


def packable(model: torch.nn.Module) -> bool:
    """Attention implementations that take an arbitrary 4-D additive mask (flash-attention kernels do not)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def packed_logp(model, prompt_ids, completion_ids, length, temperature, device) -> torch.Tensor:
    """Log-probs of the completions with each prompt run once for all of its samples (:func:`packed_logits`).
    Returns the padded layout ``[B, length-1]``: entry (i, t) is log π(x_{t+1} | x_≤t) of row i, set where
    ``completion_mask`` is true and 0 elsewhere."""
    logits, tgt = packed_logits(model, prompt_ids, completion_ids, device)
    if not tgt:  # every completion empty: nothing to score (the forward still runs, so gradients stay connected)
        return logits.new_zeros((len(prompt_ids), length - 1)) + 0 * logits.sum()
    lp = token_logprobs(logits, torch.tensor(tgt, device=device), temperature)
    out_row = [i for i, c in enumerate(completion_ids) for _ in c]
    out_col = [t for p, c in zip(prompt_ids, completion_ids) for t in range(len(p) - 1, len(p) - 1 + len(c))]
    out = torch.zeros((len(prompt_ids), length - 1), dtype=lp.dtype, device=device)
    return out.index_put((torch.tensor(out_row, dtype=torch.long, device=device),
                          torch.tensor(out_col, dtype=torch.long, device=device)), lp)


def packed_logits(model, prompt_ids, completion_ids, device) -> tuple[torch.Tensor, list[int]]:
    """The logits that predict every completion token, with each prompt run once for all of its samples, and the
    tokens they predict: ``[N, V]`` and N tokens (N = Σ len(c_i)), row by row — row 0's tokens in order, then row
    1's, … (so two calls on the same completions after different prompts line up token for token).

    The completions of one prompt go into one row after it — [prompt, c_1, …, c_k] — with a mask under which c_j
    attends to the prompt and to its own earlier tokens only, and positions that restart after the prompt for every
    c_j: each completion token then sees exactly what it sees in its own row [prompt, c_j], so the logits (and
    their gradients) are those of the padded batch, while the prompt's tokens run once per group instead of once per
    sample and no row pads to the longest completion. With every completion empty the result is ``[0, V]``, still
    connected to the forward (so a loss built on it has gradients, all zero).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(tuple(p), []).append(i)
    packs: list[tuple[tuple[int, ...], list[int]]] = []  # (prompt, rows) of each packed row
    for prompt, rows in groups.items():
        current: list[int] = []
        size = len(prompt)
        for i in rows:
            if current and size + len(completion_ids[i]) > PACK_LIMIT:
                packs.append((prompt, current))
                current, size = [], len(prompt)
            current.append(i)
            size += len(completion_ids[i])
        packs.append((prompt, current))
    width = max(len(p) + sum(len(completion_ids[i]) for i in rows) for p, rows in packs)
    n_packs = len(packs)
    ids = torch.zeros((n_packs, width), dtype=torch.long)
    pos = torch.zeros((n_packs, width), dtype=torch.long)
    seg = torch.full((n_packs, width), -2, dtype=torch.long)  # -1 prompt, j completion j, -2 padding
    placed: dict[int, tuple[int, int]] = {}  # row i → (packed row, column of its first completion token)
    for r, (prompt, rows) in enumerate(packs):
        plen = len(prompt)
        ids[r, :plen] = torch.tensor(prompt)
        pos[r, :plen] = torch.arange(plen)
        seg[r, :plen] = -1
        at = plen
        for j, i in enumerate(rows):
            c = completion_ids[i]
            if not c:  # an empty completion has no token to score
                continue
            ids[r, at : at + len(c)] = torch.tensor(c)
            pos[r, at : at + len(c)] = torch.arange(plen, plen + len(c))
            seg[r, at : at + len(c)] = j
            placed[i] = (r, at)
            at += len(c)
    src_row, src_col, tgt = [], [], []
    for i, c in enumerate(completion_ids):
        if c:  # token k of c is predicted at the prompt's last position (k = 0) or at c's token k-1
            r, at = placed[i]
            src_row += [r] * len(c)
            src_col += [len(prompt_ids[i]) - 1] + list(range(at, at + len(c) - 1))
            tgt += c
    q = torch.arange(width)
    allowed = (q[:, None] >= q[None, :]) & (
        (seg[:, :, None] == seg[:, None, :]) | ((seg[:, None, :] == -1) & (seg[:, :, None] != -2))
    )
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
    # long indices stated: with every completion empty the lists are empty and torch.tensor([]) would be float
    rows = torch.tensor(src_row, dtype=torch.long, device=device)
    return logits[rows, torch.tensor(src_col, dtype=torch.long, device=device)], tgt
