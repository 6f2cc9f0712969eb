"""Cached text-encoder outputs (kohya's ``--cache_text_encoder_outputs[_to_disk]``, SDXL and SD1/SD2).

Each image's caption is encoded once, before training; the outputs live in memory and, with
``to_disk``, in kohya's ``<image path without extension>_te_outputs.npz`` beside the image, with
kohya's SDXL keys ``hidden_state1`` (CLIP-L), ``hidden_state2`` (bigG) and ``pool2`` (bigG's pooled
text), float32 without a batch dimension. kohya caches nothing for SD1/SD2; here the same file holds
the one text encoder's conditioning as ``hidden_state1`` plus ``clip_skip`` (0 for none), so a file
written with another ``--clip_skip`` (or by SDXL, which has other keys) is recomputed, not reused.
Both also hold ``text_encoder_fingerprint`` (``library.models.fingerprint``), so outputs of another
checkpoint's text encoder are recomputed too (kohya would train on them).
Existing valid files are reused. A caption must then be the same every epoch, so options that
change it per step are refused before anything is encoded.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from library.data.captions import process_caption
from library.data.dataset_config import DatasetBlueprint
from library.data.dataset_group import DatasetGroup
from library.data.latent_cache import save_npz
from library.errors import ConfigError
from library.models.fingerprint import weights_fingerprint

TE_OUTPUTS_SUFFIX = "_te_outputs.npz"
TE_OUTPUT_KEYS = ("hidden_state1", "hidden_state2", "pool2")  # kohya's SDXL keys
CAPTION_KEY = "caption"  # ours, not kohya's: the processed caption a file's outputs encode
SD_TE_OUTPUT_KEYS = ("hidden_state1",)  # SD1/SD2: the UNet's conditioning (clip skip applied)
TE_FINGERPRINT_KEY = "text_encoder_fingerprint"  # ours: which text encoder wrote the file
# Caption options that change a caption between steps (kohya's list, plus per-epoch dropout).
_CHANGING_OPTIONS = (
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_step",
)

TextOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def te_outputs_npz_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + TE_OUTPUTS_SUFFIX)


def check_text_encoder_outputs_cacheable(blueprints: Iterable[DatasetBlueprint]) -> None:
    """One line naming the subset and option when a caption would change while its encoding is cached."""
    for blueprint in blueprints:
        for subset in blueprint.subsets:
            for option in _CHANGING_OPTIONS:
                if getattr(subset.caption, option):
                    raise ConfigError(
                        f"--cache_text_encoder_outputs cannot be used with {option} ({subset.where}): "
                        "cached captions must not change between steps"
                    )


def _load_valid(path: Path, chunks_length: int, keys: tuple[str, ...], extra: dict[str, object]) -> TextOutputs | None:
    """The file's outputs when it holds exactly ``keys`` and ``extra`` for ``chunks_length`` tokens."""
    try:
        with np.load(path) as npz:
            if set(npz.files) != set(keys) | set(extra) or npz["hidden_state1"].shape[0] != chunks_length:
                return None
            if any(npz[name].tolist() != value for name, value in extra.items()):
                return None
            return tuple(torch.from_numpy(npz[key]) for key in keys)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def cache_text_encoder_outputs(
    groups: list[DatasetGroup | None],
    encode: Callable[[list[str]], TextOutputs],
    *,
    to_disk: bool,
    batch_size: int = 8,
    keys: tuple[str, ...] = TE_OUTPUT_KEYS,
    extra: dict[str, object] | None = None,
    text_encoders: Sequence[torch.nn.Module] = (),
) -> dict[str, TextOutputs]:
    """{image key: outputs named by ``keys``} for every image of ``groups``, on the CPU.

    ``encode(captions)`` returns batched outputs, one per key; captions are processed as a training
    step would (prefix/suffix, keep-tokens separator), with nothing random left to apply. ``extra``
    names scalars a file must also hold to be reused (SD1/SD2: ``clip_skip``). Each file also holds
    the caption it encodes (``caption``, beside kohya's keys, which kohya's loaders ignore) and the
    fingerprint of ``text_encoders``: a file whose caption was edited since, one another checkpoint
    wrote, or one without them (written by kohya), is encoded again.
    """
    extra = dict(extra or {})
    if to_disk and text_encoders:
        extra[TE_FINGERPRINT_KEY] = weights_fingerprint(*text_encoders)
    jobs: dict[str, tuple[Path, str]] = {}
    for group in groups:
        if group is None:
            continue
        for dataset in group.datasets:
            for record in dataset.records:
                options = dataset.subsets[record.subset_index].caption
                rng = np.random.default_rng(0)
                caption = process_caption(record.caption, options, rng, epoch=1, step=0, max_train_steps=0)
                jobs[record.key] = (record.path, caption)
    cache: dict[str, TextOutputs] = {}
    todo, length = [], group_length(groups)
    for key, (path, caption) in jobs.items():
        expected = {**extra, CAPTION_KEY: caption}
        found = _load_valid(te_outputs_npz_path(path), length, keys, expected) if to_disk else None
        if found is not None:
            cache[key] = found
        else:
            todo.append(key)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        with torch.no_grad():
            outputs = [t.float().cpu() for t in encode([jobs[key][1] for key in batch])]
        for index, key in enumerate(batch):
            cache[key] = tuple(t[index].clone() for t in outputs)
            if to_disk:
                arrays = dict(zip(keys, (t.numpy() for t in cache[key])))
                arrays.update({name: np.array(value) for name, value in extra.items()})
                arrays[CAPTION_KEY] = np.array(jobs[key][1])
                # a fresh file: keys of another model family's cache must not survive beside these
                save_npz(te_outputs_npz_path(jobs[key][0]), arrays, keep_old_keys=False)
    return cache


def group_length(groups: list[DatasetGroup | None]) -> int:
    """Hidden-state length of the groups' captions: 77, or 152/227 with --max_token_length 150/225."""
    for group in groups:
        if group is not None:
            return 77 if group.max_token_length in (None, 75) else group.max_token_length + 2
    return 77


def batch_text_outputs(cache: dict[str, TextOutputs], image_keys: list[str], device) -> TextOutputs:
    """The cached outputs of a batch, stacked and moved to ``device``."""
    width = len(cache[image_keys[0]])
    return tuple(torch.stack([cache[key][i] for key in image_keys]).to(device) for i in range(width))
