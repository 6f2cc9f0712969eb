"""The dataset-related ``ss_*`` metadata of a LoRA file, formatted exactly as kohya's train_network.py.

kohya writes ``str(value)`` for every key (``None`` -> ``"None"``, a tuple -> ``"(512, 512)"``) and
``json.dumps`` for the nested ones. With ``--dataset_config`` the per-dataset details go into one
``ss_datasets`` JSON list; from the command line they are flat keys of the single dataset.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from library.data.bucketed_dataset import BucketedDataset


class BatchedDatasets(Protocol):
    """What the metadata reads of a dataset group (``DatasetGroup``, which imports this module)."""

    datasets: Sequence[BucketedDataset]
    num_train_images: int
    num_reg_images: int

    def __len__(self) -> int: ...


def dataset_metadata(
    group: BatchedDatasets,
    *,
    validation: BatchedDatasets | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
) -> dict[str, str]:
    """``ss_num_train_images``, ``ss_num_batches_per_epoch``, ..., as strings.

    ``ss_num_batches_per_epoch`` is kohya's ``len(train_dataloader)`` after ``accelerator.prepare``,
    i.e. per process: ``ceil(batches / num_processes)``.
    """
    metadata: dict[str, Any] = {
        "ss_num_train_images": group.num_train_images,
        "ss_num_validation_images": validation.num_train_images if validation is not None else 0,
        "ss_num_reg_images": group.num_reg_images,
        "ss_num_batches_per_epoch": math.ceil(len(group) / num_processes),
    }
    if group.datasets[0].blueprint.from_dataset_config:
        metadata.update(_dataset_config_form(group.datasets))
    else:
        total_batch_size = group.datasets[0].blueprint.batch_size * num_processes * gradient_accumulation_steps
        metadata.update(_command_line_form(group.datasets[0], total_batch_size))
    return {key: str(value) for key, value in metadata.items()}


def _command_line_form(dataset: BucketedDataset, total_batch_size: int) -> dict[str, Any]:
    blueprint, buckets = dataset.blueprint, dataset.blueprint.buckets
    flags = blueprint.subsets[0]  # command-line subsets all carry the flag values
    dirs, reg_dirs = {}, {}
    for subset, count in zip(dataset.subsets, dataset.image_counts):
        name = os.path.basename(subset.metadata_file or subset.image_dir)
        (reg_dirs if subset.is_reg else dirs)[name] = {"n_repeats": subset.num_repeats, "img_count": count}
    return {
        "ss_batch_size_per_device": blueprint.batch_size,
        "ss_total_batch_size": total_batch_size,
        "ss_resolution": tuple(buckets.resolution),
        "ss_color_aug": flags.color_aug,
        "ss_flip_aug": flags.flip_aug,
        "ss_random_crop": flags.random_crop,
        "ss_shuffle_caption": flags.caption.shuffle_caption,
        "ss_enable_bucket": buckets.enable_bucket,
        "ss_bucket_no_upscale": buckets.bucket_no_upscale,
        "ss_min_bucket_reso": buckets.min_bucket_reso,
        "ss_max_bucket_reso": buckets.max_bucket_reso,
        "ss_keep_tokens": flags.caption.keep_tokens,
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency),
        "ss_bucket_info": json.dumps(dataset.bucket_info()),
    }


def _dataset_config_form(datasets: list[BucketedDataset]) -> dict[str, str]:
    datasets_metadata, tag_frequency, dirs = [], {}, {}
    for dataset in datasets:
        datasets_metadata.append(_dataset_entry(dataset))
        for subset, count in zip(dataset.subsets, dataset.image_counts):
            if subset.is_reg:
                continue
            name = os.path.basename(subset.metadata_file or subset.image_dir)
            unique, copy = name, 2
            while unique in dirs:  # the same folder in several datasets: "name (2)", ...
                unique, copy = f"{name} ({copy})", copy + 1
            dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": count}
        for name, frequency in dataset.tag_frequency.items():
            tag_frequency.setdefault(name, frequency)  # counted once per folder, first dataset wins
    return {
        "ss_datasets": json.dumps(datasets_metadata),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dirs),
    }


def _dataset_entry(dataset: BucketedDataset) -> dict[str, Any]:
    blueprint, buckets = dataset.blueprint, dataset.blueprint.buckets
    return {
        "is_dreambooth": blueprint.is_dreambooth,
        "batch_size_per_device": blueprint.batch_size,
        "num_train_images": dataset.num_train_images,
        "num_reg_images": dataset.num_reg_images,
        "resolution": tuple(buckets.resolution),
        "enable_bucket": buckets.enable_bucket,
        "min_bucket_reso": buckets.min_bucket_reso,
        "max_bucket_reso": buckets.max_bucket_reso,
        "tag_frequency": dataset.tag_frequency,
        "bucket_info": dataset.bucket_info(),
        "resize_interpolation": blueprint.resize_interpolation,
        "subsets": [
            _subset_entry(s, n, blueprint.is_dreambooth) for s, n in zip(dataset.subsets, dataset.image_counts)
        ],
    }


def _subset_entry(subset, image_count: int, is_dreambooth: bool) -> dict[str, Any]:
    entry = {
        "img_count": image_count,
        "num_repeats": subset.num_repeats,
        "color_aug": subset.color_aug,
        "flip_aug": subset.flip_aug,
        "random_crop": subset.random_crop,
        "shuffle_caption": subset.caption.shuffle_caption,
        "keep_tokens": subset.caption.keep_tokens,
        "keep_tokens_separator": subset.caption.keep_tokens_separator,
        "secondary_separator": subset.caption.secondary_separator,
        "enable_wildcard": subset.caption.enable_wildcard,
        "caption_prefix": subset.caption.caption_prefix,
        "caption_suffix": subset.caption.caption_suffix,
        "resize_interpolation": subset.resize_interpolation,
    }
    if subset.image_dir:
        entry["image_dir"] = os.path.basename(subset.image_dir)
    if is_dreambooth:
        entry["class_tokens"] = subset.class_tokens
        entry["is_reg"] = subset.is_reg
    else:
        entry["metadata_file"] = os.path.basename(subset.metadata_file)
    return entry
