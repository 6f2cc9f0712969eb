"""Finding a subset's images and captions: DreamBooth folders and fine-tuning metadata files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from library.data.buckets import Size
from library.data.captions import read_caption_file
from library.data.dataset_config import SubsetBlueprint
from library.data.images import IMAGE_EXTENSIONS, list_images, load_image, read_image_size
from library.errors import DatasetError

logger = logging.getLogger(__name__)

# kohya's per-folder cache of image sizes and captions (--cache_info / cache_info = true).
IMAGE_INFO_CACHE_FILE = "metadata_cache.json"
MISSING_CAPTIONS_SHOWN = 5


@dataclass(eq=False)
class ImageRecord:
    """One training image: where it is, its caption, repeats, bucket, and cached latents if any."""

    path: Path
    key: str  # kohya's image key: the path for DreamBooth, the metadata key for fine-tuning
    caption: str  # before per-epoch processing
    subset_index: int
    is_reg: bool
    num_repeats: int
    size: Size
    bucket: Size = (0, 0)
    resized_size: Size = (0, 0)
    aspect_ratio_error: float = 0.0
    latents: torch.Tensor | None = None  # (4, h, w) float32, unscaled VAE sample
    latents_flipped: torch.Tensor | None = None
    cached_alpha_mask: torch.Tensor | None = None  # (H, W), stored with in-memory latents
    npz_path: Path | None = None  # set when the latents live in a disk cache
    mask_path: Path | None = None  # the loss mask image from the subset's conditioning_data_dir


@dataclass
class SubsetImages:
    """A subset's images, and what kohya counts for ``ss_tag_frequency`` under which name."""

    records: list[ImageRecord]
    tag_frequency_name: str  # the folder name (DreamBooth) or metadata file name (fine-tuning)
    counted_captions: list[str] = field(default_factory=list)  # fine-tuning: the metadata tags


def load_record_image(record: ImageRecord, with_alpha: bool = False) -> np.ndarray:
    """The record's pixels; its size must be the one its bucket was chosen for."""
    image = load_image(record.path, with_alpha=with_alpha)
    if image.shape[1::-1] != tuple(record.size):
        raise DatasetError(
            f"{record.path} is {image.shape[1]}x{image.shape[0]} but was recorded as "
            f"{record.size[0]}x{record.size[1]} (stale {IMAGE_INFO_CACHE_FILE} or image_size in the metadata file?)"
        )
    return image


def load_subset_images(subset: SubsetBlueprint, subset_index: int) -> SubsetImages:
    if subset.metadata_file is not None:
        return _load_fine_tuning(subset, subset_index)
    return _load_dreambooth(subset, subset_index)


def _load_dreambooth(subset: SubsetBlueprint, subset_index: int) -> SubsetImages:
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        raise DatasetError(f"{subset.where}: image_dir is not a folder: {folder}")
    cache_file = folder / IMAGE_INFO_CACHE_FILE
    if subset.cache_info and cache_file.is_file():
        paths, captions, sizes = _read_info_cache(cache_file)
    else:
        paths = list_images(folder)
        captions = _dreambooth_captions(paths, subset)
        sizes = [read_image_size(path) for path in paths]
        if subset.cache_info and paths:
            _write_info_cache(cache_file, paths, captions, sizes)
    records = [
        ImageRecord(path, str(path), caption, subset_index, subset.is_reg, subset.num_repeats, size)
        for path, caption, size in zip(paths, captions, sizes)
    ]
    if subset.conditioning_data_dir is not None:
        _pair_mask_images(records, subset)
    return SubsetImages(records, folder.name)


def _pair_mask_images(records: list[ImageRecord], subset: SubsetBlueprint) -> None:
    """Each image's mask is the conditioning_data_dir image with its stem; none may be missing or spare (kohya)."""
    folder = Path(subset.conditioning_data_dir)
    if not folder.is_dir():
        raise DatasetError(f"{subset.where}: conditioning_data_dir is not a folder: {folder}")
    masks: dict[str, Path] = {}
    for path in list_images(folder):
        masks.setdefault(path.stem, path)
    missing = [record.path.name for record in records if record.path.stem not in masks]
    if missing:
        shown = ", ".join(missing[:MISSING_CAPTIONS_SHOWN])
        raise DatasetError(f"{subset.where}: no mask image in {folder} for {shown}")
    spare = sorted(set(masks) - {record.path.stem for record in records})
    if spare:
        shown = ", ".join(spare[:MISSING_CAPTIONS_SHOWN])
        raise DatasetError(f"{subset.where}: mask images in {folder} without a training image: {shown}")
    for record in records:
        record.mask_path = masks[record.path.stem]


def _dreambooth_captions(paths: list[Path], subset: SubsetBlueprint) -> list[str]:
    """Caption files, else the class tokens, else an empty caption (kohya's rule), with warnings."""
    captions, missing = [], []
    for path in paths:
        caption = read_caption_file(path, subset.caption_extension, subset.caption.enable_wildcard)
        if caption is None:
            missing.append(path.name)
            caption = subset.class_tokens if subset.class_tokens is not None else ""
        captions.append(caption)
    if missing:
        shown = ", ".join(missing[:MISSING_CAPTIONS_SHOWN])
        more = f" and {len(missing) - MISSING_CAPTIONS_SHOWN} more" if len(missing) > MISSING_CAPTIONS_SHOWN else ""
        fallback = f"class tokens '{subset.class_tokens}'" if subset.class_tokens is not None else "an empty caption"
        logger.warning(
            "%s: no %s caption file for %s%s in %s; using %s",
            subset.where,
            subset.caption_extension,
            shown,
            more,
            subset.image_dir,
            fallback,
        )
    return captions


def _read_info_cache(cache_file: Path) -> tuple[list[Path], list[str], list[Size]]:
    try:
        entries = json.loads(cache_file.read_text(encoding="utf-8"))
        return (
            [Path(p) for p in entries],
            [e["caption"] for e in entries.values()],
            [tuple(e["resolution"]) for e in entries.values()],
        )
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise DatasetError(f"broken image info cache {cache_file} ({error}); delete it to rebuild it") from error


def _write_info_cache(cache_file: Path, paths: list[Path], captions: list[str], sizes: list[Size]) -> None:
    entries = {str(p): {"caption": c, "resolution": list(s)} for p, c, s in zip(paths, captions, sizes)}
    cache_file.write_text(json.dumps(entries, ensure_ascii=False, indent=2), encoding="utf-8")


def _load_fine_tuning(subset: SubsetBlueprint, subset_index: int) -> SubsetImages:
    metadata_file = Path(subset.metadata_file)
    metadata = _read_metadata(metadata_file, subset.where)
    image_dir = Path(subset.image_dir) if subset.image_dir is not None else None
    separator = subset.caption.caption_separator
    records, tags_list = [], []
    for key, entry in metadata.items():
        if not isinstance(entry, dict):
            raise DatasetError(f"{metadata_file}: entry '{key}' must be an object with 'caption' and/or 'tags'")
        path = _resolve_image(key, image_dir, metadata_file)
        caption, tags = entry.get("caption") or "", entry.get("tags")
        if subset.caption.enable_wildcard and tags is not None:
            # kohya adds the tags to every line, so each wildcard line keeps them
            tags = tags.replace("\n", separator)
            caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
            tags_list.append(tags)
        elif tags:
            caption = caption + separator + tags if caption else tags
            tags_list.append(tags)
        size = tuple(entry["image_size"]) if entry.get("image_size") else read_image_size(path)
        records.append(ImageRecord(path, key, caption, subset_index, False, subset.num_repeats, size))
    return SubsetImages(records, metadata_file.name, tags_list)


def _read_metadata(metadata_file: Path, where: str) -> dict:
    """kohya's fine-tuning metadata: a JSON object keyed by image, or JSONL lines with ``image_path``."""
    if not metadata_file.is_file():
        raise DatasetError(f"{where}: metadata_file not found: {metadata_file}")
    text = metadata_file.read_text(encoding="utf-8")
    try:
        if metadata_file.suffix.lower() == ".jsonl":
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            return {line["image_path"]: line for line in lines}
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{metadata_file}: not valid JSON: {error}") from error
    except (KeyError, TypeError) as error:
        raise DatasetError(f"{metadata_file}: every JSONL line needs an 'image_path'") from error
    if not isinstance(metadata, dict):
        raise DatasetError(f"{metadata_file}: must be a JSON object mapping images to captions/tags")
    return metadata


def _resolve_image(key: str, image_dir: Path | None, metadata_file: Path) -> Path:
    """The image file of a metadata key: absolute, or relative to image_dir; kohya's older tools
    wrote keys without the extension, so those are tried with each image extension."""
    key_path = Path(key)
    if not key_path.is_absolute():
        if image_dir is None:
            raise DatasetError(f"{metadata_file}: image '{key}' is a relative path; set image_dir (--train_data_dir)")
        key_path = image_dir / key_path
    candidates = [key_path]
    if key_path.suffix.lower() not in IMAGE_EXTENSIONS:
        candidates += [key_path.with_name(key_path.name + ext) for ext in IMAGE_EXTENSIONS]
        candidates += [key_path.with_name(key_path.name + ext.upper()) for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{metadata_file}: image '{key}' does not exist ({key_path})")
