from retain.data import IGNORE, encode_answer, encode_pairs, encode_prompt, left_pad
from retain.models.tokenizer import ALPHABET, ASSISTANT, EOS, USER, build_tokenizer


def test_one_token_per_character_and_round_trip(tokenizer):
    text = "city of mentor of ava? (10-7)*8 = 24"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 6 + len(ALPHABET)


def test_unknown_characters_map_to_unk_not_crash(tokenizer):
    ids = tokenizer("é\t😀", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.unk_token_id] * 3


def test_chat_template_and_prompt_encoding(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}], tokenize=False
    )
    assert text == f"{USER}3+4={ASSISTANT}7{EOS}"
    prompt = encode_prompt(tokenizer, "3+4=")
    assert prompt[0] == tokenizer.convert_tokens_to_ids(USER)
    assert prompt[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT)
    assert len(prompt) == 2 + 4
    assert encode_answer(tokenizer, "7")[-1] == tokenizer.eos_token_id


def test_saved_tokenizer_reloads_identically(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("reverse abc")["input_ids"] == tokenizer("reverse abc")["input_ids"]
    assert again.chat_template == tokenizer.chat_template
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # ids are stable across builds


def test_collate_masks_prompt_and_pads_right(tokenizer):
    batch = encode_pairs(tokenizer, [("hi", "yo"), ("a", "bcd")])
    assert batch.input_ids.shape == (2, 7)
    # row 0: <|user|> h i <|assistant|> y o </s>; labels only on "yo</s>"
    assert batch.labels[0, :4].tolist() == [IGNORE] * 4
    assert tokenizer.decode(batch.labels[0, 4:].tolist()) == "yo</s>"
    assert batch.num_target_tokens == 3 + 4


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_right_padded_forward_without_mask_matches_masked_forward(tokenizer):
    """model_inputs drops the attention mask of right-padded batches: every real position's logits are unchanged."""
    import torch

    from retain.data import model_inputs
    from retain.models.tiny import make_model

    torch.manual_seed(0)
    model = make_model("tiny", tokenizer).eval()
    batch = encode_pairs(tokenizer, [("1+2", "3"), ("a much longer prompt than the first", "an answer")])
    assert (batch.attention_mask == 0).any()  # the batch is padded
    masked = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    unmasked = model(**model_inputs(batch, "cpu")).logits
    real = batch.attention_mask.bool()
    assert "attention_mask" not in model_inputs(batch, "cpu")
    assert torch.allclose(masked[real], unmasked[real], atol=1e-5, rtol=0)
