"""Tokenising captions and encoding them, with kohya's 75-token chunks for ``--max_token_length``.

CLIP sees 77 tokens: ``<BOS>``, 75 tokens, ``<EOS>``. For 150 or 225 tokens kohya tokenises the
whole caption once, cuts the 75-token body into 2 or 3 chunks, gives each chunk its own
``<BOS>``/``<EOS>``, encodes the chunks as separate sequences and re-joins the hidden states to
``<BOS>`` + n*75 tokens + ``<EOS>``.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from library.errors import ConfigError

CLIP_LENGTH = 77
CHUNK_BODY = CLIP_LENGTH - 2
MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def num_chunks(max_token_length: int | None) -> int:
    """How many 77-token sequences a caption becomes (1, 2 or 3)."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ConfigError(f"--max_token_length must be 75, 150 or 225, got {max_token_length}")
    return 1 if max_token_length is None else max_token_length // CHUNK_BODY


def tokenize_captions(
    tokenizer: CLIPTokenizer, captions: list[str], max_token_length: int | None = None
) -> torch.LongTensor:
    """Token ids ``(B, n_chunks, 77)`` for ``captions``, padded and truncated as kohya does."""
    chunks = num_chunks(max_token_length)
    total = CHUNK_BODY * chunks + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=total, return_tensors="pt").input_ids
    return chunk_token_ids(ids, tokenizer, chunks)


def split_into_chunks(values: torch.Tensor, chunks: int) -> torch.Tensor:
    """``(B, chunks*75 + 2)`` -> ``(B, chunks, 77)``: each 75-value body between the first and last value."""
    pieces = [
        torch.cat([values[:, :1], values[:, 1 + i * CHUNK_BODY : 1 + (i + 1) * CHUNK_BODY], values[:, -1:]], dim=1)
        for i in range(chunks)
    ]
    return torch.stack(pieces, dim=1)


def chunk_token_ids(ids: torch.Tensor, tokenizer: CLIPTokenizer, chunks: int) -> torch.LongTensor:
    """Padded ids ``(B, chunks*75 + 2)`` as ``(B, chunks, 77)`` chunks that each start and end as CLIP expects."""
    chunked = split_into_chunks(ids, chunks)
    if chunks > 1 and tokenizer.pad_token_id != tokenizer.eos_token_id:
        _mark_chunk_ends(chunked, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return chunked


def _mark_chunk_ends(chunked: torch.Tensor, eos: int, pad: int) -> None:
    """SD2's tokenizer pads with a token other than ``<EOS>``; kohya makes every chunk end in ``<EOS>``.

    A chunk cut mid-caption ends in ``token, <PAD>``: its last id becomes ``<EOS>``. A chunk that
    is all padding starts ``<BOS>, <PAD>``: its first body token becomes ``<EOS>``.
    """
    before_last = chunked[..., -2]
    cut = (before_last != eos) & (before_last != pad)
    chunked[..., -1][cut] = eos
    empty = chunked[..., 1] == pad
    chunked[..., 1][empty] = eos


def encode_tokens(
    text_encoder: CLIPTextModel, input_ids: torch.Tensor, *, clip_skip: int | None = None
) -> torch.Tensor:
    """Hidden states ``(B, n_chunks*75 + 2, D)`` for ids from :func:`tokenize_captions`.

    ``clip_skip`` = k takes the output of the k-th layer from the end and applies the final layer
    norm, as kohya and A1111 do (1 is the usual last layer).
    """
    if clip_skip is not None and clip_skip < 1:
        raise ConfigError(f"--clip_skip must be 1 or more, got {clip_skip}")
    batch, chunks, length = input_ids.shape
    flat = input_ids.reshape(batch * chunks, length).to(text_encoder.device)
    if clip_skip is None:
        hidden = text_encoder(flat)[0]
    else:
        states = text_encoder(flat, output_hidden_states=True, return_dict=True).hidden_states
        hidden = text_encoder.text_model.final_layer_norm(states[-clip_skip])
    return join_chunks(hidden, batch, chunks)


def join_chunks(hidden: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """``(B*n_chunks, 77, D)`` hidden states -> ``(B, n_chunks*75 + 2, D)``, as kohya joins them."""
    hidden = hidden.reshape(batch, chunks, hidden.shape[-2], -1)
    if chunks == 1:
        return hidden[:, 0]
    # <BOS> of the first chunk, every chunk's 75-token body, <EOS> of the last chunk.
    body = hidden[:, :, 1:-1].reshape(batch, chunks * CHUNK_BODY, -1)
    return torch.cat([hidden[:, 0, :1], body, hidden[:, -1, -1:]], dim=1)
