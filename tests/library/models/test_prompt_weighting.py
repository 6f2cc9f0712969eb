"""kohya's attention weighting of captions (--weighted_captions) and sample prompts, against references."""

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from library.models.prompt_weighting import (
    apply_token_weights,
    encode_sample_prompts,
    parse_prompt_attention,
    tokenize_with_weights,
)
from library.models.text_encoding import encode_tokens, tokenize_captions

# kohya's own examples (the docstring of its parse_prompt_attention), with the weights it lists.
KOHYA_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    ),
    ("[ball]", [("ball", 1 / 1.1)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), KOHYA_EXAMPLES)
def test_parse_matches_kohyas_examples(text, expected):
    parsed = parse_prompt_attention(text)
    assert [piece for piece, _ in parsed] == [piece for piece, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def clip(request, tiny_sd):
    folder = tiny_sd.root / request.param
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return tokenizer, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()


def word_id(tokenizer, word: str) -> int:
    return tokenizer.convert_tokens_to_ids(word + "</w>")


def test_weighted_caption_ids_and_weights(clip):
    tokenizer, _ = clip
    ids, weights = tokenize_with_weights(tokenizer, ["a (red:1.5) [ball]", "sks toy"])
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    expected_ids = [bos, word_id(tokenizer, "a"), word_id(tokenizer, "red"), word_id(tokenizer, "ball"), eos]
    assert ids.shape == weights.shape == (2, 1, 77)
    assert ids[0, 0].tolist() == expected_ids + [pad] * 72
    assert weights[0, 0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert weights[0, 0, 5:].eq(1).all()
    # without brackets the ids are those of an unweighted caption and every weight is 1
    assert torch.equal(ids[1], tokenize_captions(tokenizer, ["sks toy"])[0])
    assert weights[1].eq(1).all()


def test_weighted_caption_encoding_scales_each_token(clip):
    tokenizer, text_encoder = clip
    ids, weights = tokenize_with_weights(tokenizer, ["a (red:1.5) [ball]"])
    with torch.no_grad():
        hidden = apply_token_weights(encode_tokens(text_encoder, ids), weights)
        plain = text_encoder(tokenize_captions(tokenizer, ["a red ball"])[:, 0])[0]
    factors = torch.ones(77)
    factors[2], factors[3] = 1.5, 1 / 1.1
    torch.testing.assert_close(hidden[0], plain[0] * factors[:, None])


def test_weighted_long_caption_keeps_the_chunk_layout(clip):
    tokenizer, text_encoder = clip
    words = ["red cube on the ball"] * 20  # 101 tokens: the weighted word lands in the second chunk
    weighted = " ".join(words[:18] + ["(dog:2)"] + words[18:])
    plain = " ".join(words[:18] + ["dog"] + words[18:])
    ids, weights = tokenize_with_weights(tokenizer, [weighted], 150)
    plain_ids = tokenize_captions(tokenizer, [plain], 150)
    assert torch.equal(ids, plain_ids)
    dog = (plain_ids[0] == word_id(tokenizer, "dog")).nonzero().tolist()
    assert dog == [[1, 90 - 75 + 1]]  # body token 90 (18 phrases of 5 words) is chunk 1, position 16
    expected = torch.ones(1, 2, 77)
    expected[0, 1, 16] = 2.0
    assert torch.equal(weights, expected)
    with torch.no_grad():
        hidden = apply_token_weights(encode_tokens(text_encoder, ids), weights)
        reference = encode_tokens(text_encoder, plain_ids)
    reference[0, 1 + 90] *= 2.0  # <BOS>, then body tokens in order
    torch.testing.assert_close(hidden, reference)


def lpw_reference(tokenizer, text_encoder, pieces: list[tuple[list[str], float]], chunks: int) -> torch.Tensor:
    """kohya's sample-prompt rule written out for pieces of known words: pad with <EOS>, encode each
    77-token chunk whole, weight the hidden states and restore their mean."""
    tokens = [word_id(tokenizer, w) for words, _ in pieces for w in words]
    factors = [weight for words, weight in pieces for _ in words]
    rows, row_factors = [], []
    for chunk in range(chunks):
        body, body_factors = tokens[75 * chunk : 75 * (chunk + 1)], factors[75 * chunk : 75 * (chunk + 1)]
        rows.append([tokenizer.bos_token_id, *body] + [tokenizer.eos_token_id] * (76 - len(body)))
        row_factors += [1.0, *body_factors] + [1.0] * (76 - len(body_factors))
    with torch.no_grad():
        hidden = torch.cat([text_encoder(torch.tensor([row]))[0] for row in rows], dim=1)[0]
    weighted = hidden * torch.tensor(row_factors)[:, None]
    return weighted * (hidden.mean() / weighted.mean())


def test_sample_prompt_weights_keep_the_mean(clip):
    tokenizer, text_encoder = clip
    with torch.no_grad():
        embeds = encode_sample_prompts(
            tokenizer, lambda ids: encode_tokens(text_encoder, ids[:, None]), ["a (red:1.5) ball", "[blue] cube"]
        )
    assert embeds.shape == (2, 77, text_encoder.config.hidden_size)
    first = lpw_reference(tokenizer, text_encoder, [(["a"], 1.0), (["red"], 1.5), (["ball"], 1.0)], 1)
    second = lpw_reference(tokenizer, text_encoder, [(["blue"], 1 / 1.1), (["cube"], 1.0)], 1)
    torch.testing.assert_close(embeds[0], first)
    torch.testing.assert_close(embeds[1], second)


def test_long_sample_prompt_sets_the_length_of_both(clip):
    tokenizer, text_encoder = clip
    long_words = ["red", "cube", "on", "the", "ball"] * 18  # 90 tokens: two chunks
    prompt = " ".join(long_words[:80]) + " (" + " ".join(long_words[80:]) + ":0.5)"
    with torch.no_grad():
        embeds = encode_sample_prompts(
            tokenizer, lambda ids: encode_tokens(text_encoder, ids[:, None]), [prompt, "blue"]
        )
    assert embeds.shape == (2, 154, text_encoder.config.hidden_size)
    expected = lpw_reference(tokenizer, text_encoder, [(long_words[:80], 1.0), (long_words[80:], 0.5)], 2)
    torch.testing.assert_close(embeds[0], expected)
    torch.testing.assert_close(embeds[1], lpw_reference(tokenizer, text_encoder, [(["blue"], 1.0)], 2))


def test_unweighted_sample_prompt_is_the_plain_encoding(tiny_sd):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd.sd1_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd.sd1_dir, subfolder="text_encoder").eval()
    with torch.no_grad():
        embeds = encode_sample_prompts(tokenizer, lambda ids: encode_tokens(text_encoder, ids[:, None]), ["sks toy"])
        plain = encode_tokens(text_encoder, tokenize_captions(tokenizer, ["sks toy"]))
    torch.testing.assert_close(embeds, plain)


def test_sdxl_sample_prompt_pads_after_one_eos_with_the_pad_token(tiny_sd):
    """kohya's SDXL sampling pipeline: <BOS> prompt <EOS> then pad tokens, cut into 77-token chunks whose
    first id is <BOS> and whose last is <EOS> when a prompt token would sit there (bigG pads with "!")."""
    from library.models.sdxl import SDXL

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd.tokenizer_cache_dir / SDXL.tokenizer_2_folder)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    words = (["red", "cube", "on", "the", "ball"] * 16)[:80]
    tokens = [word_id(tokenizer, w) for w in words]
    seen = []
    encode_sample_prompts(tokenizer, lambda ids: seen.append(ids) or torch.zeros(len(ids), 77, 1) + 1,
                          [" ".join(words)], pad_token_id=pad)  # fmt: skip
    first, second = (chunk[0].tolist() for chunk in seen)
    assert first == [bos, *tokens[:75], eos]
    assert second == [bos, *tokens[75:], eos] + [pad] * 70
