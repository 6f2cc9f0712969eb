"""Caption files and kohya's per-sample caption processing (shuffle, keep_tokens, dropout, wildcards).

:func:`process_caption` follows ``BaseDataset.process_caption`` step for step; it draws its
randomness from the generator it is given, so a batch is the same whatever the worker count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.errors import DatasetError


@dataclass(frozen=True)
class CaptionOptions:
    """The subset options that shape a caption (kohya's names and defaults)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


def read_caption_file(image_path: Path, extension: str, enable_wildcard: bool) -> str | None:
    """The caption beside an image, or ``None`` when there is no caption file.

    Tries ``<stem><extension>``, then the stem without a face-crop ``_cx_cy_w_h`` suffix. Only the
    first line is the caption, unless wildcards are on: then every non-empty line is a choice.
    """
    candidates = [image_path.with_name(image_path.stem + extension)]
    tokens = image_path.stem.split("_")
    if len(tokens) >= 5:
        candidates.append(image_path.with_name("_".join(tokens[:-4]) + extension))
    for path in candidates:
        if path.is_file():
            return _read_caption_text(path, enable_wildcard)
    return None


def _read_caption_text(path: Path, enable_wildcard: bool) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"caption file is not UTF-8: {path} ({error.reason} at byte {error.start})") from error
    if not lines:
        raise DatasetError(f"caption file is empty: {path}")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def count_tags(captions: list[str]) -> dict[str, int]:
    """kohya's tag frequency (``ss_tag_frequency``): comma-separated, stripped, lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: np.random.Generator,
    *,
    epoch: int,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The caption one sample is trained with this epoch, in kohya's order of operations.

    ``epoch`` counts from 1 as in kohya's loop (``caption_dropout_every_n_epochs`` drops all
    captions when ``epoch % n == 0``); ``step`` and ``max_train_steps`` drive token warmup.
    """
    caption = _add_prefix_and_suffix(caption, options.caption_prefix, options.caption_suffix)
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every_n = options.caption_dropout_every_n_epochs
    if dropped or (every_n > 0 and epoch % every_n == 0):
        return ""
    caption = _expand_wildcards(caption, rng) if options.enable_wildcard else caption.split("\n")[0]
    if options.shuffle_caption or options.token_warmup_step > 0 or options.caption_tag_dropout_rate > 0:
        caption = _rearrange_tags(caption, options, rng, step, max_train_steps)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def _add_prefix_and_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    """Join with a space, to every line: kohya adds them to the whole text, so with several caption
    lines (wildcards, fine-tuning metadata) only the first line got the prefix and the last the suffix."""
    lines = caption.split("\n")
    if prefix:
        lines = [prefix + " " + line for line in lines]
    if suffix:
        lines = [line + " " + suffix for line in lines]
    return "\n".join(lines)


def _expand_wildcards(caption: str, rng: np.random.Generator) -> str:
    """One random line, then each ``{a|b|c}`` replaced by one choice; ``{{``/``}}`` are literal braces."""
    if "\n" in caption:
        lines = caption.split("\n")
        caption = lines[int(rng.integers(len(lines)))]
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match) -> str:
        choices = match.group(1).split("|")
        return choices[int(rng.integers(len(choices)))]

    caption = re.sub(r"\{([^}]+)\}", choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _rearrange_tags(
    caption: str, options: CaptionOptions, rng: np.random.Generator, step: int, max_train_steps: int
) -> str:
    """Split into fixed and shuffleable tags, warm up, shuffle, drop tags, re-join with ``", "``."""
    fixed, flexible, fixed_suffix = _split_tags(caption, options)
    warmup_steps = options.token_warmup_step
    if warmup_steps < 1:  # a fraction of the whole run
        warmup_steps = math.floor(warmup_steps * max_train_steps)
    if warmup_steps and step < warmup_steps:
        count = math.floor(step * ((len(flexible) - options.token_warmup_min) / warmup_steps))
        flexible = flexible[: count + options.token_warmup_min]
    if options.shuffle_caption:
        flexible = [flexible[i] for i in rng.permutation(len(flexible))]
    if options.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= options.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + fixed_suffix)


def _split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    separator = options.caption_separator
    keep_separator = options.keep_tokens_separator
    if keep_separator and keep_separator in caption:
        fixed_part, flexible_part = caption.split(keep_separator, 1)
        suffix_part = ""
        if keep_separator in flexible_part:
            flexible_part, suffix_part = flexible_part.split(keep_separator, 1)
        parts = (fixed_part, flexible_part, suffix_part)
        fixed, flexible, suffix = ([t.strip() for t in part.split(separator) if t.strip()] for part in parts)
        return fixed, flexible, suffix
    tags = [t.strip() for t in caption.strip().split(separator)]
    return tags[: options.keep_tokens], tags[options.keep_tokens :], []
