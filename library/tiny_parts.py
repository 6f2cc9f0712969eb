"""Pieces every tiny fixture model shares: the caption vocabulary's tokenizer, the VAE, weight noise.

``tiny_sd`` (SD1/SD2, which also writes the SDXL fixture) and ``tiny_sdxl`` both build on these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from library.models.ldm_architecture import VAE_SCALE_FACTOR

# Words of the fixture captions get whole-word BPE tokens; anything else falls back to bytes.
VOCAB_WORDS = [
    "a",
    "photo",
    "of",
    "sks",
    "toy",
    "dog",
    "cat",
    "cube",
    "ball",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "on",
    "the",
    "table",
    "in",
    "room",
    "small",
    "big",
    "shiny",
    "matte",
    "wooden",
    "plastic",
    "painting",
    "style",
]


def tiny_vae_config() -> dict:
    return dict(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=VAE_SCALE_FACTOR,
    )


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100 and up.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair of lowest merge rank."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def write_tiny_tokenizer(
    out_dir: str | os.PathLike, v2: bool, words: Sequence[str] = tuple(VOCAB_WORDS)
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a ~600-token vocabulary (bytes plus ``words`` as whole tokens),
    saved with ``save_pretrained``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in words:
        # Segment the word with the merges so far (as the tokenizer will), then merge what is left
        # from the left: the new merges rank after every earlier one, so no earlier word changes.
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
                vocab.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        pad_token="!" if v2 else "<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def roughen(module: torch.nn.Module, generator: torch.Generator) -> None:
    # Default inits leave norms at 1 and some biases at 0; a little noise makes every tensor
    # matter, so a swapped or dropped tensor in a conversion changes the outputs.
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
