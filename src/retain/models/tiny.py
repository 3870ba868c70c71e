"""The embedded model family: small Qwen2-architecture causal LMs made from a config.

Qwen2 because it is the architecture of the papers' models (Qwen2.5) and every HF tool runs it; with the
character tokenizer the vocabulary is ~100, so almost all parameters sit in the transformer blocks.
"""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM, PreTrainedTokenizerBase

from retain.errors import RetainError

# name -> (hidden, layers, heads, kv_heads, intermediate). Sizes measured with the character vocabulary.
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (192, 4, 6, 2, 512),  # ~1.8 M parameters: the embedded base model, minutes on 2 CPU cores
    "small": (256, 6, 8, 2, 768),  # ~4.9 M
    "medium": (384, 8, 6, 2, 1024),  # ~12.6 M
}
MAX_POSITIONS = 256


def model_config(preset: str, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    if preset not in SHAPES:
        raise RetainError(f"unknown model preset {preset!r} (presets: {', '.join(SHAPES)})")
    hidden, layers, heads, kv_heads, inter = SHAPES[preset]
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def make_model(preset: str, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A freshly initialised model of ``preset`` (seed torch first for a deterministic init)."""
    return Qwen2ForCausalLM(model_config(preset, tokenizer))
