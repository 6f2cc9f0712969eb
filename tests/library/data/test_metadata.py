"""The dataset ss_* metadata, value for value as kohya's train_network.py writes it."""

import json

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import build_dataset_group
from tests.library.dataset_helpers import dataset_args

TAGS = {"sks toy": 6, "red": 2, "cube": 3, "on the table": 6, "green": 2, "ball": 3, "blue": 1, "yellow": 1}


def test_command_line_form(data, tokenizer):
    args = dataset_args(
        train_data_dir=str(data.train_data_dir),
        reg_data_dir=str(data.reg_data_dir),
        resolution="64",
        caption_extension=".txt",
        train_batch_size=2,
        flip_aug=True,
        keep_tokens=1,
    )
    group = build_dataset_group(build_blueprints(args), tokenizer)
    assert group.metadata(num_processes=2, gradient_accumulation_steps=2) == {
        "ss_num_train_images": "60",
        "ss_num_validation_images": "0",
        "ss_num_reg_images": "2",
        "ss_num_batches_per_epoch": "30",  # 60 batches shared by 2 processes
        "ss_batch_size_per_device": "2",
        "ss_total_batch_size": "8",
        "ss_resolution": "(64, 64)",
        "ss_color_aug": "False",
        "ss_flip_aug": "True",
        "ss_random_crop": "False",
        "ss_shuffle_caption": "False",
        "ss_enable_bucket": "False",
        "ss_bucket_no_upscale": "False",
        "ss_min_bucket_reso": "None",
        "ss_max_bucket_reso": "None",
        "ss_keep_tokens": "1",
        "ss_dataset_dirs": '{"10_sks toy": {"n_repeats": 10, "img_count": 6}}',
        "ss_reg_dataset_dirs": '{"1_toy": {"n_repeats": 1, "img_count": 2}}',
        "ss_tag_frequency": json.dumps({"10_sks toy": TAGS, "1_toy": {"toy": 2}}),
        "ss_bucket_info": "null",
    }


def test_bucket_info(data, tokenizer):
    args = dataset_args(
        train_data_dir=str(data.train_data_dir),
        resolution="64",
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=100,
    )
    metadata = build_dataset_group(build_blueprints(args), tokenizer).metadata()
    # one 64x64 bucket; the 128x64 and 64x128 images miss its aspect ratio by 1 and 0.5: mean 1.5 / 6
    assert (
        metadata["ss_bucket_info"]
        == '{"buckets": {"0": {"resolution": [64, 64], "count": 60}}, "mean_img_ar_error": 0.25}'
    )
    assert (metadata["ss_enable_bucket"], metadata["ss_min_bucket_reso"], metadata["ss_max_bucket_reso"]) == (
        "True",
        "64",
        "128",  # rounded up to bucket_reso_steps
    )


def test_dataset_config_form(tmp_path, data, tokenizer):
    config = tmp_path / "dataset.toml"
    config.write_text(
        f"""[general]
caption_extension = '.txt'
shuffle_caption = true
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{data.subject}'
  num_repeats = 2
  class_tokens = 'sks toy'
  [[datasets.subsets]]
  image_dir = '{data.reg}'
  is_reg = true
[[datasets]]
resolution = 128
enable_bucket = true
min_bucket_reso = 64
  [[datasets.subsets]]
  image_dir = '{data.subject}'
  caption_prefix = 'photo'
  flip_aug = true
"""
    )
    group = build_dataset_group(build_blueprints(dataset_args(dataset_config=str(config))), tokenizer)
    metadata = group.metadata()
    assert set(metadata) == {
        "ss_num_train_images",
        "ss_num_validation_images",
        "ss_num_reg_images",
        "ss_num_batches_per_epoch",
        "ss_datasets",
        "ss_tag_frequency",
        "ss_dataset_dirs",
    }
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("18", "2")
    assert metadata["ss_num_batches_per_epoch"] == "18"  # (12 train + 12 reg) / 2, then 1 + 5 in batches of 1
    assert metadata["ss_dataset_dirs"] == json.dumps(
        {"10_sks toy": {"n_repeats": 2, "img_count": 6}, "10_sks toy (2)": {"n_repeats": 1, "img_count": 6}}
    )
    assert metadata["ss_tag_frequency"] == json.dumps({"10_sks toy": TAGS, "1_toy": {}})
    subset_defaults = dict(
        color_aug=False,
        random_crop=False,
        shuffle_caption=True,
        keep_tokens=0,
        keep_tokens_separator="",
        secondary_separator=None,
        enable_wildcard=False,
        caption_suffix=None,
        resize_interpolation=None,
    )
    first, second = json.loads(metadata["ss_datasets"])
    assert first == {
        "is_dreambooth": True,
        "batch_size_per_device": 2,
        "num_train_images": 12,
        "num_reg_images": 2,
        "resolution": [64, 64],
        "enable_bucket": False,
        "min_bucket_reso": None,
        "max_bucket_reso": None,
        "tag_frequency": {"10_sks toy": TAGS, "1_toy": {}},
        "bucket_info": None,
        "resize_interpolation": None,
        "subsets": [
            {
                "img_count": 6,
                "num_repeats": 2,
                "flip_aug": False,
                "caption_prefix": None,
                **subset_defaults,
                "image_dir": "10_sks toy",
                "class_tokens": "sks toy",
                "is_reg": False,
            },
            {
                "img_count": 2,
                "num_repeats": 1,
                "flip_aug": False,
                "caption_prefix": None,
                **subset_defaults,
                "image_dir": "1_toy",
                "class_tokens": None,
                "is_reg": True,
            },
        ],
    }
    assert list(first["subsets"][0]) == [
        "img_count",
        "num_repeats",
        "color_aug",
        "flip_aug",
        "random_crop",
        "shuffle_caption",
        "keep_tokens",
        "keep_tokens_separator",
        "secondary_separator",
        "enable_wildcard",
        "caption_prefix",
        "caption_suffix",
        "resize_interpolation",
        "image_dir",
        "class_tokens",
        "is_reg",
    ]
    assert second["resolution"] == [128, 128] and (second["min_bucket_reso"], second["max_bucket_reso"]) == (64, 1024)
    assert second["bucket_info"]["buckets"] == {
        "0": {"resolution": [64, 192], "count": 1},
        "1": {"resolution": [128, 128], "count": 5},
    }
    assert second["subsets"][0]["caption_prefix"] == "photo" and second["subsets"][0]["flip_aug"] is True
