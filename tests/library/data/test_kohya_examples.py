"""The example configs of kohya's docs/config_README-en.md, re-made for the tiny dataset, build working groups.

Each config keeps the structure of kohya's example (tables, keys, levels); paths, sizes and
captions are the tiny dataset's.
"""

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import toml

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import BatchKey, build_dataset_group
from tests.library.dataset_helpers import copy_tiny_dataset, dataset_args


@pytest.fixture
def folders(tiny_sd, tmp_path):
    """kohya's example folders: hoge and fuga (DreamBooth), reg, piyo (fine-tuning with piyo_md.json)."""
    data = copy_tiny_dataset(tiny_sd, tmp_path)
    hoge, reg = data.subject, data.reg
    fuga, piyo = tmp_path / "fuga", tmp_path / "piyo"
    fuga.mkdir()
    piyo.mkdir()
    for name in ("toy_01", "toy_03"):
        shutil.copy(hoge / f"{name}.png", fuga / f"{name}.png")
        (fuga / f"{name}.txt").write_text("toy ball, green, small, on the table, shiny\n")
    metadata = {}
    for name in ("toy_00", "toy_02"):
        shutil.copy(hoge / f"{name}.png", piyo / f"{name}.png")
        metadata[f"{name}.png"] = {"caption": "a toy cube", "tags": "cube, red, wooden"}
    (piyo / "piyo_md.json").write_text(json.dumps(metadata))
    return dict(hoge=hoge, fuga=fuga, reg=reg, piyo=piyo)


def build(tmp_path, tokenizer, text, name="dataset.toml", **flags):
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    return build_dataset_group(build_blueprints(dataset_args(dataset_config=str(config), **flags)), tokenizer)


def batches(group, epoch=1):
    return [group[BatchKey(epoch, i)] for i in range(len(group))]


OVERVIEW_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 64
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'sks toy'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'toy ball'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'toy'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [128, 128]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{piyo}'
  metadata_file = '{piyo}/piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


def test_overview_example(tmp_path, tokenizer, folders):
    group = build(tmp_path, tokenizer, OVERVIEW_EXAMPLE.format(**folders))
    dreambooth, fine_tuning = group.datasets
    assert dreambooth.blueprint.is_dreambooth and not fine_tuning.blueprint.is_dreambooth
    assert [s.caption.keep_tokens for s in dreambooth.subsets + fine_tuning.subsets] == [2, 3, 1, 1]
    assert (dreambooth.num_train_images, dreambooth.num_reg_images) == (6 + 2, 2)
    assert fine_tuning.num_train_images == 2
    for batch in batches(group):
        for key, caption in zip(batch["image_keys"], batch["captions"]):
            if "/fuga/" in key:
                assert caption.startswith("toy ball, green, small, ")
            elif not Path(key).is_absolute():  # fine-tuning keys are the metadata's
                assert caption.startswith("a toy cube, ")  # keep_tokens 1 of "a toy cube,cube, red, wooden"
            elif "/reg/" in key:
                assert caption == "toy"
            else:
                assert caption.startswith("sks toy, ") and caption.split(", ")[1] in ("red", "green", "blue", "yellow")
        size = batch["images"].shape[-1]
        assert size == (64 if Path(batch["image_keys"][0]).is_absolute() else 128)
    assert Counter(len(b["image_keys"]) for b in batches(group)) == Counter({4: 4, 2: 1})  # 16 DreamBooth, 2 FT


def test_overview_example_as_json(tmp_path, tokenizer, folders):
    from_toml = build_blueprints(dataset_args(dataset_config=str(_write(tmp_path, "a.toml", folders))))
    as_json = tmp_path / "dataset.json"
    as_json.write_text(json.dumps(toml.loads(OVERVIEW_EXAMPLE.format(**folders))))
    from_json = build_blueprints(dataset_args(dataset_config=str(as_json)))
    strip = [(b.buckets, b.batch_size, [(s.image_dir, s.caption, s.is_reg) for s in b.subsets]) for b in from_json]
    assert strip == [
        (b.buckets, b.batch_size, [(s.image_dir, s.caption, s.is_reg) for s in b.subsets]) for b in from_toml
    ]


def _write(tmp_path, name, folders):
    path = tmp_path / name
    path.write_text(OVERVIEW_EXAMPLE.format(**folders))
    return path


DUPLICATE_SUBSETS_EXAMPLE = """
# If data sets exist separately, they are not considered duplicates and are both used for training.

[[datasets]]
resolution = 64

  [[datasets.subsets]]
  image_dir = '{hoge}'

[[datasets]]
resolution = 128

  [[datasets.subsets]]
  image_dir = '{hoge}'
"""


def test_duplicate_subsets_example(tmp_path, tokenizer, folders, caplog):
    group = build(tmp_path, tokenizer, DUPLICATE_SUBSETS_EXAMPLE.format(**folders), caption_extension=".txt")
    sizes = Counter(batch["images"].shape[-2:] for batch in batches(group))
    assert sizes == Counter({(64, 64): 6, (128, 128): 6})
    # inside one dataset, the second copy of a folder is skipped, as kohya does
    inside = "[general]\nresolution = 64\n[[datasets]]\n" + "[[datasets.subsets]]\nimage_dir = '{hoge}'\n" * 2
    with caplog.at_level(logging.WARNING):
        group = build(tmp_path, tokenizer, inside.format(**folders), caption_extension=".txt")
    assert len(group.datasets[0].subsets) == 1 and "already in this dataset" in caplog.text


SEPARATORS_EXAMPLE = """
[general]
flip_aug = true
color_aug = false
resolution = [128, 128]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
min_bucket_reso = 64  # kohya's example relies on the default 256 being below its 1024 resolution
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # can be written in the subset side
enable_wildcard = true # same as above

  [[datasets.subsets]]
  image_dir = "{hoge}"
  num_repeats = 1

  # No comma is required before and after ||| (it is added automatically)
  caption_prefix = "sks toy, plastic |||"

  # After |||, it is not shuffled or dropped and remains
  caption_suffix = ", photo ||| shiny, small"
"""


def test_separators_and_wildcards_example(tmp_path, tokenizer, folders):
    for image in folders["hoge"].glob("*.png"):
        image.with_suffix(".txt").write_text("{red|blue} cube, table;;;chair, {{literal}}\na second line, wooden\n")
    group = build(tmp_path, tokenizer, SEPARATORS_EXAMPLE.format(**folders))
    (dataset,) = group.datasets
    # bucket_no_upscale: each image keeps its own size (all fit in 128x128)
    assert set(dataset.buckets) == {(64, 64), (128, 64), (64, 128)}
    captions = [c for epoch in (1, 2, 3) for batch in batches(group, epoch) for c in batch["captions"]]
    for caption in captions:
        assert caption.startswith("sks toy, plastic, ") and caption.endswith(", shiny, small")
        assert ";;;" not in caption and "|" not in caption
        middle = caption[len("sks toy, plastic, ") : -len(", shiny, small")].split(", ")
        assert set(middle) <= {"red cube", "blue cube", "table,chair", "{literal}", "a second line", "wooden", "photo"}
    assert any("table,chair" in c for c in captions)  # secondary separator: one tag, re-joined with ","
    assert any("{literal}" in c for c in captions) and any("wooden" in c for c in captions)
    assert {"red cube", "blue cube"} <= {tag for c in captions for tag in c.split(", ")}


def test_multi_line_metadata_captions_get_the_tags_on_every_line(tmp_path, tokenizer, folders):
    piyo = folders["piyo"]
    metadata = {
        str(piyo / "toy_00.png"): {
            "caption": "a cartoon of a toy\ntest multiline caption1\ntest multiline caption2",
            "tags": "open mouth, simple background",
        }
    }
    (piyo / "md.json").write_text(json.dumps(metadata))
    text = "[general]\nresolution = 64\nenable_wildcard = true\n[[datasets]]\n[[datasets.subsets]]\n"
    text += f"metadata_file = '{piyo}/md.json'\n"
    group = build(tmp_path, tokenizer, text)
    assert group.datasets[0].records[0].caption == (
        "a cartoon of a toy,open mouth, simple background\n"
        "test multiline caption1,open mouth, simple background\n"
        "test multiline caption2,open mouth, simple background"
    )
    captions = {batch["captions"][0] for epoch in range(1, 12) for batch in batches(group, epoch)}
    assert len(captions) == 3 and all(c.endswith(",open mouth, simple background") for c in captions)
