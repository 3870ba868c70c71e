"""Token-level losses of every method retain trains with: pure tensor functions, no model, no I/O.

Conventions shared by every function here (SPEC §2):

* **Alignment.** ``logits[..., t, :]`` is the distribution that predicts ``targets[..., t]``: callers shift
  (``logits[:, :-1]`` against ``input_ids[:, 1:]``) before calling. ``mask[..., t]`` is true on tokens that count
  (completion / target tokens) and false on prompt and padding. Masked-out positions may hold anything, even inf or
  NaN: every reduction selects with ``torch.where`` rather than multiplying by the mask, so they never leak.
* **Precision.** Every result is float32 (or float64 if the inputs are float64), whatever the input dtype
  (bf16 logits are upcast), so numbers agree with TRL 1.16 — which casts rewards to float32 and runs its log-softmax in
  float32 — to ~1e-6.
* **Logs are natural logs; entropies and KLs are in nats.**
* **Temperature.** Log-probabilities come from ``logits / temperature`` (the sampling temperature), for the policy and
  the reference alike (SPEC §2.1).
* **No gradient-accumulation scaling.** TRL divides the ``grpo`` / ``bnpo`` / ``dr_grpo`` losses by the number of
  gradient-accumulation steps inside its loss; these functions never do — the trainer that accumulates does.

Where TRL 1.16 differs, the docstring says so: KL is clamped here (TRL's is not and can overflow, trl#3015), the
log importance ratio is clamped to ±20 (verl), and the KL term is **not** multiplied by the importance ratio (TRL's
default ``use_bias_correction_kl=True`` does; the value is the same on-policy, the gradient is not). Inside those
clamp ranges, tests/test_losses.py checks every function against TRL 1.16's own code to 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = [
    "aggregate",
    "confident_conflict_mask",
    "dft_weights",
    "distill_kl",
    "linear_weight",
    "proximal_sft_loss",
    "eaft_weights",
    "grpo_token_loss",
    "group_advantages",
    "kl_estimate",
    "sft_loss",
    "token_entropy",
    "token_logprobs",
    "topk_entropy",
]

ScaleMode = Literal["group", "batch", "none"]
KLKind = Literal["k1", "k2", "k3"]
AggMode = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

#: Bounds of the KL clamp (verl ``low_var_kl``, OpenRLHF): the log-ratio x to ±KL_X_CLAMP, k3 to [0, KL_K3_MAX].
KL_X_CLAMP = 20.0
KL_K3_MAX = 10.0
#: Bound on |log ρ| in the GRPO loss (verl): ρ = exp(clamp(log π − log π_old, ±20)).
LOG_RATIO_CLAMP = 20.0


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor of at least float32 precision (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _as_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask broadcastable to ``like`` (all true when ``mask`` is None)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return mask.to(like.device).bool()


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over masked-in positions; masked-out positions contribute an exact 0 (even if inf/NaN there)."""
    selected = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


# ---------------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor | Sequence[float | None],
    group_size: int,
    scale: ScaleMode = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages of GRPO, one per completion, float32.

    Args:
        rewards: flat ``[B*G]`` rewards, the ``G = group_size`` completions of each prompt contiguous
            (``rewards[i*G:(i+1)*G]`` is prompt i's group). ``None`` (a reward function that could not score) or NaN
            marks an unscorable completion.
        group_size: G, completions per prompt.
        scale: ``"group"`` (default): A = (r − mean_group) / (std_group + eps).
            ``"batch"`` (TRL 1.16 semantics): A = (r − mean_group) / (std_batch + eps) — the *group* mean is still
            subtracted, only the std is taken over every scorable reward of the batch.
            ``"none"`` (Dr. GRPO): A = r − mean_group, no division.
        eps: added to the std; TRL 1.16 uses 1e-4, verl 1e-6.

    Conventions:
        * std uses Bessel's correction (divides by n − 1), as TRL's ``nanstd``.
        * NaN rewards are left out of every mean and std and get advantage exactly 0; so are ±inf rewards (a broken
          reward function: TRL's would turn the whole group's advantages into NaN).
        * A group whose scorable rewards are all equal gets advantage exactly 0 (in every mode) — TRL can leave a
          float rounding residue here when the group mean is inexact; retain forces the 0.
        * A group (or, for ``"batch"``, a batch) with a single scorable reward has an undefined std; its advantage is 0
          (TRL's NaN std gives NaN, which it then zeroes). With ``group_size == 1`` every advantage is 0.
        * Computed in float32 (rewards are cast first, as TRL does).

    Worked example: rewards [1, 0, 0, 1], G = 4: mean 0.5, std √(1/3) = 0.577350 → A = ±0.865875 (eps 1e-4),
    ±0.866024 (eps 1e-6).
    """
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach().to(torch.float32).reshape(-1)
    else:
        r = torch.tensor([math.nan if x is None else float(x) for x in rewards], dtype=torch.float32)
    r = torch.where(torch.isinf(r), torch.full_like(r, math.nan), r)  # unscorable, like NaN
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if r.numel() % group_size != 0:
        raise ValueError(f"{r.numel()} rewards are not a whole number of groups of {group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")

    grouped = r.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, grouped - mean, torch.zeros_like(grouped))

    # A constant group gets an exact 0, whatever rounding the mean picked up.
    big = torch.full_like(grouped, math.inf)
    g_max = torch.where(valid, grouped, -big).amax(dim=1, keepdim=True)
    g_min = torch.where(valid, grouped, big).amin(dim=1, keepdim=True)
    centred = torch.where(g_max == g_min, torch.zeros_like(centred), centred)

    if scale == "none":
        adv = centred
    else:
        if scale == "group":
            var = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
            std = var.sqrt()
            undefined = count <= 1
        else:  # batch: Bessel-corrected std over every scorable reward in the batch
            flat_valid = valid.reshape(-1)
            n = flat_valid.sum()
            flat = torch.where(flat_valid, r, torch.zeros_like(r))
            batch_mean = flat.sum() / n.clamp(min=1)
            dev = torch.where(flat_valid, r - batch_mean, torch.zeros_like(r))
            std = ((dev**2).sum() / (n - 1).clamp(min=1)).sqrt()
            undefined = (n <= 1).expand_as(count)
        adv = centred / (std + eps)
        adv = torch.where(undefined, torch.zeros_like(adv), adv)

    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return adv.reshape(-1)


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: KLKind = "k3",
    clamp: bool = True,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled token's log-probabilities (Schulman's k1/k2/k3).

    With x = ref_logp − logp (= log π_ref(y_t) − log π(y_t)):
    ``k1`` = −x (unbiased, can be negative); ``k2`` = ½x²; ``k3`` = exp(x) − x − 1 (unbiased, ≥ 0; TRL's and
    GRPO's estimator). k3 is evaluated as expm1(x) − x, which is the same number without the cancellation error
    of exp(x) − 1 for small x.

    With ``clamp`` (default; verl ``low_var_kl``, OpenRLHF): x is clamped to [−20, 20] before any estimator and k3 to
    [0, 10], so the result is finite for any finite inputs and so is its gradient (zero where a clamp binds).
    TRL 1.16 does not clamp, and k3 overflows to inf for large gaps (trl#3015); within the clamp range both agree.

    Worked values (k3): (logp, ref_logp) = (−1.0, −1.5) → 0.106531; (−2.0, −1.0) → 0.718282; (−0.5, −3.0) → 1.582085.

    Returns a float32 tensor of the broadcast shape of the inputs.
    """
    x = _f32(ref_logp) - _f32(logp)
    if clamp:
        x = x.clamp(-KL_X_CLAMP, KL_X_CLAMP)
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        k3 = torch.expm1(x) - x
        return k3.clamp(0.0, KL_K3_MAX) if clamp else k3
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_kind: KLKind = "k3",
    *,
    mask: torch.Tensor | None = None,
    kl_clamp: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped GRPO/PPO loss plus the β-weighted KL penalty (SPEC §2.1).

        loss_t = −min(ρ_t·A, clip(ρ_t, 1 − eps_low, 1 + eps_high)·A) + β·KL_t,   ρ_t = exp(logp_t − old_logp_t)

    Args:
        logp: ``[B, T]`` log π(y_t) of the policy being trained (with grad), from logits / temperature.
        old_logp: ``[B, T]`` log π_old(y_t) of the policy that sampled (no grad). ``None`` means on-policy: it is
            ``logp.detach()``, so ρ = 1 in value and only the gradient −A·∇log π remains.
        advantages: ``[B]`` one per sequence, broadcast over the tokens (``[B, T]`` per-token advantages also accepted).
        ref_logp: ``[B, T]`` log π_ref(y_t); required when ``beta != 0``, used for the ``kl_mean`` stat when given.
        beta: KL coefficient.
        eps_low, eps_high: clip range [1 − eps_low, 1 + eps_high] (DAPO's clip-higher when eps_high > eps_low).
        kl_kind: estimator passed to :func:`kl_estimate`, ``"k3"`` by default (as TRL).
        mask: ``[B, T]`` tokens that count; only used for the stats (the loss is returned per token, reduce it with
            :func:`aggregate`).
        kl_clamp: passed to :func:`kl_estimate` (default clamped, unlike TRL).

    Returns:
        ``(per_token_loss [B, T] float32, stats)`` with stats (python floats, masked token means):
        ``clip_fraction`` — tokens whose clip is active, i.e. (ρ < 1 − eps_low and A < 0) or (ρ > 1 + eps_high and
        A > 0), TRL's ``clip_ratio/region_mean``; ``clip_low_fraction``, ``clip_high_fraction`` its two halves;
        ``kl_mean`` — mean KL_t (0.0 when no ``ref_logp``); ``ratio_mean`` — mean ρ.

    Conventions vs TRL 1.16: the KL term is not multiplied by ρ (TRL's ``use_bias_correction_kl=True`` default does;
    equal values on-policy; compose ``beta * ratio * kl_estimate(...)`` yourself to reproduce it); the KL is clamped
    (see :func:`kl_estimate`); log ρ is clamped to ±20 before the exp (verl; TRL does not, and an overflowing ρ gives
    it a NaN gradient) — identical to TRL whenever |log π − log π_old| ≤ 20; no dual-clip ``delta``.

    Worked values (eps 0.2, β 0.04): (logp, old, ref, A) = (−1.0, −1.3, −1.2, +1) → −1.2 (policy, clipped) + 0.04 ×
    0.018731 = −1.199251; same with A = −1 → 1.350608; (−2.0, −1.5, −2.1, −1) → 0.800193.
    """
    logp32 = _f32(logp)
    old32 = logp32.detach() if old_logp is None else _f32(old_logp).to(logp32.device)
    adv = _f32(advantages).to(logp32.device)
    if adv.dim() == logp32.dim() - 1:
        adv = adv.unsqueeze(-1)

    # log ρ clamped to ±20 before exp (verl): ρ never overflows, so value and gradient stay finite; the clamp only
    # binds when |log π − log π_old| > 20, far outside any clip range.
    ratio = torch.exp((logp32 - old32).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)

    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp32, _f32(ref_logp).to(logp32.device), kind=kl_kind, clamp=kl_clamp)
    if beta != 0.0:
        if kl is None:
            raise ValueError("grpo_token_loss: beta != 0 needs ref_logp")
        per_token = per_token + beta * kl

    with torch.no_grad():
        m = _as_mask(mask, logp32).expand_as(logp32)
        n = m.sum().clamp(min=1)
        adv_b = adv.expand_as(logp32)
        low = (ratio < 1.0 - eps_low) & (adv_b < 0)
        high = (ratio > 1.0 + eps_high) & (adv_b > 0)

        def mean(x: torch.Tensor) -> float:
            return float(_masked_sum(x.float(), m) / n)

        stats = {
            "clip_fraction": mean(low | high),
            "clip_low_fraction": mean(low),
            "clip_high_fraction": mean(high),
            "kl_mean": mean(kl) if kl is not None else 0.0,
            "ratio_mean": mean(ratio),
        }
    return per_token, stats


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode = "grpo",
    max_completion_length: int | None = None,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar over the tokens of ``mask`` (TRL's ``loss_type``s).

    * ``"grpo"``: mean over the B sequences of each sequence's token mean, Σ_t m·x / max(Σ_t m, 1). A sequence with
      no tokens contributes 0 and still counts in the B (as TRL).
    * ``"bnpo"``: token mean over the batch, Σ m·x / max(Σ m, 1).
    * ``"dr_grpo"``: Σ m·x / (B × max_completion_length) — the *configured* maximum length, not the padded T;
      ``max_completion_length`` is required.
    * ``"dapo"``: Σ m·x / max(num_items, 1), ``num_items`` = the number of loss tokens in the whole generation batch
      (all micro-batches / ranks; TRL's ``num_items_in_batch``), default ``mask.sum()`` of this batch.

    No division by gradient-accumulation steps (TRL divides grpo/bnpo/dr_grpo by them inside its loss; for dapo its
    ``num_items_in_batch`` rescaling amounts to the same): the caller that accumulates does. Never NaN for all-masked
    inputs (gives 0); masked-out positions may hold inf/NaN.
    """
    x = _f32(per_token)
    m = _as_mask(mask, x).expand_as(x)
    if mode == "grpo":
        seq = _masked_sum(x, m, dim=-1) / m.sum(-1).clamp(min=1)
        return seq.mean()
    if mode == "bnpo":
        return _masked_sum(x, m) / m.sum().clamp(min=1)
    if mode == "dr_grpo":
        if max_completion_length is None or max_completion_length <= 0:
            raise ValueError("aggregate(mode='dr_grpo') needs max_completion_length (the configured length)")
        return _masked_sum(x, m) / (x.size(0) * max_completion_length)
    if mode == "dapo":
        n = m.sum() if num_items is None else torch.as_tensor(num_items, device=x.device)
        return _masked_sum(x, m) / n.to(x.dtype).clamp(min=1)
    raise ValueError(f"mode must be 'grpo', 'bnpo', 'dr_grpo' or 'dapo', got {mode!r}")


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities and SFT
# ---------------------------------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``targets``: ``[..., V]``, ``[...]`` → ``[...]`` float32.

    Computed as z[target] − logsumexp(z), never materialising a log-softmax copy of the logits; low-precision logits
    are upcast one row of the leading dimension at a time, so the peak extra memory is one float32 row, not the whole
    tensor. Negative targets (an ignore index such as −100) are read at index 0: mask them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    idx = targets.to(logits.device).long().clamp(min=0).unsqueeze(-1)

    def one(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        z = _f32(z)
        if temperature != 1.0:
            z = z / temperature
        return z.gather(-1, i).squeeze(-1) - torch.logsumexp(z, dim=-1)

    if logits.dtype in (torch.float32, torch.float64) or logits.dim() < 3:
        return one(logits, idx)
    return torch.stack([one(z, i) for z, i in zip(logits, idx, strict=True)])


def sft_loss(
    logp_or_logits: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-weighted negative log-likelihood, TRL SFTTrainer's reduction: Σ_t m_t·w_t·(−log π(y_t)) / N.

    Args:
        logp_or_logits: ``[B, T]`` target log-probabilities (from :func:`token_logprobs`), or ``[B, T, V]`` logits
            when ``targets`` is given.
        mask: ``[B, T]`` target tokens.
        weights: optional ``[B, T]`` per-token weights w_t (EAFT's :func:`eaft_weights`, DFT's p.detach(), …); used as
            given — detach them if they must carry no gradient.
        targets: ``[B, T]`` target ids, when the first argument is logits.
        temperature: logits are divided by it (only with ``targets``).
        num_items: N, the number of target tokens across the whole accumulated batch (TRL's ``num_items_in_batch``);
            default ``mask.sum()``. Clamped to ≥ 1, so a batch with no targets gives 0.

    N is the **token count, not the sum of the weights** — as TRL (its ``dft`` loss included) and the EAFT authors:
    weighting lowers the loss rather than renormalising it.
    """
    if targets is not None:
        logp = token_logprobs(logp_or_logits, targets, temperature)
    else:
        logp = _f32(logp_or_logits)
    m = _as_mask(mask, logp).expand_as(logp)
    nll = -logp
    if weights is not None:
        nll = nll * _f32(weights).to(logp.device)
    n = m.sum() if num_items is None else torch.as_tensor(num_items, device=logp.device)
    return _masked_sum(nll, m) / n.to(logp.dtype).clamp(min=1)


def dft_weights(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """DFT's token weights (arXiv 2508.05629): w_t = π(y_t), detached, ``[B, T, V]``, ``[B, T]`` → ``[B, T]``.

    Use with :func:`sft_loss` (``weights=``): Σ_t p_t·(−log p_t) / N with N the **token count**, as TRL 1.16's
    ``SFTConfig(loss_type="dft")`` (not the weight sum). Worked value: p = 0.5 → weight 0.5, token loss
    0.5·ln 2 = 0.346574."""
    with torch.no_grad():
        return token_logprobs(logits.detach(), targets, temperature).exp()


def proximal_sft_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 0.2,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Proximal SFT (arXiv 2508.17784): Σ_t −min(ρ_t, clip(ρ_t, 1 − eps, 1 + eps)) / N over target tokens,
    ρ_t = π(y_t) / π_old(y_t) — PPO's clipped objective (:func:`grpo_token_loss`) with the constant advantage 1,
    reduced like :func:`sft_loss` (N = the token count, default ``mask.sum()``).

    With A = 1 only the upper clip binds: a token whose probability already rose by more than 1 + eps since π_old
    gets no gradient. At ρ = 1 (π_old = π) the gradient is SFT's. Worked values (eps 0.2): (log π, log π_old) =
    (−1.0, −1.3) → ρ = e^0.3 = 1.349859, clipped: −1.2 (no gradient); (−1.5, −1.3) → −e^−0.2 = −0.818731."""
    per_token, _ = grpo_token_loss(logp, old_logp, torch.ones(logp.shape[:-1], device=logp.device),
                                   eps_low=eps, eps_high=eps, mask=mask)
    m = _as_mask(mask, per_token).expand_as(per_token)
    n = m.sum() if num_items is None else torch.as_tensor(num_items, device=per_token.device)
    return _masked_sum(per_token, m) / n.to(per_token.dtype).clamp(min=1)


def linear_weight(step: int, steps: int, start: float, end: float | None = None) -> float:
    """A weight going linearly from ``start`` at step 0 to ``end`` at step ``steps − 1`` (constant ``start`` when
    ``end`` is None; CHORD's scheduled μ). Worked: start 0.9, end 0.1, 5 steps → 0.9, 0.7, 0.5, 0.3, 0.1."""
    if end is None or steps <= 1:
        return float(start)
    return float(start + (end - start) * min(1.0, max(0, step) / (steps - 1)))


# ---------------------------------------------------------------------------------------------------------------
# Entropy, EAFT, confident conflicts
# ---------------------------------------------------------------------------------------------------------------


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature) over the last axis: ``[..., V]`` → ``[...]`` float32.

    H = Σ_v p_v·(logsumexp(z) − z_v): every term is ≥ 0, so H ≥ 0 without clamping; ``-inf`` logits (p = 0) are safe
    in value and gradient. Differentiable (detach the result for a weight).
    """
    z = _f32(logits)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    finite = torch.isfinite(z)
    z_safe = torch.where(finite, z, torch.zeros((), dtype=z.dtype, device=z.device))
    p = torch.where(finite, torch.exp(z_safe - lse), torch.zeros((), dtype=z.dtype, device=z.device))
    return (p * (lse - z_safe)).sum(-1)


def topk_entropy(logits: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Entropy (nats) of the softmax over the ``k`` largest logits only, renormalised (EAFT's H_t, SPEC §2.2).

    K = min(k, V). Uniform top-K logits give ln K; one dominant logit gives ~0. Differentiable through the selected
    logits. ``[..., V]`` → ``[...]`` float32.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = torch.topk(_f32(logits), k=min(k, logits.size(-1)), dim=-1).values
    return token_entropy(top)


def eaft_weights(logits: torch.Tensor, k: int = 20, alpha: float = 1.0) -> torch.Tensor:
    """EAFT token weights w_t = (H_topK / ln K)^alpha, detached (no gradient), in [0, 1]: ``[..., V]`` → ``[...]``.

    **retain:** the top-K entropy is divided by ln K (K = min(k, V)), its maximum, so a uniform top-K gives weight 1
    and a one-hot distribution 0. The EAFT authors' code divides by the constant 3.0 (≈ ln 20 = 2.9957): for K = 20
    its weights are (ln 20 / 3)^α = 0.9986^α times ours, and for any other K it does not normalise to [0, 1].
    The ratio is clamped to [0, 1] to absorb float rounding. Use with :func:`sft_loss` (``weights=``), which divides
    by the token count, not the weight sum.
    """
    kk = min(k, logits.size(-1))
    if kk < 2:
        raise ValueError(f"eaft_weights needs K = min(k, V) >= 2 (ln K is the normaliser), got {kk}")
    with torch.no_grad():
        h = topk_entropy(logits.detach(), k=kk) / math.log(kk)
        return h.clamp(0.0, 1.0).pow(alpha)


# A confident conflict (SPEC §2.3): the model is sure (entropy below this, in nats) and the target is unlikely
# (probability below this). The one home of the defaults: the loss, the method config and the token analysis.
CONFLICT_ENTROPY_MAX = 0.5
CONFLICT_PROB_MAX = 0.1


def confident_conflict_mask(
    logits: torch.Tensor,
    targets: torch.Tensor,
    entropy_max: float = CONFLICT_ENTROPY_MAX,
    prob_max: float = CONFLICT_PROB_MAX,
) -> torch.Tensor:
    """Boolean ``[...]``: True where the target token is a confident conflict (SPEC §2.3).

    A confident conflict: full-vocabulary predictive entropy H_t < ``entropy_max`` nats **and** p(target) <
    ``prob_max`` (both strict). **retain:** absolute thresholds, defaults 0.5 nats and 0.1 (the paper gives none;
    quantile thresholds fail on small models). Temperature 1. No gradient. Combine with the target mask yourself
    (``mask & ~confident_conflict_mask(...)`` for conflict-masked SFT).
    """
    with torch.no_grad():
        h = token_entropy(logits.detach())
        p = token_logprobs(logits.detach(), targets).exp()
        return (h < entropy_max) & (p < prob_max)


def distill_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    direction: Literal["forward", "reverse"] = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact per-token KL over the whole vocabulary between teacher and student, ``[B, T]`` float32.

    * ``"forward"``: KL(teacher ‖ student) = Σ_v p_T (log p_T − log p_S) — LwF distillation, and Razor's forward KL
      E KL(π0 ‖ π) with the previous / base model as teacher.
    * ``"reverse"``: KL(student ‖ teacher) = Σ_v p_S (log p_S − log p_T).

    Both distributions are softmax(logits / temperature); no T² rescaling (multiply yourself if wanted). The teacher is
    detached (gradient flows to the student only). Terms with zero mass in the first distribution contribute 0;
    positions outside ``mask`` are 0. Reduce with :func:`aggregate`.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = torch.log_softmax(_f32(student_logits) / temperature, dim=-1)
    t = torch.log_softmax(_f32(teacher_logits).detach().to(s.device) / temperature, dim=-1)
    logp, logq = (t, s) if direction == "forward" else (s, t)
    p = logp.exp()
    alive = p > 0
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    diff = torch.where(alive, logp - torch.where(alive, logq, zero), zero)
    kl = (p * diff).sum(-1)
    m = _as_mask(mask, kl).expand_as(kl)
    return torch.where(m, kl, zero)
