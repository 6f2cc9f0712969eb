"""Tokenising and encoding captions: single 77-token sequences and kohya's 150/225-token chunks."""

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from library.errors import ConfigError
from library.models.text_encoding import encode_tokens, tokenize_captions

LONG = ", ".join(["sks toy, red cube on the table"] * 12)  # about 100 tokens: two chunks


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def clip(request, tiny_sd):
    folder = tiny_sd.root / request.param
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return tokenizer, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()


def test_single_chunk_is_the_plain_77_token_encoding(clip):
    tokenizer, _ = clip
    captions = ["sks toy, red, cube", ""]
    ids = tokenize_captions(tokenizer, captions)
    plain = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 1, 77) and ids.dtype == torch.long
    assert torch.equal(ids[:, 0], plain)


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_chunks_carry_the_caption_body_between_bos_and_eos(clip, max_token_length):
    tokenizer, _ = clip
    chunks = max_token_length // 75
    ids = tokenize_captions(tokenizer, [LONG, "red"], max_token_length)
    assert ids.shape == (2, chunks, 77)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    body = tokenizer(LONG).input_ids[1:-1]
    assert 75 < len(body) < 150
    padded = (body + [eos] + [pad] * 300)[: 75 * chunks]
    for index in range(chunks):
        expected = padded[75 * index : 75 * (index + 1)]
        # kohya closes a chunk with <EOS> when it was cut mid-caption, else keeps the padding
        # (SD1 pads with <EOS> anyway); an all-padding SD2 chunk starts <BOS> <EOS>.
        last = eos if expected[-1] not in (eos, pad) else pad
        if expected[0] == pad:
            expected = [eos] + expected[1:]
        assert ids[0, index].tolist() == [bos, *expected, last]
    assert ids[1, 0, :3].tolist() == [bos, tokenizer.convert_tokens_to_ids("red</w>"), eos]


def test_sd2_chunk_cut_mid_caption_ends_in_eos(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd.sd2_dir, subfolder="tokenizer")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenize_captions(tokenizer, [", ".join(["red"] * 120)], 150)
    # 239 body tokens: both chunks are full, each is closed with <EOS> instead of its last body token
    assert ids[0, 0, 75].item() != tokenizer.pad_token_id
    assert ids[0, :, -1].tolist() == [tokenizer.eos_token_id] * 2


def test_encoding_one_chunk_equals_the_text_encoder(clip):
    tokenizer, text_encoder = clip
    ids = tokenize_captions(tokenizer, ["sks toy, red, cube", "a photo"])
    with torch.no_grad():
        direct = text_encoder(ids[:, 0])
        states = text_encoder(ids[:, 0], output_hidden_states=True).hidden_states
        assert torch.allclose(encode_tokens(text_encoder, ids), direct.last_hidden_state)
        assert torch.allclose(encode_tokens(text_encoder, ids, clip_skip=1), direct.last_hidden_state, atol=1e-6)
        skip2 = text_encoder.text_model.final_layer_norm(states[-2])
        assert torch.allclose(encode_tokens(text_encoder, ids, clip_skip=2), skip2)
        assert not torch.allclose(skip2, direct.last_hidden_state)


def test_chunked_encoding_joins_bos_bodies_and_last_eos(clip):
    tokenizer, text_encoder = clip
    ids = tokenize_captions(tokenizer, [LONG, "red"], 225)
    with torch.no_grad():
        encoded = encode_tokens(text_encoder, ids)
        per_chunk = [text_encoder(ids[:, i]).last_hidden_state for i in range(3)]
    assert encoded.shape == (2, 3 * 75 + 2, text_encoder.config.hidden_size)
    assert torch.allclose(encoded[:, 0], per_chunk[0][:, 0])
    for i in range(3):
        assert torch.allclose(encoded[:, 1 + 75 * i : 76 + 75 * i], per_chunk[i][:, 1:76])
    assert torch.allclose(encoded[:, -1], per_chunk[2][:, -1])


def test_bad_lengths_are_config_errors(clip):
    tokenizer, text_encoder = clip
    with pytest.raises(ConfigError, match="--max_token_length must be 75, 150 or 225, got 100"):
        tokenize_captions(tokenizer, ["red"], 100)
    with pytest.raises(ConfigError, match="--clip_skip"):
        encode_tokens(text_encoder, tokenize_captions(tokenizer, ["red"]), clip_skip=0)
