"""Fused elementwise pieces for Qwen2 / Llama decoder layers: the same math as Hugging Face's eager code with fewer
passes over memory and fewer autograd nodes.

``fuse(model)`` switches a loaded ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` (also inside a peft wrapper, or any
module tree holding their layers) to the fused pieces in place, by swapping the classes of its norm, attention and
MLP modules for subclasses that override ``forward`` only. Parameters, buffers, names, ``state_dict``,
``save_pretrained``, ``generate`` (KV cache), gradient checkpointing, ``copy.deepcopy`` (retain's frozen reference
copies) and ``torch.compile`` are untouched by construction. ``unfuse`` swaps the classes back; ``is_fused`` tells.
Modules of any other class (another architecture, an MLP whose activation is not SiLU) are left as they are.

What is fused (each a ``torch.autograd.Function`` with an explicit backward, used only when a gradient is needed; in
no-grad / inference mode the same forward math runs without the autograd wrapper):

* RMSNorm: HF runs pow, mean, add, rsqrt, mul, mul in float32 and records six autograd nodes whose backward is about
  ten more kernels. The Function computes the forward in the same order (bit-identical output) and saves the
  normalised activations and 1/rms; the backward is ``dw = Σ g·n``, ``dx = rstd·(g·w − n·mean(g·w·n))``.
* Rotary embedding of q and k: HF's ``rotate_half`` slices, negates and concatenates, then two muls and an add per
  tensor, four autograd nodes per tensor. Here ``rotate_half(x)·sin == roll(x, D/2)·[−sin₁, sin₂]``, so each tensor
  is ``x·cos + roll(x)·sin_signed`` (bit-identical to HF), and the backward is the rotation by the negative angle,
  ``g·cos + roll(g)·[sin₂, −sin₁]``, reusing the saved cos and sin; one node for q and k together.
* SwiGLU ``silu(gate)·up``: one node instead of two; the backward reuses the saved ``silu(gate)`` and calls the same
  ``silu_backward`` kernel.
* Attention: on CPU, with grouped-query attention, an attention mask and more than one query, HF's SDPA path copies
  keys and values with ``repeat_kv`` (it takes SDPA's ``enable_gqa`` only without a mask, a rule made for CUDA kernels).
  The fused attention calls SDPA with ``enable_gqa=True`` and the same mask instead (identical result, no copies).
  Everything else — no mask (causal kernel), decoding (one query), other devices, other attention implementations
  (eager, flex, flash) or a user-registered ``sdpa`` function — goes to HF's own attention function, so HF's masking
  (``attention_mask`` None / 2-D padding / 4-D additive float, ``is_causal``, ``position_ids``, the KV ``cache``)
  is used unchanged: the fused attention only replaces the rotary step and, in that one case, ``repeat_kv``.

Left to HF: the decoder layer (residual adds, gradient checkpointing), the rotary table, mask construction, the
projections and every matmul. Fusing the q/k/v projections (or gate/up) into one matmul by concatenating the
weights on every call did not pay at this size (qkv within noise, gate/up ~4 % slower on the piece) and would not
compose with LoRA-wrapped projections, so the projections stay separate.

Measured on 2 CPU cores that other jobs kept saturated (interleaved A/B, medians of the thread's CPU time, 1 thread;
``bench/fused_ab.py``). Per piece, forward+backward at the embedded model's shapes (32 x 30 tokens): RMSNorm ~1.7x,
rotary ~1.4x, SwiGLU ~1.1-1.2x, masked GQA attention 1.3x (1.1x at 8 x 200 packed tokens). Whole training step
(forward + cross-entropy + backward): embedded ``base`` model, 32 countdown SFT sequences, 0.99-1.01x (within the
noise: matmuls and SDPA are ~80-85 % of the step's op time, the pieces fused here ~5 %); 2 x 30 tokens 1.06x (fewer
Python/autograd calls); GRPO's packed log-probs (64 completions) 1.02x; the ``small`` preset at 128 x 64 tokens,
whose elementwise passes run over tensors far larger than the caches, 1.07x. At 2 threads on the saturated machine
both workloads gained ~1.16x, mostly from fewer OpenMP parallel regions waiting on a descheduled thread.
Generation (KV-cache decoding) is unchanged within noise. On the idle machine, 2 threads (what ``make bench`` uses):
the embedded model's step 1.12x, the small preset's 1.06x (medians of 7 interleaved rounds). The remaining elementwise time would need generated
kernels (``torch.compile``), which also works on a fused model.

Equivalence: in float32 the forward outputs of norm and rotary are bit-identical to HF's, attention with
``enable_gqa`` is bit-identical to ``repeat_kv`` + SDPA, and gradients agree to float32 rounding (reductions sum in
a different order); ``tests/test_fused.py`` checks logits and every parameter gradient against the unfused model,
generation tokens, deepcopy, save/load, and ``gradcheck`` of each Function in float64. For bf16 / fp16 inputs the
norm keeps HF's float32 upcast and the rounding of the normalised value to the input dtype before the weight.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama as _llama
from transformers.models.qwen2 import modeling_qwen2 as _qwen2
from transformers.utils.deprecation import deprecate_kwarg

__all__ = [
    "fuse", "unfuse", "is_fused", "RMSNormFunction", "RotaryFunction", "SwiGLUFunction",
    "rms_norm", "apply_rotary", "swiglu",
]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------- RMSNorm


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x · rsqrt(mean(x²) + eps)).to(x.dtype)`` with the statistics in ``compute_dtype`` (HF: float32)."""

    @staticmethod
    def forward(ctx, x, weight, eps, compute_dtype):
        input_dtype = x.dtype
        xc = x.to(compute_dtype)
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True).add_(eps))
        normed = xc * rstd
        out = weight * normed.to(input_dtype)
        exact = input_dtype == compute_dtype
        # normed when it is the rounded value itself (the float32 model); else x, recomputing normed in the backward
        ctx.save_for_backward(normed if exact else x, rstd, weight)
        ctx.exact, ctx.input_dtype, ctx.compute_dtype = exact, input_dtype, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        saved, rstd, weight = ctx.saved_tensors
        normed = saved if ctx.exact else saved.to(ctx.compute_dtype) * rstd
        dx = dw = None
        if ctx.needs_input_grad[1]:
            rounded = normed if ctx.exact else normed.to(ctx.input_dtype)
            prod = grad * rounded
            dw = prod.reshape(-1, prod.shape[-1]).sum(0).to(weight.dtype).view(weight.shape)
        if ctx.needs_input_grad[0]:
            gn = grad * weight  # the gradient of normed.to(input_dtype), in the product's dtype
            if not ctx.exact:
                gn = gn.to(ctx.input_dtype).to(ctx.compute_dtype)
            elif gn.dtype != ctx.compute_dtype:
                gn = gn.to(ctx.compute_dtype)
            dot = (gn * normed).mean(-1, keepdim=True)
            dx = gn.addcmul_(normed, dot, value=-1).mul_(rstd).to(ctx.input_dtype)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, compute_dtype=torch.float32) -> torch.Tensor:
    if _needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps, compute_dtype)
    input_dtype = x.dtype
    xc = x.to(compute_dtype)
    xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xc.to(input_dtype)


# ----------------------------------------------------------------------------------------------------------- rotary


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x·cos + roll(x, D/2)·sin_signed``: with sin_signed = [−sin₁, sin₂] this is HF's ``x·cos + rotate_half(x)·sin``
    term for term (q₁c₁ + q₂·(−s₁) == q₁c₁ + (−q₂)·s₁ exactly), with [sin₂, −sin₁] its transpose."""
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin_signed))


def _signed_sin(sin: torch.Tensor, backward: bool) -> torch.Tensor:
    half = sin.shape[-1] // 2
    first, second = sin[..., :half], sin[..., half:]
    return torch.cat((second, -first), -1) if backward else torch.cat((-first, second), -1)


class RotaryFunction(torch.autograd.Function):
    """Rotary embedding of q and k together; ``cos``/``sin`` already broadcastable to them (no gradient to them)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        sin_fwd = _signed_sin(sin, backward=False)
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin_fwd), _rotate(k, cos, sin_fwd)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        sin_bwd = _signed_sin(sin, backward=True)
        dq = _rotate(grad_q, cos, sin_bwd) if ctx.needs_input_grad[0] else None
        dk = _rotate(grad_k, cos, sin_bwd) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def apply_rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for HF's ``apply_rotary_pos_emb`` (which it calls for anything unusual: an odd or partial rotary
    dimension, or cos/sin that need a gradient)."""
    dim = q.shape[-1]
    if dim % 2 or cos.shape[-1] != dim or k.shape[-1] != dim or _needs_grad(cos, sin):
        return _qwen2.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    if _needs_grad(q, k):
        return RotaryFunction.apply(q, k, cos, sin)
    sin_fwd = _signed_sin(sin, backward=False)
    return _rotate(q, cos, sin_fwd), _rotate(k, cos, sin_fwd)


# ----------------------------------------------------------------------------------------------------------- SwiGLU


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up``."""

    @staticmethod
    def forward(ctx, gate, up):
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        gate, up, act = ctx.saved_tensors
        dgate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        dup = grad * act if ctx.needs_input_grad[1] else None
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _needs_grad(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------- modules


class _FusedRMSNorm:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class _FusedMLP:
    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF's ``sdpa_attention_forward``, except that on CPU a masked multi-query call with grouped-query attention uses
    SDPA's ``enable_gqa`` instead of materialising ``repeat_kv`` copies. In that case HF's own function sets
    ``is_causal = False`` (a mask is given) and passes the mask unchanged, as here."""
    if (
        attention_mask is None
        or getattr(module, "num_key_value_groups", 1) <= 1
        or query.shape[2] == 1
        or query.device.type != "cpu"
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions", False)
        or torch.jit.is_tracing()
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


class _FusedAttention:
    _eager: Callable

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, type(self)._eager
        )
        if attention_interface is sdpa_attention_forward:  # the stock one (not a user-registered replacement)
            attention_interface = _sdpa_gqa
        if hasattr(self, "sliding_window"):  # Qwen2 passes it (SDPA ignores it; the mask carries the window)
            kwargs["sliding_window"] = self.sliding_window

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class FusedQwen2RMSNorm(_FusedRMSNorm, _qwen2.Qwen2RMSNorm):
    pass


class FusedQwen2MLP(_FusedMLP, _qwen2.Qwen2MLP):
    pass


class FusedQwen2Attention(_FusedAttention, _qwen2.Qwen2Attention):
    _eager = staticmethod(_qwen2.eager_attention_forward)


class FusedLlamaRMSNorm(_FusedRMSNorm, _llama.LlamaRMSNorm):
    pass


class FusedLlamaMLP(_FusedMLP, _llama.LlamaMLP):
    pass


class FusedLlamaAttention(_FusedAttention, _llama.LlamaAttention):
    _eager = staticmethod(_llama.eager_attention_forward)


_FUSED: dict[type, type] = {
    _qwen2.Qwen2RMSNorm: FusedQwen2RMSNorm,
    _qwen2.Qwen2MLP: FusedQwen2MLP,
    _qwen2.Qwen2Attention: FusedQwen2Attention,
    _llama.LlamaRMSNorm: FusedLlamaRMSNorm,
    _llama.LlamaMLP: FusedLlamaMLP,
    _llama.LlamaAttention: FusedLlamaAttention,
}
_ORIGINAL: dict[type, type] = {fused: original for original, fused in _FUSED.items()}


def _supported(module: nn.Module) -> bool:
    if isinstance(module, (_qwen2.Qwen2MLP, _llama.LlamaMLP)):
        return type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU)
    if isinstance(module, (_qwen2.Qwen2RMSNorm, _llama.LlamaRMSNorm)):
        return isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon")
    return True


def fuse(model: nn.Module) -> nn.Module:
    """Switch the Qwen2 / Llama norm, attention and MLP modules inside ``model`` to the fused ones, in place (by
    class swap); returns ``model``. Fuse before ``torch.compile``; anything not recognised is left unchanged."""
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None and _supported(module):
            module.__class__ = fused
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Restore the original Hugging Face classes, in place; returns ``model``."""
    for module in model.modules():
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
    return model


def is_fused(model: nn.Module) -> bool:
    return any(type(module) in _ORIGINAL for module in model.modules())
