"""Latent caching in memory and in kohya's .npz files: contents, reuse, stale caches, processes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import BatchKey, batch_latents, build_dataset_group
from library.errors import ConfigError, DatasetError
from library.models.fingerprint import weights_fingerprint
from tests.library.dataset_helpers import PoolingVAE, dataset_args, pooled_latents


def make_group(data, tokenizer, **flags):
    options = dict(train_data_dir=str(data.train_data_dir), resolution="64", caption_extension=".txt")
    return build_dataset_group(build_blueprints(dataset_args(**{**options, **flags})), tokenizer, seed=0)


def all_batches(group, epoch=1):
    return [group[BatchKey(epoch, i)] for i in range(len(group))]


def by_key(batches, field):
    return {key: batch[field][i] for batch in batches for i, key in enumerate(batch["image_keys"])}


def npz_files(folder):
    return sorted(p.name for p in folder.glob("*.npz"))


def test_memory_cache_holds_the_latents_of_the_batch_images(data, tokenizer):
    plain = make_group(data, tokenizer, train_batch_size=2)
    images = by_key(all_batches(plain), "images")
    cached = make_group(data, tokenizer, train_batch_size=2)
    vae = PoolingVAE()
    cached.cache_latents(vae, vae_batch_size=4)
    assert vae.encoded_images == 6  # once per image, not per repeat
    batches = all_batches(cached)
    assert all("images" not in batch and batch["latents"].shape[1:] == (4, 8, 8) for batch in batches)
    for key, latents in by_key(batches, "latents").items():
        assert torch.allclose(latents, pooled_latents(images[key][None])[0], atol=1e-6)
    assert npz_files(data.subject) == []


def test_flip_aug_caches_flipped_latents_and_uses_them_half_the_time(data, tokenizer):
    group = make_group(data, tokenizer, flip_aug=True)
    group.cache_latents(PoolingVAE(), vae_batch_size=8)
    flipped = 0
    for batch in all_batches(group):
        image = pixels(_bucket_image(batch["image_keys"][0]))
        if torch.allclose(batch["latents"], pooled_latents(image.flip(-1)), atol=1e-6):
            flipped += 1
        else:
            assert torch.allclose(batch["latents"], pooled_latents(image), atol=1e-6)
    assert 15 <= flipped <= 45  # of 60


def _bucket_image(path):
    """The centre 64x64 crop: every tiny image already covers the 64x64 bucket at scale 1."""
    image = np.asarray(Image.open(path).convert("RGB"))
    top, left = (image.shape[0] - 64) // 2, (image.shape[1] - 64) // 2
    return image[top : top + 64, left : left + 64]


def pixels(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


def test_disk_cache_is_kohyas_npz_format(data, tokenizer):
    group = make_group(data, tokenizer, flip_aug=True)
    group.cache_latents(PoolingVAE(), vae_batch_size=2, to_disk=True)
    assert npz_files(data.subject) == [
        "toy_00_0064x0064_sd.npz",
        "toy_01_0064x0064_sd.npz",
        "toy_02_0064x0064_sd.npz",
        "toy_03_0064x0064_sd.npz",
        "toy_04_0128x0064_sd.npz",  # original width x height in the name
        "toy_05_0064x0128_sd.npz",
    ]
    image = pixels(_bucket_image(data.subject / "toy_04.png"))
    with np.load(data.subject / "toy_04_0128x0064_sd.npz") as npz:
        assert sorted(npz.files) == ["crop_ltrb", "latents", "latents_flipped", "original_size", "vae_fingerprint"]
        assert npz["latents"].shape == (4, 8, 8) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [128, 64]
        assert npz["crop_ltrb"].tolist() == [0, 16, 64, 48]  # kohya: 128x64 fitted inside 64x64
        assert np.allclose(npz["latents"], pooled_latents(image)[0].numpy(), atol=1e-6)
        assert np.allclose(npz["latents_flipped"], pooled_latents(image.flip(-1))[0].numpy(), atol=1e-6)
    # batches read the files back, flipped or not
    for batch in all_batches(group):
        stem = Path(batch["image_keys"][0]).stem
        (npz_path,) = data.subject.glob(f"{stem}_*_sd.npz")
        with np.load(npz_path) as npz:
            options = [torch.from_numpy(npz[key]) for key in ("latents", "latents_flipped")]
        assert any(torch.equal(batch["latents"][0], option) for option in options)


def test_valid_caches_are_reused_and_stale_ones_rebuilt(data, tokenizer):
    make_group(data, tokenizer).cache_latents(PoolingVAE(), to_disk=True)
    vae = PoolingVAE()
    make_group(data, tokenizer).cache_latents(vae, to_disk=True)
    assert vae.encoded_images == 0
    # flip_aug needs latents_flipped, which the files lack: rebuilt, other keys kept
    vae = PoolingVAE()
    make_group(data, tokenizer, flip_aug=True).cache_latents(vae, to_disk=True)
    assert vae.encoded_images == 6 + 6  # each image and its mirror image
    # a resolution change makes every cached shape stale; kohya would reuse the 8x8 latents
    vae = PoolingVAE()
    group = make_group(data, tokenizer, resolution="128")
    group.cache_latents(vae, to_disk=True)
    assert vae.encoded_images == 6
    with np.load(data.subject / "toy_00_0064x0064_sd.npz") as npz:
        assert npz["latents"].shape == (4, 16, 16)
    assert all(b["latents"].shape[2:] == (16, 16) for b in all_batches(group))


def test_a_cache_another_vae_wrote_is_encoded_again(data, tokenizer):
    make_group(data, tokenizer).cache_latents(PoolingVAE(), to_disk=True)
    other = PoolingVAE()
    with torch.no_grad():
        other.anchor.fill_(1.0)  # another checkpoint's VAE (kohya would train on the old latents)
    make_group(data, tokenizer).cache_latents(other, to_disk=True)
    assert other.encoded_images == 6
    with np.load(data.subject / "toy_00_0064x0064_sd.npz") as npz:
        assert str(npz["vae_fingerprint"]) == weights_fingerprint(other)
    same = PoolingVAE()
    with torch.no_grad():
        same.anchor.fill_(1.0)
    make_group(data, tokenizer).cache_latents(same, to_disk=True)
    assert same.encoded_images == 0


def test_a_kohya_written_cache_is_used(data, tokenizer):
    marker = np.full((4, 8, 8), 0.5, dtype=np.float32)
    for image in data.subject.glob("*.png"):
        width, height = {"toy_04": (128, 64), "toy_05": (64, 128)}.get(image.stem, (64, 64))
        np.savez(
            image.with_name(f"{image.stem}_{width:04d}x{height:04d}_sd.npz"),
            latents=marker,
            original_size=np.array([width, height]),
            crop_ltrb=np.array([0, 0, 64, 64]),
        )
    vae = PoolingVAE()
    group = make_group(data, tokenizer)
    group.cache_latents(vae, to_disk=True)
    assert vae.encoded_images == 0
    assert all(torch.equal(b["latents"][0], torch.from_numpy(marker)) for b in all_batches(group))


def test_legacy_npz_name_wins(data, tokenizer):
    legacy = data.subject / "toy_00.npz"
    np.savez(legacy, latents=np.zeros((4, 8, 8), np.float32), original_size=np.array([64, 64]), crop_ltrb=np.zeros(4))
    make_group(data, tokenizer).cache_latents(PoolingVAE(), to_disk=True)
    assert "toy_00_0064x0064_sd.npz" not in npz_files(data.subject)


def test_processes_split_the_disk_cache(data, tokenizer):
    encoded = []
    for process in range(2):
        vae = PoolingVAE()
        make_group(data, tokenizer).cache_latents(vae, to_disk=True, process_index=process, num_processes=2)
        encoded.append(vae.encoded_images)
        assert len(npz_files(data.subject)) == sum(encoded)
    assert encoded == [3, 3]
    vae = PoolingVAE()
    make_group(data, tokenizer).cache_latents(vae, to_disk=True)
    assert vae.encoded_images == 0


def test_same_images_at_two_resolutions_share_no_stale_file(tmp_path, data, tokenizer):
    config = tmp_path / "twice.toml"
    config.write_text(
        f"[general]\ncaption_extension = '.txt'\n"
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{data.subject}'\n"
        f"[[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = '{data.subject}'\n"
    )
    group = build_dataset_group(build_blueprints(dataset_args(dataset_config=str(config))), tokenizer)
    group.cache_latents(PoolingVAE(), to_disk=True)
    shapes = {tuple(b["latents"].shape[2:]) for b in all_batches(group)}
    assert shapes == {(8, 8), (16, 16)}


def test_pixel_augmentations_cannot_be_cached(data, tokenizer):
    """Checked once, when the flags become blueprints: before any model loads."""
    with pytest.raises(ConfigError, match="color_aug changes the pixels every epoch"):
        make_group(data, tokenizer, color_aug=True, cache_latents=True)


def test_nan_latents_name_the_image(data, tokenizer):
    class NanVAE(PoolingVAE):
        def encode(self, pixels):
            result = super().encode(pixels)
            result.latent_dist.value[:] = float("nan")
            return result

    with pytest.raises(DatasetError, match=r"NaN latents for .*toy_0\d.png; try --no_half_vae"):
        make_group(data, tokenizer).cache_latents(NanVAE())


def test_real_vae_cache_with_progress_and_scaled_latents(tiny_sd, data, tokenizer, capsys):
    vae = AutoencoderKL.from_pretrained(tiny_sd.sd1_dir, subfolder="vae").eval()
    group = make_group(data, tokenizer, train_batch_size=3)
    group.cache_latents(vae, vae_batch_size=6, to_disk=True)
    assert "caching latents" in capsys.readouterr().err
    batch = group[0]
    assert batch["latents"].dtype == torch.float32 and torch.isfinite(batch["latents"]).all()
    assert torch.allclose(batch_latents(batch, vae), batch["latents"] * 0.18215)
    assert Path(data.subject / "toy_00_0064x0064_sd.npz").is_file()


def test_alpha_masks_are_cached_in_the_npz_and_flip_with_the_latents(data, tokenizer):
    rgba = Image.open(data.subject / "toy_04.png").convert("RGBA")  # 128x64: cropped to its centre
    alpha = np.zeros((64, 128), dtype=np.uint8)
    alpha[:, 40:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(data.subject / "toy_04.png")
    group = make_group(data, tokenizer, alpha_mask=True, flip_aug=True, cache_latents_to_disk=True)
    group.cache_latents(PoolingVAE(), to_disk=True)
    expected = alpha[:, 32:96].astype(np.float32) / 255  # kohya's alpha_mask key: (H, W) float32 in [0, 1]
    with np.load(data.subject / "toy_04_0128x0064_sd.npz") as npz:
        np.testing.assert_array_equal(npz["alpha_mask"], expected)
    image = pixels(_bucket_image(data.subject / "toy_04.png"))
    seen = set()
    for epoch in range(1, 4):
        for batch in all_batches(group, epoch):
            if Path(batch["image_keys"][0]).stem != "toy_04":
                assert batch["alpha_masks"].eq(1).all()
                continue
            flipped = not torch.allclose(batch["latents"], pooled_latents(image), atol=1e-6)
            seen.add(flipped)
            mask = expected[:, ::-1] if flipped else expected
            np.testing.assert_array_equal(batch["alpha_masks"][0].numpy(), mask)
    assert seen == {False, True}


def test_temporaries_of_killed_runs_are_removed_and_fresh_ones_kept(data, tokenizer):
    import os
    import time

    from library.data.latent_cache import STALE_TEMPORARY_AGE_S

    stale = data.subject / ".toy_00_0064x0064_sd.npz.abc123.tmp"
    fresh = data.subject / ".toy_01_0064x0064_sd.npz.def456.tmp"  # another process may be writing it now
    unrelated = data.subject / ".notes.txt.tmp"
    for path in (stale, fresh, unrelated):
        path.write_bytes(b"partial")
    old = time.time() - STALE_TEMPORARY_AGE_S - 5
    os.utime(stale, (old, old))
    os.utime(unrelated, (old, old))
    make_group(data, tokenizer).cache_latents(PoolingVAE(), to_disk=True)
    assert not stale.exists()
    assert fresh.exists() and unrelated.exists()
    assert len(npz_files(data.subject)) == 6
