"""Training batches from dataset blueprints: kohya's bucketed datasets as one torch ``Dataset``.

As in kohya, an item is a whole batch from one bucket of one dataset, and the DataLoader runs with
``batch_size=1``. What differs is where randomness lives: the batch order of an epoch is a pure
function of ``(seed, epoch)``, and a batch's augmentations and captions of ``(seed, epoch, index)``.
The sampler hands each worker the epoch with the index, so batches are the same for any number
of workers, persistent or not, and every process of a multi-GPU run plans the same epoch, which
lets accelerate shard it into disjoint parts.

The loop::

    group = build_dataset_group(build_blueprints(args), tokenizer, max_token_length=args.max_token_length,
                                seed=args.seed)
    if args.cache_latents or args.cache_latents_to_disk:
        group.cache_latents(vae, vae_batch_size=args.vae_batch_size, to_disk=args.cache_latents_to_disk,
                            device=accelerator.device, dtype=vae_dtype,
                            process_index=accelerator.process_index, num_processes=accelerator.num_processes)
        accelerator.wait_for_everyone()
    dataloader = accelerator.prepare(make_dataloader(group, n_workers, args.persistent_data_loader_workers))
    group.set_max_train_steps(max_train_steps)
    for epoch in range(first_epoch, num_epochs):
        group.set_current_epoch(epoch + 1)  # before iterating; epochs count from 1
        for batch in dataloader:
            latents = batch_latents(batch, vae)  # scaled by the VAE scaling factor
            ...
            group.set_current_step(global_step)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from library.data.bucketed_dataset import BucketedDataset, build_bucketed_dataset
from library.data.buckets import sdxl_size_conditioning
from library.data.captions import process_caption
from library.data.dataset_config import DatasetBlueprint
from library.data.image_sources import ImageRecord
from library.data.latent_cache import (
    NPZ_SUFFIX,
    CacheJob,
    encode_jobs,
    is_cache_valid,
    npz_path_for,
    remove_stale_temporaries,
)
from library.data.loss_masks import collate_loss_masks, conditioning_mask
from library.data.metadata import dataset_metadata
from library.data.samples import cached_sample, image_sample
from library.errors import DatasetError
from library.models.fingerprint import weights_fingerprint
from library.models.text_encoding import tokenize_captions

logger = logging.getLogger(__name__)


class BatchKey(NamedTuple):
    """What the sampler hands a worker: which batch of which epoch, and the current global step."""

    epoch: int
    index: int
    step: int = 0


@dataclass(frozen=True)
class PlannedBatch:
    dataset_index: int
    record_indices: tuple[int, ...]


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run as one map-style dataset whose items are whole batches.

    Index it with the :class:`BatchKey` values :func:`make_dataloader`'s sampler produces; an int
    index means "this batch of the current epoch". ``len()`` is the number of batches per epoch
    (kohya: the sum over datasets and buckets of ``ceil(images / batch_size)``).
    """

    def __init__(
        self, datasets: list[BucketedDataset], tokenizer, *, max_token_length: int | None = None, seed: int = 0
    ):
        if not isinstance(seed, int):
            raise TypeError("seed must be an int shared by all processes (draw one when --seed is not given)")
        self.datasets = datasets
        # SDXL passes both tokenizers: batches then hold input_ids2 too (kohya's batch keys).
        self.tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.tokenizer = self.tokenizers[0]
        self.latent_cache_suffix = NPZ_SUFFIX  # SDXL trainers set SDXL_NPZ_SUFFIX
        self.max_token_length = max_token_length
        self.seed = seed % 2**63
        self.current_epoch = 1
        self.current_step = 0
        self.max_train_steps = 0
        self._plan: tuple[int, list[PlannedBatch]] | None = None

    def __len__(self) -> int:
        return sum(dataset.num_batches() for dataset in self.datasets)

    @property
    def num_train_images(self) -> int:
        return sum(dataset.num_train_images for dataset in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(dataset.num_reg_images for dataset in self.datasets)

    def set_current_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``iter(dataloader)`` plans; epochs count from 1, as in kohya."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, got {epoch}")
        self.current_epoch = epoch

    def set_current_step(self, step: int) -> None:
        """The global step, for ``token_warmup_step``."""
        self.current_step = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """The run length, for a ``token_warmup_step`` given as a fraction (< 1)."""
        self.max_train_steps = max_train_steps

    def epoch_plan(self, epoch: int) -> list[PlannedBatch]:
        """The batches of ``epoch`` in order: each bucket shuffled and cut, then all batches shuffled."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for dataset_index, dataset in enumerate(self.datasets):
                size = dataset.blueprint.batch_size
                for members in dataset.buckets.values():
                    shuffled = [members[i] for i in rng.permutation(len(members))]
                    batches += [
                        PlannedBatch(dataset_index, tuple(shuffled[i : i + size]))
                        for i in range(0, len(shuffled), size)
                    ]
            self._plan = (epoch, [batches[i] for i in rng.permutation(len(batches))])
        return self._plan[1]

    def __getitem__(self, key: BatchKey | int) -> dict:
        if not isinstance(key, BatchKey):
            key = BatchKey(self.current_epoch, int(key), self.current_step)
        planned = self.epoch_plan(key.epoch)[key.index]
        dataset = self.datasets[planned.dataset_index]
        rng = np.random.default_rng([self.seed, key.epoch, key.index, 1])
        samples = [self._sample(dataset, dataset.records[i], rng, key) for i in planned.record_indices]
        return self._collate(samples)

    def _sample(self, dataset: BucketedDataset, record: ImageRecord, rng: np.random.Generator, key: BatchKey) -> dict:
        subset = dataset.subsets[record.subset_index]
        flipped = subset.flip_aug and rng.random() < 0.5
        if record.latents is not None or record.npz_path is not None:
            sample = cached_sample(record, flipped)
        else:
            sample = image_sample(dataset, record, subset, flipped, rng)
        if record.mask_path is not None:
            interpolation = subset.resize_interpolation or dataset.blueprint.resize_interpolation
            sample["conditioning_mask"] = conditioning_mask(record, interpolation, flipped)
        sample["caption"] = process_caption(
            record.caption,
            subset.caption,
            rng,
            epoch=key.epoch,
            step=key.step,
            max_train_steps=self.max_train_steps,
        )
        sample["size_conditioning"] = sdxl_size_conditioning(
            record.size, record.bucket, flipped=flipped, bucketed=dataset.blueprint.buckets.enable_bucket
        )
        sample["loss_weight"] = dataset.blueprint.prior_loss_weight if record.is_reg else 1.0
        sample["image_key"] = record.key
        sample["custom_attributes"] = subset.custom_attributes
        return sample

    def _collate(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        batch = {
            "input_ids": tokenize_captions(self.tokenizer, captions, self.max_token_length),
            **{
                f"input_ids{i + 1}": tokenize_captions(tokenizer, captions, self.max_token_length)
                for i, tokenizer in enumerate(self.tokenizers[1:], start=1)
            },
            "captions": captions,
            "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
            "image_keys": [s["image_key"] for s in samples],
            "custom_attributes": [s["custom_attributes"] for s in samples],
        }
        for index, key in enumerate(("original_sizes_hw", "crop_top_lefts", "target_sizes_hw")):
            batch[key] = torch.tensor([s["size_conditioning"][index] for s in samples], dtype=torch.long)
        pixel_key = "latents" if "latents" in samples[0] else "images"
        batch[pixel_key] = torch.stack([s[pixel_key] for s in samples])
        collate_loss_masks(samples, batch, pixel_key)
        return batch

    def cache_latents(
        self,
        vae,
        *,
        vae_batch_size: int = 1,
        to_disk: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        """VAE-encode every image once: into memory, or into kohya's ``.npz`` files beside the images.

        With ``to_disk``, existing valid files are reused (not those another VAE wrote), and image i
        (in a fixed order) is encoded by process ``i % num_processes``; call
        ``accelerator.wait_for_everyone()`` after. The VAE must already be on ``device`` in ``dtype``.
        """
        memory_jobs, disk_jobs, reused = [], [], 0
        claimed: dict = {}
        fingerprint = weights_fingerprint(vae) if to_disk else None
        for job in self._cache_jobs():
            record = job.record
            if not to_disk:
                memory_jobs.append(job)
                continue
            path = npz_path_for(record.path, record.size, self.latent_cache_suffix)
            if path in claimed:
                # The same image in two datasets: share the file, or, at another size, keep this one in memory.
                if claimed[path] == job.condition:
                    record.npz_path = path
                else:
                    memory_jobs.append(job)
                continue
            claimed[path] = job.condition
            record.npz_path = path
            if (len(claimed) - 1) % num_processes != process_index:
                continue
            if is_cache_valid(path, record.bucket, job.flip_aug, job.use_alpha_mask, fingerprint):
                reused += 1
            else:
                disk_jobs.append(job)
        if process_index == 0:
            remove_stale_temporaries({path.parent for path in claimed})
        options = dict(batch_size=vae_batch_size, device=device, dtype=dtype, seed=self.seed + process_index)
        show = process_index == 0
        encode_jobs(disk_jobs, vae, to_disk=True, show_progress=show, vae_fingerprint=fingerprint, **options)
        encode_jobs(memory_jobs, vae, to_disk=False, show_progress=show, **options)
        logger.info("latents: %d encoded, %d reused from disk", len(disk_jobs) + len(memory_jobs), reused)

    def _cache_jobs(self) -> list[CacheJob]:
        """One job per record, in an order every process agrees on."""
        jobs = []
        for dataset in self.datasets:
            for record in dataset.records:
                subset = dataset.subsets[record.subset_index]
                interpolation = subset.resize_interpolation or dataset.blueprint.resize_interpolation
                jobs.append(CacheJob(record, subset.flip_aug, subset.alpha_mask, interpolation))
        return sorted(jobs, key=lambda job: (str(job.record.path), job.condition))

    def metadata(
        self,
        *,
        validation: DatasetGroup | None = None,
        num_processes: int = 1,
        gradient_accumulation_steps: int = 1,
    ) -> dict[str, str]:
        """The dataset-related ``ss_*`` metadata, formatted as kohya formats it (see dataset_metadata)."""
        return dataset_metadata(
            self,
            validation=validation,
            num_processes=num_processes,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )


class EpochSampler(Sampler):
    """Yields the :class:`BatchKey` of each batch of the group's current epoch, in order.

    It runs in the main process (and in each accelerate process before sharding), so
    ``set_current_epoch`` reaches persistent workers through the keys.
    """

    def __init__(self, group: DatasetGroup):
        self.group = group

    def __len__(self) -> int:
        return len(self.group)

    def __iter__(self):
        epoch = self.group.current_epoch
        for index in range(len(self.group)):
            yield BatchKey(epoch, index, self.group.current_step)


def _single_item(items: list[dict]) -> dict:
    return items[0]


def make_dataloader(group: DatasetGroup, num_workers: int = 0, persistent_workers: bool = False) -> DataLoader:
    """A DataLoader over whole batches (kohya: ``batch_size=1``), ready for ``accelerator.prepare``.

    accelerate shards it by batch: process p of n gets batches p, p+n, ... of the epoch's plan.
    Workers are capped at the CPU count, as in kohya; batches are pinned for faster copies to CUDA.
    The loader draws its worker seed from its own generator rather than the global RNG (which
    training noise uses; see also library.training.loop's batch fetching).
    """
    workers = min(num_workers, os.cpu_count() or 1)
    return DataLoader(
        group,
        sampler=EpochSampler(group),
        batch_size=1,
        collate_fn=_single_item,
        num_workers=workers,
        persistent_workers=persistent_workers and workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(group.seed),
    )


def build_dataset_group(
    blueprints: list[DatasetBlueprint], tokenizer, *, max_token_length: int | None = None, seed: int = 0
) -> DatasetGroup:
    """Load every dataset of the run (their training part); raise if no training image is left."""
    datasets = [build_bucketed_dataset(blueprint, seed=seed) for blueprint in blueprints]
    if not any(dataset.num_train_images for dataset in datasets):
        sources = ", ".join(subset.where for blueprint in blueprints for subset in blueprint.subsets)
        raise DatasetError(f"no training images found ({sources})")
    for dataset in datasets:
        _log_summary(dataset)
    return DatasetGroup(datasets, tokenizer, max_token_length=max_token_length, seed=seed)


def build_validation_group(
    blueprints: list[DatasetBlueprint], tokenizer, *, max_token_length: int | None = None, seed: int = 0
) -> DatasetGroup | None:
    """The validation part of the datasets with ``validation_split``, or ``None`` when none has one.

    ``seed`` must be the one given to :func:`build_dataset_group`, so that the parts are disjoint.
    """
    datasets = [
        build_bucketed_dataset(blueprint, validation=True, seed=seed)
        for blueprint in blueprints
        if blueprint.validation_split > 0
    ]
    datasets = [dataset for dataset in datasets if dataset.records]
    if not datasets:
        return None
    for dataset in datasets:
        _log_summary(dataset)
    return DatasetGroup(datasets, tokenizer, max_token_length=max_token_length, seed=seed)


def batch_latents(batch: dict, vae, *, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """The batch's latents times the VAE scaling factor (0.18215), encoding its images if not cached.

    Cached latents go to ``device`` (default: the VAE's, which may stay on the CPU once caching is done).
    """
    if "latents" in batch:
        latents = batch["latents"].to(device or vae.device)
    else:
        with torch.no_grad():
            latents = vae.encode(batch["images"].to(vae.device, vae.dtype)).latent_dist.sample()
        latents = latents.to(device or latents.device)
    return latents.to(dtype or latents.dtype) * vae.config.scaling_factor


def _log_summary(dataset: BucketedDataset) -> None:
    blueprint = dataset.blueprint
    logger.info(
        "%s: %d train images, %d reg images (with repeats), batch size %d, %d batches",
        blueprint.where,
        dataset.num_train_images,
        dataset.num_reg_images,
        blueprint.batch_size,
        dataset.num_batches(),
    )
    for reso, members in dataset.buckets.items():
        logger.info("  bucket %dx%d: %d images (with repeats)", reso[0], reso[1], len(members))
