"""retain.models.fused: the fused norm / rotary / SwiGLU / attention give HF's logits and gradients (float32
tolerance), generation is token-identical, and the class swap survives deepcopy, save/load, gradient checkpointing
and LoRA wrapping."""

from __future__ import annotations

import copy

import pytest
import torch

from retain.data import encode_pairs, encode_prompt, left_pad
from retain.models.fused import (
    FusedQwen2Attention, FusedQwen2MLP, FusedQwen2RMSNorm, RMSNormFunction, RotaryFunction, SwiGLUFunction, fuse,
    is_fused, unfuse,
)

RTOL = 1e-5

PAIRS = [("12 + 7", "19"), ("reverse: abcdef", "fedcba"), ("3*4", "12"), ("the capital of x is", "y z w")]
PROMPTS = ["12 + 7", "reverse: abcdef ghij", "3*4"]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding: max abs difference within RTOL of the tensor's largest magnitude."""
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max()
    assert err <= RTOL * scale, f"{what}: max diff {err:.3g} vs scale {scale:.3g}"


def _run(model, loss_fn=None, **inputs):
    """Logits (or the loss function's output) and every parameter's gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    if loss_fn is None:  # a fixed, position- and vocabulary-dependent weighting of every logit
        weights = torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)
        loss = (logits * weights).sum()
    else:
        loss = loss_fn(logits)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_equivalent(model, loss_fn=None, **inputs):
    assert not is_fused(model)
    logits0, grads0 = _run(model, loss_fn, **inputs)
    fuse(model)
    assert is_fused(model)
    logits1, grads1 = _run(model, loss_fn, **inputs)
    unfuse(model)
    assert not is_fused(model)
    _close(logits1, logits0, "logits")
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        _close(grads1[name], grads0[name], f"grad of {name}")
    return logits0, logits1


def test_fuse_swaps_classes_in_place(micro_model):
    layer = micro_model.model.layers[0]
    names = [n for n, _ in micro_model.named_parameters()]
    assert fuse(micro_model) is micro_model
    assert type(layer.input_layernorm) is FusedQwen2RMSNorm and type(micro_model.model.norm) is FusedQwen2RMSNorm
    assert type(layer.self_attn) is FusedQwen2Attention and type(layer.mlp) is FusedQwen2MLP
    assert [n for n, _ in micro_model.named_parameters()] == names
    assert "forward" not in vars(layer.mlp)  # a class swap, no bound methods on instances
    unfuse(micro_model)
    assert type(layer.self_attn).__name__ == "Qwen2Attention" and not is_fused(micro_model)


def test_unsupported_left_unchanged(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    linear = torch.nn.Linear(3, 3)
    assert fuse(linear) is linear and not is_fused(linear)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, hidden_act="gelu")
    model = fuse(Qwen2ForCausalLM(cfg))
    assert type(model.model.layers[0].mlp).__name__ == "Qwen2MLP"  # not SiLU: not a SwiGLU, left to HF


def test_right_padded_input_ids_only(micro_model, tokenizer):
    batch = encode_pairs(tokenizer, PAIRS)
    logits0, logits1 = _assert_equivalent(micro_model, input_ids=batch.input_ids)
    assert torch.equal(logits0, logits1)  # norm, rotary, SwiGLU forwards are bit-identical in float32


def test_left_padded_2d_mask(micro_model, tokenizer):
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    assert (mask == 0).any()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _assert_equivalent(micro_model, input_ids=ids, attention_mask=mask)
    logits0, logits1 = _assert_equivalent(micro_model, input_ids=ids, attention_mask=mask, position_ids=positions)
    assert torch.equal(logits0, logits1)  # SDPA with enable_gqa == repeat_kv + SDPA, bit for bit


def test_llama_is_fused_and_equivalent(tokenizer):
    """Llama (the real configs' Llama-3.2-1B) goes through the same fused classes: padded batch, 2-D mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retain.models.fused import FusedLlamaAttention, FusedLlamaMLP, FusedLlamaRMSNorm

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    _assert_equivalent(model, input_ids=encode_pairs(tokenizer, PAIRS).input_ids)
    _assert_equivalent(model, input_ids=ids, attention_mask=mask)
    layer = fuse(model).model.layers[0]
    assert (type(layer.self_attn), type(layer.mlp), type(layer.input_layernorm)) == (
        FusedLlamaAttention, FusedLlamaMLP, FusedLlamaRMSNorm)


def test_4d_float_mask_with_positions(micro_model, tokenizer):
    """The packed GRPO layout: several completions after one prompt, a 4-D additive mask, restarting positions."""
    from retain.methods.grpo import packed_logp

    prompt = encode_prompt(tokenizer, "12 + 7")
    other = encode_prompt(tokenizer, "3*4")
    completions = [tokenizer("19", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                   tokenizer("20 and more", add_special_tokens=False)["input_ids"],
                   tokenizer("1", add_special_tokens=False)["input_ids"],
                   tokenizer("12", add_special_tokens=False)["input_ids"]]
    prompts = [prompt, prompt, prompt, other]
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    results = []
    for switch in (unfuse, fuse):
        switch(micro_model)
        micro_model.zero_grad(set_to_none=True)
        lp = packed_logp(micro_model, prompts, completions, length, 1.0, "cpu")
        lp.sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in micro_model.named_parameters()}))
    unfuse(micro_model)
    (lp0, g0), (lp1, g1) = results
    _close(lp1, lp0, "packed log-probs")
    for name in g0:
        _close(g1[name], g0[name], f"grad of {name}")

    # the model called directly with such a mask: logits and gradients
    n = 10
    q = torch.arange(n)
    allowed = (q[:, None] >= q[None, :]) & ((q[None, :] < 4) | ((q[:, None] >= 7) == (q[None, :] >= 7)))
    mask = torch.zeros(2, 1, n, n).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    positions = torch.cat([torch.arange(7), torch.arange(4, 7)]).repeat(2, 1)
    ids = torch.randint(4, len(tokenizer), (2, n), generator=torch.Generator().manual_seed(0))
    _assert_equivalent(micro_model, input_ids=ids, attention_mask=mask, position_ids=positions)


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_same_tokens(micro_model, tokenizer, greedy):
    from retain.rollout import make_engine

    micro_model.eval()
    outs = []
    for switch in (unfuse, fuse):
        switch(micro_model)
        engine = make_engine("kv_cache", micro_model, tokenizer)
        outs.append(engine.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=12, greedy=greedy, seed=3))
    assert outs[0].completion_ids == outs[1].completion_ids
    assert is_fused(micro_model)
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    fused_out = micro_model.generate(**kwargs)  # HF generate, KV cache
    unfuse(micro_model)
    assert torch.equal(fused_out, micro_model.generate(**kwargs))


def test_deepcopy_fused_is_fused_and_independent(micro_model, tokenizer):
    fuse(micro_model)
    twin = copy.deepcopy(micro_model)
    assert is_fused(twin) and type(twin.model.layers[1].mlp) is FusedQwen2MLP
    ids = encode_pairs(tokenizer, PAIRS).input_ids
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, micro_model(input_ids=ids).logits)
        twin.model.norm.weight.add_(1.0)
    assert not torch.equal(twin.model.norm.weight, micro_model.model.norm.weight)
    unfuse(twin)
    assert not is_fused(twin) and is_fused(micro_model)


def test_save_pretrained_loads_plain(micro_model, tmp_path):
    from transformers import Qwen2ForCausalLM

    fuse(micro_model)
    micro_model.save_pretrained(tmp_path)
    plain = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert not is_fused(plain)
    expected = micro_model.state_dict()
    loaded = plain.state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name


def test_gradient_checkpointing_and_lora(micro_model, tokenizer):
    batch = encode_pairs(tokenizer, PAIRS)
    micro_model.train()
    reference = _run(micro_model, input_ids=batch.input_ids)
    twin = fuse(copy.deepcopy(micro_model))
    enable = getattr(twin, "activation_checkpointing_enable", None)  # gradient_checkpointing_enable's new name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    twin.train()
    assert twin.model.layers[0].gradient_checkpointing
    logits, grads = _run(twin, input_ids=batch.input_ids)
    _close(logits, reference[0], "logits")
    for name in reference[1]:
        _close(grads[name], reference[1][name], f"grad of {name} (checkpointed)")

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    torch.manual_seed(1)
    peft_model = get_peft_model(micro_model, lora)
    for module in peft_model.modules():  # LoRA's B starts at zero: make the adapters matter
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    _assert_equivalent(peft_model, input_ids=batch.input_ids)
    assert fuse(peft_model) is peft_model and type(micro_model.model.layers[0].self_attn) is FusedQwen2Attention


def test_torch_compile_traces_fused_functions(micro_model, tokenizer):
    """Dynamo traces the Functions (no graph break) and AOT autograd takes their explicit backwards."""
    import torch._dynamo

    batch = encode_pairs(tokenizer, PAIRS)
    micro_model.train()
    logits0, grads0 = _run(micro_model, input_ids=batch.input_ids)
    torch._dynamo.reset()
    compiled = torch.compile(fuse(micro_model), backend="aot_eager", fullgraph=True)
    try:
        logits1, grads1 = _run(compiled, input_ids=batch.input_ids)
    finally:
        torch._dynamo.reset()
    grads1 = {name.removeprefix("_orig_mod."): grad for name, grad in grads1.items()}
    _close(logits1, logits0, "logits")
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        _close(grads1[name], grads0[name], f"grad of {name}")


def test_gradcheck_functions():
    torch.manual_seed(0)
    opts = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(2, 3, 8, **opts), torch.randn(8, **opts)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6, torch.float64), (x, w))

    q = torch.randn(2, 5, 4, 8, **opts)  # [batch, seq, heads, dim], used transposed as the attention does
    k = torch.randn(2, 5, 2, 8, **opts)
    angle = torch.arange(5.0, dtype=torch.float64)[:, None] * torch.rand(4, dtype=torch.float64)
    emb = torch.cat((angle, angle), -1)[None, None]
    cos, sin = emb.cos(), emb.sin()
    assert torch.autograd.gradcheck(
        lambda q, k: RotaryFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin), (q, k)
    )

    gate, up = torch.randn(3, 7, **opts), torch.randn(3, 7, **opts)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))


def test_rms_norm_low_precision_matches_hf():
    """bf16 activations: HF's float32 upcast and rounding before the weight are kept."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    for weight_dtype in (torch.bfloat16, torch.float32):
        norm = Qwen2RMSNorm(16).to(weight_dtype)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
        out0 = norm(x)
        g = torch.randn_like(out0)
        dx0, dw0 = torch.autograd.grad(out0, (x, norm.weight), g)
        fuse(norm)
        out1 = norm(x)
        dx1, dw1 = torch.autograd.grad(out1, (x, norm.weight), g)
        assert out1.dtype == out0.dtype and torch.equal(out1, out0)
        torch.testing.assert_close(dx1, dx0, rtol=2e-2, atol=1e-2)
        torch.testing.assert_close(dw1, dw0, rtol=2e-2, atol=1e-2)


def test_embedded_model_sft_step():
    from retain import tasks
    from retain.data import collate, encode_answer
    from retain.models.loading import load_model

    model, tok = load_model("base")
    model.train()
    examples = tasks.get("countdown").examples("train", None, seed=0)[:16]
    batch = collate([(encode_prompt(tok, e.prompt), encode_answer(tok, e.answer)) for e in examples], tok.pad_token_id)

    def sft_loss(logits):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100
        )

    _assert_equivalent(model, sft_loss, input_ids=batch.input_ids)
