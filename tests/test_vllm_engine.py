"""The vLLM rollout engine's logic on CPU, against a stand-in ``vllm`` module (``vllm_stand_in``: no GPU and no
vllm here). What a real vLLM does with the engine's calls is not tested here.
"""

from __future__ import annotations

import sys

import pytest
import torch
from vllm_stand_in import LLM, stand_in_vllm

from retain.data import encode_prompt
from retain.errors import RetainError
from retain.rollout import make_engine
from retain.rollout import vllm as vllm_engine


@pytest.fixture()
def fake_vllm(monkeypatch, tokenizer):
    with stand_in_vllm(monkeypatch, tokenizer.eos_token_id) as module:
        yield module


@pytest.fixture()
def base():
    from retain.models.loading import load_model

    return load_model("base")


def test_without_vllm_one_clear_error(monkeypatch, micro_model, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(RetainError, match=r"pip install 'retain\[vllm\]'.*|vllm package"):
        make_engine("vllm", micro_model, tokenizer)


def test_without_cuda_one_clear_error(fake_vllm, monkeypatch, micro_model, tokenizer):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RetainError, match="needs an NVIDIA GPU with CUDA"):
        make_engine("vllm", micro_model, tokenizer)


def test_model_without_a_path_is_refused(fake_vllm, micro_model, tokenizer):
    with pytest.raises(RetainError, match="directory or hub name"):
        make_engine("vllm", micro_model, tokenizer)


def test_llm_arguments(fake_vllm, base):
    model, tok = base
    make_engine("vllm", model, tok)
    (llm,) = LLM.instances
    assert llm.kwargs["model"] == model.config._name_or_path
    assert llm.kwargs["skip_tokenizer_init"] is True
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"  # in-process worker, as TRL colocate
    assert llm.kwargs["enable_prefix_caching"] is True and llm.kwargs["trust_remote_code"] is False


def test_generate_shapes_sampling_params_and_eos_handling(fake_vllm, base):
    model, tok = base
    engine = make_engine("vllm", model, tok)
    roll = engine.generate(["reverse abc", "reverse hello"], n=3, temperature=0.7, max_new_tokens=4, seed=11)
    (llm,) = LLM.instances
    prompts, params = llm.requests[-1]
    assert len(roll) == len(prompts) == len(params) == 6
    assert roll.group == [0, 0, 0, 1, 1, 1]
    assert roll.prompts == ["reverse abc"] * 3 + ["reverse hello"] * 3
    assert roll.prompt_ids[0] == encode_prompt(tok, "reverse abc") == prompts[0]["prompt_token_ids"]
    assert all(p.n == 1 and p.temperature == 0.7 and p.max_tokens == 4 for p in params)
    assert all(p.stop_token_ids == [tok.eos_token_id] and p.detokenize is False for p in params)
    assert all(not hasattr(p, "logit_bias") for p in params)  # nothing banned for a text model
    assert [p.seed for p in params] == [11 * vllm_engine.SEED_STRIDE + i for i in range(6)]  # distinct, reproducible
    eos = tok.eos_token_id
    assert roll.completion_ids[0] == [5, 6, eos]  # cut at the first eos
    assert roll.completion_ids[1] == [6] * 4 and roll.truncated[1]  # ran to max_new_tokens
    assert roll.completion_ids[2] == [6, 5, eos]  # stopped at eos that vLLM did not report
    assert roll.truncated == [False, True, False] * 2
    assert roll.texts[0] == tok.decode([5, 6], skip_special_tokens=True)
    greedy = engine.generate(["reverse abc"], greedy=True, max_new_tokens=3)
    assert len(greedy) == 1 and llm.requests[-1][1][0].temperature == 0.0 and llm.requests[-1][1][0].seed is None


def test_weights_pushed_by_name_once_per_change(fake_vllm, base):
    model, tok = base
    engine = make_engine("vllm", model, tok)
    engine.generate(["reverse abc"], max_new_tokens=2)
    (llm,) = LLM.instances
    names = {name for name, _ in model.named_parameters()}
    assert len(llm.pushes) == 1 and set(llm.pushes[0]) == names
    assert all(torch.equal(llm.pushes[0][n], p) for n, p in model.named_parameters())
    assert llm.resets == 1  # the prefix cache's KV came from the old weights
    engine.generate(["reverse abc"], max_new_tokens=2)
    assert len(llm.pushes) == 1  # unchanged weights are not pushed again
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()  # an update bumps the parameters' version counters
    engine.generate(["reverse abc"], max_new_tokens=2)
    assert len(llm.pushes) == 2
    assert all(torch.equal(llm.pushes[1][n], p) for n, p in model.named_parameters())
    engine.sync_weights(model)  # explicit, as GRPO does before each rollout
    assert len(llm.pushes) == 3


def test_engines_share_one_llm_and_swap_weights(fake_vllm, base):
    from retain.models.adapters import frozen_copy

    model, tok = base
    other = frozen_copy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    a, b = make_engine("vllm", model, tok), make_engine("vllm", other, tok)
    assert len(LLM.instances) == 1  # one vLLM engine per process
    (llm,) = LLM.instances
    a.generate(["reverse abc"], max_new_tokens=2)
    b.generate(["reverse abc"], max_new_tokens=2)
    a.generate(["reverse abc"], max_new_tokens=2)
    first = next(n for n, _ in model.named_parameters())
    pushed = [p[first][0, 0].item() for p in llm.pushes]
    value = next(model.parameters())[0, 0].item()
    assert pushed == pytest.approx([value, value + 1.0, value])


def test_lora_pushes_merged_base_weights(fake_vllm, base):
    from retain.models import adapters
    from retain.methods.config import AdapterConfig

    model, tok = base
    names = {name for name, _ in model.named_parameters()}
    lora = adapters.attach(model, AdapterConfig(r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at 0: make the delta visible
    engine = make_engine("vllm", lora, tok)
    engine.generate(["reverse abc"], max_new_tokens=2)
    (llm,) = LLM.instances
    (pushed,) = llm.pushes
    assert set(pushed) == names  # Hugging Face names, no adapter tensors
    merged = dict(adapters.merged_copy(lora).named_parameters())
    for name in names:
        assert torch.allclose(pushed[name], merged[name], atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q = dict(lora.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not torch.allclose(pushed[q], base_q)  # the delta is in


def test_grpo_trains_through_the_vllm_engine(fake_vllm, base):
    from retain.methods.build import train_stage

    model, tok = base
    method = {"name": "grpo", "data": {"prompts_per_step": 2, "group_size": 3}, "train": {"steps": 2, "lr": 1e-4}}
    train_stage(model, tok, "countdown", method, engine="vllm", device="cpu")  # torch.cuda is faked: train on CPU
    (llm,) = LLM.instances
    assert len(llm.requests) == 2 and all(len(r[0]) == 6 for r in llm.requests)
    assert len(llm.pushes) >= 2  # the policy's weights went in before each rollout


def test_a_dead_models_weights_are_never_taken_for_a_new_ones(fake_vllm, tokenizer):
    import gc

    from retain.models.loading import load_model

    model, tok = load_model("base")
    make_engine("vllm", model, tok).generate(["reverse abc"], max_new_tokens=2)
    held = vllm_engine._SLOT["loaded"][0]
    assert held() is model
    del model
    gc.collect()
    assert held() is None  # held weakly: a new model at the dead one's address cannot match it
    fresh, _ = load_model("base")
    assert not vllm_engine._holds(fresh)
