"""VAE latents of training images, encoded once and kept in memory or in kohya's ``.npz`` files.

Disk format (kohya's ``SdSdxlLatentsCachingStrategy``): ``<image stem>_<W:04d>x<H:04d>_sd.npz``
beside the image (W, H: original image size), or an existing legacy ``<image stem>.npz``, with
``latents`` (4, H/8, W/8) float32 -- the *unscaled* ``latent_dist.sample()`` --, ``original_size``
[w, h], ``crop_ltrb`` [l, t, r, b], ``latents_flipped`` with flip_aug and ``alpha_mask`` (H, W) with
alpha_mask. Unlike kohya, a cache whose latent shape does not match the image's bucket (left
from another resolution) is rebuilt instead of being trained on, and so is one written by another
VAE: files written here also hold ``vae_fingerprint`` (``library.models.fingerprint``; kohya's
loaders ignore the key). Files without it (kohya's) are trusted, as kohya trusts them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data.buckets import Size, crop_ltrb
from library.data.image_sources import ImageRecord, load_record_image
from library.data.images import alpha_mask, fit_to_bucket, to_tensor
from library.errors import DatasetError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

NPZ_SUFFIX = "_sd.npz"
SDXL_NPZ_SUFFIX = "_sdxl.npz"  # kohya names SDXL caches apart: the SDXL VAE's latents differ from SD1/2's
LEGACY_NPZ_SUFFIX = ".npz"
VAE_STRIDE = 8
LOAD_THREADS = 8
MIN_BATCHES_AHEAD = 2
# A write's temporary file older than this belongs to a run that was killed mid-write (one npz takes
# milliseconds); younger ones may belong to another process caching into the same folder right now.
STALE_TEMPORARY_AGE_S = 600.0
VAE_FINGERPRINT_KEY = "vae_fingerprint"


@dataclass(frozen=True)
class CacheJob:
    """One image to encode, with the options that change what is stored."""

    record: ImageRecord
    flip_aug: bool
    use_alpha_mask: bool
    interpolation: str | None

    @property
    def condition(self) -> tuple:
        """Images that share this may go through the VAE in one batch."""
        return (self.record.bucket, self.flip_aug, self.use_alpha_mask)


@dataclass(frozen=True)
class CachedLatents:
    latents: np.ndarray
    original_size: list[int]
    crop_ltrb: list[float]
    latents_flipped: np.ndarray | None
    alpha_mask: np.ndarray | None


def npz_path_for(image_path: Path, original_size: Size, suffix: str = NPZ_SUFFIX) -> Path:
    """kohya's cache file name (``suffix``: SD1/2's or SDXL's); an existing legacy ``<stem>.npz`` wins, as in kohya."""
    legacy = image_path.with_suffix(LEGACY_NPZ_SUFFIX)
    if legacy.is_file():
        return legacy
    return image_path.with_name(f"{image_path.stem}_{original_size[0]:04d}x{original_size[1]:04d}{suffix}")


def is_cache_valid(
    npz_path: Path, bucket: Size, flip_aug: bool, use_alpha_mask: bool, vae_fingerprint: str | None = None
) -> bool:
    """The file exists and holds everything this image needs, at this bucket's latent size.

    With ``vae_fingerprint``, a file that names another VAE's fingerprint is not valid.
    """
    if not npz_path.is_file():
        return False
    latent_hw = (bucket[1] // VAE_STRIDE, bucket[0] // VAE_STRIDE)
    try:
        with np.load(npz_path) as npz:
            if not {"latents", "original_size", "crop_ltrb"} <= set(npz.files):
                return False
            written_by = npz[VAE_FINGERPRINT_KEY].tolist() if VAE_FINGERPRINT_KEY in npz.files else None
            if vae_fingerprint is not None and written_by not in (None, vae_fingerprint):  # None: kohya's, trusted
                return False
            if npz["latents"].shape[1:] != latent_hw:
                return False
            if flip_aug and ("latents_flipped" not in npz.files or npz["latents_flipped"].shape[1:] != latent_hw):
                return False
            return not use_alpha_mask or ("alpha_mask" in npz.files and npz["alpha_mask"].shape == bucket[::-1])
    except (OSError, ValueError) as error:
        logger.warning("unreadable latent cache %s is rebuilt (%s)", npz_path, error)
        return False


def load_npz(npz_path: Path) -> CachedLatents:
    try:
        with np.load(npz_path) as npz:
            return CachedLatents(
                latents=npz["latents"],
                original_size=npz["original_size"].tolist(),
                crop_ltrb=npz["crop_ltrb"].tolist(),
                latents_flipped=npz["latents_flipped"] if "latents_flipped" in npz.files else None,
                alpha_mask=npz["alpha_mask"] if "alpha_mask" in npz.files else None,
            )
    except (OSError, ValueError, KeyError) as error:
        raise DatasetError(f"cannot read latent cache {npz_path}: {error}") from error


def save_npz(npz_path: Path, arrays: dict[str, np.ndarray], keep_old_keys: bool = True) -> None:
    """Write atomically, keeping keys already in the file (kohya keeps them, e.g. SDXL's) unless told not to."""
    if keep_old_keys and npz_path.is_file():
        try:
            with np.load(npz_path) as old:
                arrays = {**{key: old[key] for key in old.files}, **arrays}
        except (OSError, ValueError):
            pass
    # Not flushed to disk one by one (thousands of files): a cache lost to a power cut is unreadable
    # or missing, and is_cache_valid() has it rebuilt.
    with atomic_path(npz_path, durable=False) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)


def remove_stale_temporaries(folders: Iterable[Path], max_age_s: float = STALE_TEMPORARY_AGE_S) -> int:
    """Delete the ``.<name>.npz.<random>.tmp`` files that killed caching runs left in ``folders``."""
    removed, now = 0, time.time()
    for folder in folders:
        for tmp in folder.glob(".*.npz.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > max_age_s:
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass  # another process removed or renamed it first
    return removed


def encode_jobs(
    jobs: list[CacheJob],
    vae,
    *,
    to_disk: bool,
    batch_size: int,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int,
    show_progress: bool = True,
    vae_fingerprint: str | None = None,
) -> None:
    """Encode every job's image; fill the records in memory, or write their ``.npz`` files (with the fingerprint)."""
    jobs = sorted(jobs, key=lambda job: (job.condition, str(job.record.path)))
    batches = []
    for _, same_condition in groupby(jobs, key=lambda job: job.condition):
        same_condition = list(same_condition)
        batches += [same_condition[i : i + batch_size] for i in range(0, len(same_condition), batch_size)]
    generator = torch.Generator(device=device).manual_seed(seed)
    progress = tqdm(total=len(batches), desc="caching latents", unit="batch", disable=not show_progress or not batches)
    with progress:
        ahead = max(MIN_BATCHES_AHEAD, math.ceil(LOAD_THREADS / batch_size))
        for batch, images in _with_images_loaded_ahead(batches, ahead):
            _encode_batch(
                batch, images, vae, to_disk=to_disk, device=device, dtype=dtype, generator=generator,
                vae_fingerprint=vae_fingerprint,
            )  # fmt: skip
            progress.update()


def _with_images_loaded_ahead(
    batches: list[list[CacheJob]], ahead: int
) -> Iterator[tuple[list[CacheJob], list[np.ndarray]]]:
    """Decode the next ``ahead`` batches' images in threads while the VAE works (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(LOAD_THREADS, os.cpu_count() or 1)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, [pool.submit(_bucket_image, job) for job in batch]))
            if len(pending) > ahead:
                ready, futures = pending.popleft()
                yield ready, [future.result() for future in futures]
        while pending:
            ready, futures = pending.popleft()
            yield ready, [future.result() for future in futures]


def _encode_batch(
    batch: list[CacheJob], images: list[np.ndarray], vae, *, to_disk, device, dtype, generator, vae_fingerprint=None
) -> None:
    first = batch[0]
    pixels = torch.stack([to_tensor(image) for image in images]).to(device=device, dtype=dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=generator).float().cpu()
        flipped = None
        if first.flip_aug:
            flipped = vae.encode(torch.flip(pixels, dims=[3])).latent_dist.sample(generator=generator).float().cpu()
    for index, (job, image) in enumerate(zip(batch, images)):
        record = job.record
        if torch.isnan(latents[index]).any() or (flipped is not None and torch.isnan(flipped[index]).any()):
            raise DatasetError(f"the VAE produced NaN latents for {record.path}; try --no_half_vae")
        mask = alpha_mask(image) if job.use_alpha_mask else None
        if to_disk:
            arrays = {
                "latents": latents[index].numpy(),
                "original_size": np.array(record.size),
                "crop_ltrb": np.array(crop_ltrb(record.bucket, record.size)),
            }
            if flipped is not None:
                arrays["latents_flipped"] = flipped[index].numpy()
            if mask is not None:
                arrays["alpha_mask"] = mask.numpy()
            if vae_fingerprint is not None:
                arrays[VAE_FINGERPRINT_KEY] = np.array(vae_fingerprint)
            save_npz(record.npz_path, arrays)
        else:
            record.latents = latents[index].clone()
            record.latents_flipped = flipped[index].clone() if flipped is not None else None
            record.cached_alpha_mask = mask


def _bucket_image(job: CacheJob) -> np.ndarray:
    record = job.record
    image = load_record_image(record, with_alpha=job.use_alpha_mask)
    return fit_to_bucket(image, record.bucket, record.resized_size, interpolation=job.interpolation)
