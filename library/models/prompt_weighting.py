"""kohya's prompt attention weighting: ``(word)``, ``(word:1.3)``, ``[word]`` in captions and prompts.

The syntax is AUTOMATIC1111's, which kohya copies: ``(text)`` multiplies the weight of its tokens
by 1.1, ``(text:w)`` by ``w``, ``[text]`` divides it by 1.1, brackets nest, ``\\(`` and friends are
literal characters and unbalanced brackets close at the end of the text.

kohya applies the weights in two ways, and both are reproduced here:

- training captions (``--weighted_captions``, v0.10.1's ``SdTokenizeStrategy.tokenize_with_weights``
  and ``encode_tokens_with_weights``): each weighted piece is tokenised on its own, the ids are
  padded and cut into 75-token chunks exactly as unweighted captions are, encoded as usual, and
  each token's hidden state is multiplied by its weight;
- sample prompts (the long-prompt-weighting pipeline kohya samples with): prompt and negative
  prompt are padded with ``<EOS>`` to the same number of chunks (at most 3, whatever
  ``--max_token_length``), every 77-token chunk is encoded and kept whole, the hidden states are
  multiplied by the weights and rescaled so that each prompt's mean hidden value is unchanged.

Written by hand because the rule must match kohya's to the token, and no maintained package
implements this parser (compel, for one, uses a different syntax).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from transformers import CLIPTokenizer

from library.models.text_encoding import CHUNK_BODY, CLIP_LENGTH, chunk_token_ids, num_chunks, split_into_chunks

logger = logging.getLogger(__name__)

ROUND_BRACKET_WEIGHT = 1.1
SQUARE_BRACKET_WEIGHT = 1 / 1.1
# kohya's sample pipeline encodes prompts of up to 3 chunks (225 tokens), whatever --max_token_length.
SAMPLE_PROMPT_MAX_CHUNKS = 3

# One token of the attention grammar per match: escapes, brackets, ":weight)" and plain text.
_ATTENTION_TOKEN = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:([+-]?[.\d]+)\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.5) [ball]"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("ball", 1/1.1)]``.

    Neighbouring pieces of equal weight are merged; an empty text is ``[("", 1.0)]``.
    """
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_WEIGHT)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_WEIGHT)
        else:
            pieces.append([token, 1.0])
    for start in open_round:
        scale_from(start, ROUND_BRACKET_WEIGHT)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_WEIGHT)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece_text, weight) for piece_text, weight in merged]


def weighted_token_ids(tokenizer: CLIPTokenizer, text: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Token ids and per-token weights of ``text`` without ``<BOS>``/``<EOS>``, cut at ``max_tokens``.

    Each piece of :func:`parse_prompt_attention` is tokenised on its own, as kohya does (so a
    bracket splits a word in two, as it does in AUTOMATIC1111).
    """
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        piece_ids = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
        ids += piece_ids
        weights += [weight] * len(piece_ids)
        if len(ids) > max_tokens:
            break
    if len(ids) > max_tokens:
        logger.warning("weighted prompt truncated to %d tokens: %s", max_tokens, text)
    return ids[:max_tokens], weights[:max_tokens]


def tokenize_with_weights(
    tokenizer: CLIPTokenizer, captions: list[str], max_token_length: int | None = None
) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """Ids and weights ``(B, n_chunks, 77)`` of weighted training captions (kohya's ``--weighted_captions``).

    The ids have the layout :func:`library.models.text_encoding.tokenize_captions` gives unweighted
    captions; ``<BOS>``, ``<EOS>`` and padding weigh 1.
    """
    chunks = num_chunks(max_token_length)
    total = CHUNK_BODY * chunks + 2
    all_ids, all_weights = [], []
    for caption in captions:
        ids, weights = weighted_token_ids(tokenizer, caption, total - 2)
        padding = total - 2 - len(ids)
        all_ids.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        all_weights.append([1.0, *weights] + [1.0] * (padding + 1))
    ids = chunk_token_ids(torch.tensor(all_ids), tokenizer, chunks)
    return ids, split_into_chunks(torch.tensor(all_weights), chunks)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states ``(B, n*75 + 2, D)`` of :func:`encode_tokens` times the body weights ``(B, n, 77)``."""
    body = weights[:, :, 1:-1].reshape(weights.shape[0], -1).to(hidden)
    ones = torch.ones_like(body[:, :1])
    return hidden * torch.cat([ones, body, ones], dim=1).unsqueeze(-1)


def encode_sample_prompts(
    tokenizer: CLIPTokenizer,
    encode_chunk: Callable[[torch.Tensor], torch.Tensor],
    prompts: list[str],
    max_chunks: int = SAMPLE_PROMPT_MAX_CHUNKS,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Weighted embeddings ``(B, n*77, D)`` of sample prompts, as kohya's sampling pipeline computes them.

    ``encode_chunk(ids)`` encodes ids ``(B, 77)`` into hidden states ``(B, 77, D)`` (with the
    run's ``--clip_skip``). All prompts share one length: the chunks the longest needs. kohya's
    SD1/SD2 pipeline pads with ``<EOS>``; its SDXL pipeline puts one ``<EOS>`` after the prompt and
    pads with the tokenizer's pad token (``pad_token_id``; bigG's is ``!``), fixing each chunk's
    ends as it does.
    """
    parsed = [weighted_token_ids(tokenizer, prompt, CHUNK_BODY * max_chunks) for prompt in prompts]
    longest = max(len(ids) for ids, _ in parsed)
    chunks = max(1, min(max_chunks, (longest - 1) // CHUNK_BODY + 1))
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    fill = eos if pad_token_id is None else pad_token_id
    ids = torch.empty((len(prompts), chunks, CLIP_LENGTH), dtype=torch.long)
    weights = torch.ones(len(prompts), chunks, CLIP_LENGTH)
    for row, (token_ids, token_weights) in enumerate(parsed):
        full = [bos, *token_ids, eos] + [fill] * (CHUNK_BODY * chunks - len(token_ids))
        for chunk in range(chunks):
            part = full[chunk * CHUNK_BODY : chunk * CHUNK_BODY + CLIP_LENGTH]
            part[0] = bos
            if chunks > 1 and fill == eos:
                part[-1] = eos
            elif chunks > 1:  # kohya's rule for a pad token that is not <EOS>
                part[-1] = eos if part[-1] not in (eos, fill) else part[-1]
                part[1] = eos if part[1] == fill else part[1]
            ids[row, chunk] = torch.tensor(part, dtype=torch.long)
            body_weights = token_weights[chunk * CHUNK_BODY : (chunk + 1) * CHUNK_BODY]
            weights[row, chunk, 1 : 1 + len(body_weights)] = torch.tensor(body_weights)
    if pad != eos and pad_token_id is None:  # SD2 (its pad token is "!"): a body starting with it starts with <EOS>
        ids[..., 1][ids[..., 1] == pad] = eos
    hidden = torch.cat([encode_chunk(ids[:, chunk]) for chunk in range(chunks)], dim=1)
    weights = weights.reshape(len(prompts), -1, 1).to(hidden)
    mean_before = hidden.float().mean(dim=(1, 2)).to(hidden.dtype)
    hidden = hidden * weights
    mean_after = hidden.float().mean(dim=(1, 2)).to(hidden.dtype)
    return hidden * (mean_before / mean_after)[:, None, None]
