"""Dataset groups from the tiny DreamBooth dataset: counts, buckets, batches, epochs, loaders, errors."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from PIL import Image

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import (
    BatchKey,
    batch_latents,
    build_dataset_group,
    build_validation_group,
    make_dataloader,
)
from library.errors import DatasetError
from tests.library.dataset_helpers import PoolingVAE, dataset_args, pooled_latents


def group_from_flags(data, tokenizer, seed=0, max_token_length=None, **flags):
    options = dict(train_data_dir=str(data.train_data_dir), resolution="64", caption_extension=".txt")
    args = dataset_args(**{**options, **flags})
    return build_dataset_group(build_blueprints(args), tokenizer, max_token_length=max_token_length, seed=seed)


def group_from_toml(tmp_path, tokenizer, toml_text, seed=0, **flags):
    config = tmp_path / "dataset.toml"
    config.write_text(toml_text, encoding="utf-8")
    args = dataset_args(dataset_config=str(config), **flags)
    return build_dataset_group(build_blueprints(args), tokenizer, seed=seed)


def pixels(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def is_reg(key):
    return Path(key).name.startswith("reg_")


def epoch_batches(group, epoch):
    return [group[BatchKey(epoch, i)] for i in range(len(group))]


def same_batches(first, second):
    return len(first) == len(second) and all(
        a["image_keys"] == b["image_keys"]
        and a["captions"] == b["captions"]
        and torch.equal(a.get("images", a.get("latents")), b.get("images", b.get("latents")))
        for a, b in zip(first, second)
    )


# --- counts, balancing, buckets ------------------------------------------------------------------


def test_reg_images_are_balanced_to_the_train_total(data, tokenizer):
    group = group_from_flags(data, tokenizer, reg_data_dir=str(data.reg_data_dir), train_batch_size=2)
    assert (group.num_train_images, group.num_reg_images) == (60, 2)  # 6 x 10 repeats, 2 x 1
    # the 2 reg images grow to 30 repeats each: an epoch is 60 train + 60 reg samples, 2 per batch
    assert len(group) == 60
    keys = Counter(key for batch in epoch_batches(group, 1) for key in batch["image_keys"])
    assert keys == Counter({str(path): 10 for path in sorted(data.subject.glob("*.png"))}) + Counter(
        {str(path): 30 for path in sorted(data.reg.glob("*.png"))}
    )


def test_surplus_reg_images_are_left_out(tmp_path, data, tokenizer):
    for i in (2, 3):
        (data.reg / f"reg_{i:02d}.png").write_bytes((data.reg / "reg_00.png").read_bytes())
    group = group_from_toml(
        tmp_path,
        tokenizer,
        f"""[general]\nresolution = 64\ncaption_extension = '.txt'
[[datasets]]
  [[datasets.subsets]]\n  image_dir = '{data.subject}'\n  num_repeats = 1
  [[datasets.subsets]]\n  image_dir = '{data.reg}'\n  num_repeats = 2\n  is_reg = true\n""",
    )
    # kohya takes reg images in order until their repeats reach the 6 train images: 2 + 2 + 2
    keys = Counter(key for batch in epoch_batches(group, 1) for key in batch["image_keys"])
    assert {k: n for k, n in keys.items() if is_reg(k)} == {str(data.reg / f"reg_{i:02d}.png"): 2 for i in range(3)}
    assert (group.num_train_images, group.num_reg_images) == (6, 8)


def test_buckets_and_length_follow_kohya(data, tokenizer):
    group = group_from_flags(
        data,
        tokenizer,
        resolution="128",
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        train_batch_size=4,
    )
    # buckets of 128x128 / 64..256 / 64: 64x192, 64x256, 128x128, 192x64, 256x64. The 64x128 image
    # goes to 64x192 (AR error 0.17); the square ones to 128x128; the 128x64 image (AR 2) is as far
    # from 128x128 as from 192x64 and kohya takes the first in sorted order, 128x128.
    (dataset,) = group.datasets
    assert {reso: len(members) for reso, members in dataset.buckets.items()} == {(64, 192): 10, (128, 128): 50}
    assert len(group) == 3 + 13  # ceil(10 / 4) + ceil(50 / 4)
    shapes = Counter(tuple(batch["images"].shape) for batch in epoch_batches(group, 1))
    assert shapes == Counter({(4, 3, 192, 64): 2, (2, 3, 192, 64): 1, (4, 3, 128, 128): 12, (2, 3, 128, 128): 1})


# --- batch contents ------------------------------------------------------------------------------


def test_a_batch_holds_what_the_trainer_needs(data, tokenizer):
    group = group_from_flags(data, tokenizer, reg_data_dir=str(data.reg_data_dir), prior_loss_weight=0.25)
    batch = group[0]
    sizes = {"original_sizes_hw", "crop_top_lefts", "target_sizes_hw"}  # kohya's SDXL size conditioning
    assert set(batch) == {"images", "input_ids", "captions", "loss_weights", "image_keys", "custom_attributes"} | sizes
    assert batch["target_sizes_hw"].tolist() == [[64, 64]] and batch["crop_top_lefts"].shape == (1, 2)
    assert batch["images"].shape == (1, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].shape == (1, 1, 77) and batch["input_ids"].dtype == torch.long
    for batch in epoch_batches(group, 1)[:20]:
        (key,) = batch["image_keys"]
        assert torch.equal(batch["images"][0], pixels(key)) or Path(key).stem in ("toy_04", "toy_05")
        assert batch["loss_weights"].tolist() == [0.25 if is_reg(key) else 1.0]
        caption = "toy" if is_reg(key) else Path(key).with_suffix(".txt").read_text().strip()
        assert batch["captions"] == [caption]
        expected_ids = tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(batch["input_ids"][0], expected_ids)


def test_images_are_resized_to_cover_and_centre_cropped(data, tokenizer):
    group = group_from_flags(data, tokenizer)
    wide, tall = str(data.subject / "toy_04.png"), str(data.subject / "toy_05.png")
    seen = {}
    for batch in epoch_batches(group, 1):
        seen[batch["image_keys"][0]] = batch["images"][0]
    # 128x64 and 64x128 already cover 64x64 at scale 1: only the centre 64 pixels are kept
    assert torch.equal(seen[wide], pixels(wide)[:, :, 32:96])
    assert torch.equal(seen[tall], pixels(tall)[:, 32:96, :])


def test_flip_aug_flips_about_half_of_the_samples(data, tokenizer):
    group = group_from_flags(data, tokenizer, flip_aug=True)
    flips = []
    for batch in epoch_batches(group, 1):
        key = batch["image_keys"][0]
        if Path(key).stem in ("toy_04", "toy_05"):
            continue
        image = pixels(key)
        flips.append(torch.equal(batch["images"][0], image.flip(-1)))
        assert flips[-1] or torch.equal(batch["images"][0], image)
    assert 10 <= sum(flips) <= 30  # of 40


def test_captions_are_processed_per_sample_and_epoch(data, tokenizer):
    group = group_from_flags(data, tokenizer, shuffle_caption=True, keep_tokens=1, max_token_length=150)
    first = epoch_batches(group, 1)
    second = epoch_batches(group, 2)
    captions = [c for batch in first + second for c in batch["captions"]]
    assert all(c.startswith("sks toy, ") for c in captions)
    assert len(set(captions)) > 6  # shuffled differently across samples and epochs
    assert first[0]["input_ids"].shape == (1, 2, 77)


def test_every_n_epochs_dropout_counts_epochs_from_one(data, tokenizer):
    group = group_from_flags(data, tokenizer, caption_dropout_every_n_epochs=2)
    assert {c for batch in epoch_batches(group, 1) for c in batch["captions"]} != {""}
    assert {c for batch in epoch_batches(group, 2) for c in batch["captions"]} == {""}


def test_alpha_channel_becomes_the_loss_mask(data, tokenizer):
    rgba = Image.open(data.subject / "toy_00.png").convert("RGBA")
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, :16] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(data.subject / "toy_00.png")
    group = group_from_flags(data, tokenizer, alpha_mask=True)
    for batch in epoch_batches(group, 1):
        masks = batch["alpha_masks"]
        assert masks.shape == (1, 64, 64)
        expected = alpha / 255.0 if Path(batch["image_keys"][0]).stem == "toy_00" else np.ones((64, 64))
        assert np.array_equal(masks[0].numpy(), expected.astype(np.float32))


# --- epochs, determinism, loaders ----------------------------------------------------------------


def test_epochs_reshuffle_deterministically(data, tokenizer):
    group = group_from_flags(data, tokenizer, flip_aug=True, shuffle_caption=True, train_batch_size=3)
    again = group_from_flags(data, tokenizer, flip_aug=True, shuffle_caption=True, train_batch_size=3)
    other_seed = group_from_flags(data, tokenizer, flip_aug=True, shuffle_caption=True, train_batch_size=3, seed=1)
    first, second = epoch_batches(group, 1), epoch_batches(group, 2)
    assert same_batches(first, epoch_batches(again, 1))
    assert not same_batches(first, second)
    assert not same_batches(first, epoch_batches(other_seed, 1))
    # every epoch holds each image exactly num_repeats times
    for batches in (first, second):
        assert Counter(k for b in batches for k in b["image_keys"]) == Counter(
            {str(p): 10 for p in data.subject.glob("*.png")}
        )


def test_int_index_uses_the_current_epoch(data, tokenizer):
    group = group_from_flags(data, tokenizer, train_batch_size=4)
    group.set_current_epoch(3)
    assert same_batches([group[i] for i in range(len(group))], epoch_batches(group, 3))
    with pytest.raises(ValueError, match="epochs count from 1"):
        group.set_current_epoch(0)


def test_workers_see_the_epoch_and_produce_the_same_batches(data, tokenizer):
    group = group_from_flags(data, tokenizer, flip_aug=True, shuffle_caption=True, train_batch_size=4)
    loader = make_dataloader(group, num_workers=1, persistent_workers=True)
    assert len(loader) == len(group) == 15
    for epoch in (1, 2):
        group.set_current_epoch(epoch)
        assert same_batches(list(loader), epoch_batches(group, epoch))
    in_process = make_dataloader(group, num_workers=0)
    assert same_batches(list(in_process), epoch_batches(group, 2))


def test_the_global_step_reaches_token_warmup_through_the_loader(data, tokenizer):
    group = group_from_flags(data, tokenizer, token_warmup_min=1, token_warmup_step=0.5, keep_tokens=1)
    group.set_max_train_steps(20)  # warm up over 10 steps
    loader = make_dataloader(group)
    group.set_current_step(0)
    assert {len(b["captions"][0].split(", ")) for b in loader} == {2}  # kept tag + 1
    group.set_current_step(10)
    assert {len(b["captions"][0].split(", ")) for b in loader} == {4}  # all tags


def test_accelerate_shards_an_epoch_into_disjoint_parts(data, tokenizer):
    group = group_from_flags(data, tokenizer, reg_data_dir=str(data.reg_data_dir), train_batch_size=3)
    assert len(group) == 40
    loader = make_dataloader(group)
    whole = [tuple(batch["image_keys"]) + tuple(batch["captions"]) for batch in loader]
    parts = []
    for process in range(2):
        shard = prepare_data_loader(loader, num_processes=2, process_index=process, put_on_device=False)
        assert len(shard) == 20
        parts.append([tuple(batch["image_keys"]) + tuple(batch["captions"]) for batch in shard])
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    assert Counter(parts[0] + parts[1]) == Counter(whole)


def test_batch_latents_encodes_images_and_scales(data, tokenizer):
    group = group_from_flags(data, tokenizer, train_batch_size=2)
    batch = group[0]
    latents = batch_latents(batch, PoolingVAE())
    assert torch.allclose(latents, pooled_latents(batch["images"]) * 0.18215)


# --- fine-tuning metadata ------------------------------------------------------------------------


def test_fine_tuning_metadata_joins_caption_and_tags(data, tokenizer):
    metadata = {
        "toy_00": {"caption": "a red cube", "tags": "red, cube"},  # stem-only key, as kohya's tools write
        "toy_01.png": {"tags": "green, ball"},
        str(data.subject / "toy_02.png"): {"caption": "a blue cube"},
    }
    (data.root / "meta.json").write_text(json.dumps(metadata))
    args = dict(in_json=str(data.root / "meta.json"), train_data_dir=str(data.subject), dataset_repeats=2)
    group = group_from_flags(data, tokenizer, **args)
    (dataset,) = group.datasets
    assert [r.caption for r in dataset.records] == ["a red cube,red, cube", "green, ball", "a blue cube"]
    assert [r.path.name for r in dataset.records] == ["toy_00.png", "toy_01.png", "toy_02.png"]
    assert group.num_train_images == 6 and len(group) == 6
    assert dataset.tag_frequency == {"meta.json": {"red": 1, "cube": 1, "green": 1, "ball": 1}}
    assert {k for b in epoch_batches(group, 1) for k in b["image_keys"]} == set(metadata)


def test_fine_tuning_jsonl_lines(data, tokenizer):
    lines = [{"image_path": "toy_03.png", "caption": "yellow ball", "image_size": [64, 64]}]
    (data.root / "meta.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    group = group_from_flags(data, tokenizer, in_json=str(data.root / "meta.jsonl"), train_data_dir=str(data.subject))
    assert group[0]["captions"] == ["yellow ball"]


# --- errors --------------------------------------------------------------------------------------


def test_missing_image_in_metadata_names_it(data, tokenizer):
    (data.root / "meta.json").write_text(json.dumps({"toy_99.png": {"caption": "gone"}}))
    with pytest.raises(DatasetError, match=r"meta.json: image 'toy_99.png' does not exist"):
        group_from_flags(data, tokenizer, in_json=str(data.root / "meta.json"), train_data_dir=str(data.subject))


def test_empty_folders_are_skipped_and_nothing_left_is_an_error(data, tokenizer, caplog):
    (data.train_data_dir / "3_empty").mkdir()
    with caplog.at_level(logging.WARNING):
        group = group_from_flags(data, tokenizer)
    assert "--train_data_dir/3_empty: skipped, no images found" in caplog.text
    assert [s.where for s in group.datasets[0].subsets] == ["--train_data_dir/10_sks toy"]
    for image in data.subject.iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=r"no training images found \(--train_data_dir/10_sks toy"):
        group_from_flags(data, tokenizer)


def test_a_corrupt_image_is_named(data, tokenizer):
    (data.subject / "toy_03.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"cannot read image .*toy_03.png"):
        group_from_flags(data, tokenizer)


def test_a_truncated_image_is_named_when_loaded(data, tokenizer):
    image = data.subject / "toy_03.png"
    image.write_bytes(image.read_bytes()[:200])
    group = group_from_flags(data, tokenizer)  # the header is intact
    with pytest.raises(DatasetError, match=r"cannot read image .*toy_03.png"):
        epoch_batches(group, 1)


def test_missing_captions_fall_back_to_class_tokens_then_empty(tmp_path, data, tokenizer, caplog):
    (data.subject / "toy_01.txt").unlink()
    toml_text = f"""[general]\nresolution = 64\ncaption_extension = '.txt'
[[datasets]]
  [[datasets.subsets]]\n  image_dir = '{data.subject}'\n  class_tokens = 'sks toy'
  [[datasets.subsets]]\n  image_dir = '{data.reg}'\n"""
    with caplog.at_level(logging.WARNING):
        group = group_from_toml(tmp_path, tokenizer, toml_text)
    captions = {r.path.name: r.caption for r in group.datasets[0].records}
    assert captions["toy_01.png"] == "sks toy" and captions["toy_00.png"] == "sks toy, red, cube, on the table"
    assert captions["reg_00.png"] == captions["reg_01.png"] == ""
    assert "no .txt caption file for toy_01.png in" in caplog.text and "using class tokens 'sks toy'" in caplog.text
    assert (
        "no .txt caption file for reg_00.png, reg_01.png in" in caplog.text and "using an empty caption" in caplog.text
    )


# --- crops without buckets, validation split, cached image info ----------------------------------


def test_random_crop_without_buckets_takes_unscaled_windows(data, tokenizer):
    group = group_from_flags(data, tokenizer, random_crop=True)
    wide = data.subject / "toy_04.png"  # 128x64
    windows = set()
    for epoch in (1, 2, 3):
        for batch in epoch_batches(group, epoch):
            if batch["image_keys"][0] == str(wide):
                image, full = batch["images"][0], pixels(wide)
                (left,) = [x for x in range(65) if torch.equal(image, full[:, :, x : x + 64])]
                windows.add(left)
    assert len(windows) > 3


def test_face_crop_centres_the_face_named_in_the_file(data, tokenizer):
    (data.subject / "toy_04.png").rename(data.subject / "toy_04_70_30_20_20.png")
    group = group_from_flags(data, tokenizer, face_crop_aug_range="2.0,2.0")
    face = data.subject / "toy_04_70_30_20_20.png"
    (image,) = [b["images"][0] for b in epoch_batches(group, 1) if b["image_keys"][0] == str(face)][:1]
    # the face (20px) already spans the wanted share at scale 1: a 64x64 window centred on x=70, y=30
    assert torch.equal(image, pixels(face)[:, 0:64, 70 - 32 : 70 + 32])
    records = {r.path.name: r.caption for r in group.datasets[0].records}
    assert records["toy_04_70_30_20_20.png"] == "sks toy, red, cube, on the table"  # toy_04.txt


def test_validation_split_keeps_the_parts_disjoint(tmp_path, data, tokenizer):
    config = tmp_path / "split.toml"
    config.write_text(
        f"[general]\nresolution = 64\ncaption_extension = '.txt'\n[[datasets]]\nvalidation_split = 0.25\n"
        f"[[datasets.subsets]]\nimage_dir = '{data.subject}'\nnum_repeats = 3\n"
        f"[[datasets.subsets]]\nimage_dir = '{data.reg}'\nis_reg = true\n"
    )
    blueprints = build_blueprints(dataset_args(dataset_config=str(config)))
    train = build_dataset_group(blueprints, tokenizer, seed=5)
    validation = build_validation_group(blueprints, tokenizer, seed=5)
    train_keys = {r.key for r in train.datasets[0].records if not is_reg(r.key)}
    validation_keys = {r.key for r in validation.datasets[0].records}
    assert len(train_keys) == 5 and len(validation_keys) == 1  # ceil(6 * 0.75) and the rest
    assert train_keys | validation_keys == {str(p) for p in data.subject.glob("*.png")}
    assert (train.num_train_images, train.num_reg_images, validation.num_train_images) == (15, 2, 1)
    assert validation.num_reg_images == 0  # reg images are never validated
    assert train.metadata(validation=validation)["ss_num_validation_images"] == "1"
    without_split = build_blueprints(dataset_args(train_data_dir=str(data.train_data_dir), resolution="64"))
    assert build_validation_group(without_split, tokenizer) is None


def test_cache_info_writes_and_reads_kohyas_image_info_file(data, tokenizer):
    group_from_flags(data, tokenizer, cache_info=True)
    cache = json.loads((data.subject / "metadata_cache.json").read_text())
    assert cache[str(data.subject / "toy_04.png")] == {
        "caption": "sks toy, red, cube, on the table",
        "resolution": [128, 64],
    }
    # the cache is trusted: a caption edited afterwards is not seen, as in kohya
    (data.subject / "toy_04.txt").write_text("changed")
    group = group_from_flags(data, tokenizer, cache_info=True)
    assert {r.path.name: r.caption for r in group.datasets[0].records}["toy_04.png"].startswith("sks toy")


def test_a_second_tokenizer_gives_kohyas_input_ids2(data, tokenizer):
    """SDXL groups tokenize with both tokenizers; kohya's batch key for the second is ``input_ids2``."""
    from library.data.dataset_group import DatasetGroup

    group = group_from_flags(data, tokenizer)
    both = DatasetGroup(group.datasets, [tokenizer, tokenizer], seed=group.seed)
    batch = both[0]
    assert torch.equal(batch["input_ids2"], batch["input_ids"]) and torch.equal(
        batch["input_ids"], group[0]["input_ids"]
    )
