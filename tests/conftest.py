"""Shared test setup: offline hub, deterministic threads, a tiny random model for fast unit tests."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from retain.models.tokenizer import build_tokenizer

torch.set_num_threads(int(os.environ.get("RETAIN_TEST_THREADS", "2")))


@pytest.fixture(scope="module")
def one_thread():
    """The test models are tiny (hidden 32 to 192): a second torch thread only adds synchronisation, and two threads
    spin against each other on a shared 2-core machine. Module-scoped so a module-scoped fixture can take it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def micro_model(tokenizer):
    """A randomly initialised 2-layer Qwen2 model (hidden 32): fast enough for loop and I/O tests."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(cfg)


@pytest.fixture()
def micro_dir(tmp_path, micro_model, tokenizer):
    """``micro_model`` saved as a HF model directory (weights + tokenizer), for runs that load a model by path."""
    path = tmp_path / "micro"
    micro_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
