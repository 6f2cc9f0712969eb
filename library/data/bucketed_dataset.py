"""One ``[[datasets]]`` entry loaded: its subsets' images, balanced reg images, buckets and counts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from library.data.buckets import Size, select_bucket
from library.data.captions import count_tags
from library.data.dataset_config import DatasetBlueprint, SubsetBlueprint
from library.data.image_sources import ImageRecord, load_subset_images
from library.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass
class BucketedDataset:
    """One blueprint's images (train, then the balanced reg images), bucketed, and kohya's counts."""

    blueprint: DatasetBlueprint
    subsets: list[SubsetBlueprint]  # those kept (kohya skips empty, duplicate and 0-repeat subsets)
    image_counts: list[int]  # kohya's img_count per kept subset
    records: list[ImageRecord]
    buckets: dict[Size, list[int]]  # bucket -> record indices, each repeated num_repeats times
    tag_frequency: dict[str, dict[str, int]]
    num_train_images: int  # with repeats
    num_reg_images: int  # with repeats, before balancing

    def num_batches(self) -> int:
        return sum(math.ceil(len(members) / self.blueprint.batch_size) for members in self.buckets.values())

    def bucket_info(self) -> dict | None:
        """kohya's ``bucket_info`` for metadata; ``None`` without bucketing."""
        if not self.blueprint.buckets.enable_bucket:
            return None
        errors = [abs(record.aspect_ratio_error) for record in self.records]
        return {
            "buckets": {i: {"resolution": reso, "count": len(m)} for i, (reso, m) in enumerate(self.buckets.items())},
            "mean_img_ar_error": np.mean(errors) if errors else 0,
        }


def build_bucketed_dataset(blueprint: DatasetBlueprint, *, validation: bool = False, seed: int = 0) -> BucketedDataset:
    """Load the subsets' images and captions, balance regularization images, assign buckets.

    With ``validation_split``, the training part (``validation=False``) or the validation part of
    each non-reg subset is kept; validation images have 1 repeat and no reg images, as in kohya.
    """
    subsets, counts, train, reg, tag_frequency = [], [], [], [], {}
    for subset in blueprint.subsets:
        if subset.num_repeats < 1:
            logger.warning("%s: skipped, num_repeats is %d", subset.where, subset.num_repeats)
            continue
        if any(_same_source(subset, kept) for kept in subsets):
            logger.warning("%s: skipped, the same image_dir/metadata_file is already in this dataset", subset.where)
            continue
        images = load_subset_images(subset, len(subsets))
        records = images.records
        if records and blueprint.validation_split > 0:
            records = _split_for_validation(records, blueprint, subset, validation, seed)
        if subset.metadata_file is None:  # kohya counts DreamBooth captions, and fine-tuning tags
            _add_tag_counts(tag_frequency, images.tag_frequency_name, [r.caption for r in records])
        elif records:
            _add_tag_counts(tag_frequency, images.tag_frequency_name, images.counted_captions)
        if not images.records:
            source = subset.image_dir or subset.metadata_file
            logger.warning("%s: skipped, no images found in %s", subset.where, source)
        if not records:
            continue
        subsets.append(subset)
        counts.append(len(records))
        (reg if subset.is_reg else train).extend(records)
    num_train = sum(r.num_repeats for r in train)
    num_reg = sum(r.num_repeats for r in reg)
    records = train + _balance_regularization(reg, num_train, blueprint.where)
    buckets = _assign_buckets(records, blueprint)
    return BucketedDataset(blueprint, subsets, counts, records, buckets, tag_frequency, num_train, num_reg)


def _add_tag_counts(tag_frequency: dict[str, dict[str, int]], name: str, captions: list[str]) -> None:
    counted = tag_frequency.setdefault(name, {})
    for tag, count in count_tags(captions).items():
        counted[tag] = counted.get(tag, 0) + count


def _split_for_validation(
    records: list[ImageRecord], blueprint: DatasetBlueprint, subset: SubsetBlueprint, validation: bool, seed: int
) -> list[ImageRecord]:
    """kohya's split_train_val: shuffle, then the first ceil(n * (1 - split)) images train.

    kohya shuffles with the unseeded global RNG when validation_seed is unset (train and validation
    sets may then overlap) and sizes the validation part with round(), which can overlap too; here
    the shuffle is seeded and the validation part is exactly the rest.
    """
    if subset.is_reg:
        return [] if validation else records
    validation_seed = blueprint.validation_seed if blueprint.validation_seed is not None else seed
    order = np.random.default_rng([validation_seed % 2**63]).permutation(len(records))
    shuffled = [records[i] for i in order]
    train_count = math.ceil(len(records) * (1 - blueprint.validation_split))
    if not validation:
        return shuffled[:train_count]
    for record in shuffled[train_count:]:
        record.num_repeats = 1
    return shuffled[train_count:]


def _same_source(a: SubsetBlueprint, b: SubsetBlueprint) -> bool:
    if a.metadata_file is not None:
        return a.metadata_file == b.metadata_file
    return a.image_dir == b.image_dir


def _balance_regularization(reg: list[ImageRecord], num_train: int, where: str) -> list[ImageRecord]:
    """kohya's rule: take reg images in order until their repeats reach the train total, then add
    one repeat at a time round-robin; reg images beyond the train total are not used."""
    if not reg:
        return []
    if sum(r.num_repeats for r in reg) > num_train:
        logger.warning("%s: more regularization images than training images; some are not used", where)
    used, total = [], 0
    for record in reg:
        if total >= num_train:
            break
        used.append(record)
        total += record.num_repeats
    for extra in range(num_train - total):
        used[extra % len(used)].num_repeats += 1
    return used


def _assign_buckets(records: list[ImageRecord], blueprint: DatasetBlueprint) -> dict[Size, list[int]]:
    settings = blueprint.buckets
    predefined = settings.predefined_resolutions()
    members: dict[Size, list[int]] = {}
    for index, record in enumerate(records):
        try:
            choice = select_bucket(record.size, settings, predefined)
        except DatasetError as error:
            raise DatasetError(f"{record.path}: {error}") from error
        record.bucket, record.resized_size, record.aspect_ratio_error = (
            choice.bucket,
            choice.resized_size,
            choice.aspect_ratio_error,
        )
        members.setdefault(choice.bucket, []).extend([index] * record.num_repeats)
    return dict(sorted(members.items()))
