"""The embedded model's tokenizer: one token per printable ASCII character, plus chat and control tokens.

Character-level keeps the vocabulary tiny (~100) and makes every task's text representable, hostile completions
included. It is a real ``tokenizers`` BPE model with no merges (so every character is its own token), wrapped as
a Hugging Face ``PreTrainedTokenizerFast`` with a chat template, so any HF tooling (TRL, vLLM, generate) takes it.

Chat format::

    <|user|>what is 3+4?<|assistant|>7</s>

The prompt a model is given is ``apply_chat_template([user], add_generation_prompt=True)``; the target is the
answer followed by ``</s>`` (the eos token), which is where generation stops.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, USER, ASSISTANT]
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer; ids are stable (specials first, then ``ALPHABET`` in order)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, ignore_merges=True))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="left",
        model_max_length=1024,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
