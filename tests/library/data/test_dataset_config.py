"""--dataset_config validation, the value lookup order, and blueprints from the dataset flags."""

import json
import logging

import pytest

from library.data.dataset_config import build_blueprints
from library.data.dataset_schema import load_dataset_config, parse_resolution
from library.errors import ConfigError, DatasetError
from tests.library.dataset_helpers import dataset_args


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def blueprints_from(tmp_path, toml_text, **flags):
    config = write(tmp_path / "dataset.toml", toml_text)
    return build_blueprints(dataset_args(dataset_config=str(config), **flags))


# --- schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml_text", "message"),
    [
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nimag_dir = 'b'\n",
            r"datasets\[0\]\.subsets\[1\]\.imag_dir: unknown key 'imag_dir'; did you mean 'image_dir'\?",
        ),
        (
            "[general]\nis_reg = true\n",
            r"general\.is_reg: 'is_reg' is not allowed here; it belongs in DreamBooth \[\[datasets\.subsets\]\]",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nbatch_size = 2\n",
            r"datasets\[0\]\.subsets\[0\]\.batch_size: 'batch_size' is not allowed here; it belongs in \[general\]",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n",
            r"datasets\[0\]: mixes DreamBooth subsets \(image_dir\) and fine-tuning subsets \(metadata_file\)",
        ),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", r"datasets\[0\]\.subsets\[0\]\.image_dir: required"),
        ("[general]\nbatch_size = 'four'\n", r"general\.batch_size: expected int"),
        ("[general]\nresolution = [512, 512, 3]\n", r"general\.resolution: must be SIZE or WIDTH,HEIGHT"),
        ("[general]\nflip_aug = 'yes'\n", r"general\.flip_aug: expected bool"),
        ("[general\nflip_aug = true\n", r"not valid TOML"),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nconditioning_data_dir = 'c'\n",
            r"subsets\[0\]\.conditioning_data_dir: conditioning_data_dir \(loss mask images\) .* needs --masked_loss",
        ),
    ],
)
def test_invalid_configs_name_the_key_path_and_the_file(tmp_path, toml_text, message):
    config = write(tmp_path / "bad.toml", toml_text)
    with pytest.raises(ConfigError, match=message) as error:
        load_dataset_config(config)
    assert str(config) in str(error.value) and "\n" not in str(error.value)


def test_json_configs_are_read_like_toml(tmp_path):
    config = {"general": {"resolution": [768, 512]}, "datasets": [{"subsets": [{"image_dir": "a", "num_repeats": 3}]}]}
    loaded = load_dataset_config(write(tmp_path / "dataset.json", json.dumps(config)))
    assert loaded["general"]["resolution"] == (768, 512)
    assert loaded["datasets"][0]["subsets"][0] == {"image_dir": "a", "num_repeats": 3}


def test_float_keys_accept_toml_integers(tmp_path):
    loaded = load_dataset_config(
        write(tmp_path / "d.toml", "[general]\ncaption_dropout_rate = 0\nvalidation_split = 0\n")
    )
    assert loaded["general"] == {"caption_dropout_rate": 0, "validation_split": 0}


@pytest.mark.parametrize(
    ("name", "message"), [("missing.toml", "file not found"), ("d.yaml", "must be a .toml or .json")]
)
def test_config_file_problems(tmp_path, name, message):
    (tmp_path / "d.yaml").write_text("general: {}\n")
    with pytest.raises(ConfigError, match=message):
        load_dataset_config(tmp_path / name)


# --- lookup order --------------------------------------------------------------------------------

LOOKUP_CONFIG = """
[general]
keep_tokens = 1
flip_aug = true
caption_extension = 'txt'
resolution = 64

[[datasets]]
keep_tokens = 2
batch_size = 4
  [[datasets.subsets]]
  image_dir = '{a}'
  keep_tokens = 3
  flip_aug = false
  [[datasets.subsets]]
  image_dir = '{b}'
  class_tokens = 'toy'

[[datasets]]
resolution = [128, 64]
  [[datasets.subsets]]
  image_dir = '{a}'
  num_repeats = 0
"""


def test_values_come_from_subset_then_dataset_then_general_then_flags(tmp_path, data):
    text = LOOKUP_CONFIG.format(a=data.subject, b=data.reg)
    first, second = blueprints_from(
        tmp_path, text, keep_tokens=9, train_batch_size=7, dataset_repeats=5, shuffle_caption=True
    )
    a, b = first.subsets
    assert (a.caption.keep_tokens, b.caption.keep_tokens, second.subsets[0].caption.keep_tokens) == (3, 2, 1)
    assert (a.flip_aug, b.flip_aug) == (False, True)  # False in the subset is honoured, not skipped
    assert (first.batch_size, second.batch_size) == (4, 7)  # --train_batch_size fills batch_size
    assert (a.num_repeats, second.subsets[0].num_repeats) == (5, 0)  # --dataset_repeats fills num_repeats; 0 kept
    assert a.caption.shuffle_caption and b.caption.shuffle_caption  # flag value
    assert a.caption_extension == ".txt"  # leading dot added
    assert (a.class_tokens, b.class_tokens) == (None, "toy")  # default, subset
    assert a.caption.caption_dropout_rate == 0.0 and a.caption.secondary_separator is None  # flag defaults
    assert (first.buckets.resolution, second.buckets.resolution) == ((64, 64), (128, 64))
    assert first.where.startswith("datasets[0] in ") and b.where.startswith("datasets[0].subsets[1] in ")
    assert all(bp.from_dataset_config for bp in (first, second))


def test_flags_fill_what_the_config_leaves_out(tmp_path, data):
    text = f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data.subject}'\n"
    (blueprint,) = blueprints_from(
        tmp_path,
        text,
        resolution="128,64",
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=192,
        color_aug=True,
    )
    assert blueprint.buckets.resolution == (128, 64)
    assert (blueprint.buckets.min_bucket_reso, blueprint.buckets.max_bucket_reso) == (64, 192)
    assert blueprint.subsets[0].color_aug is True


def test_dataset_config_ignores_the_data_dir_flags_with_a_warning(tmp_path, data, caplog):
    text = f"[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data.reg}'\n"
    with caplog.at_level(logging.WARNING):
        (blueprint,) = blueprints_from(tmp_path, text, train_data_dir=str(data.train_data_dir))
    assert "--train_data_dir ignored because --dataset_config is given" in caplog.text
    assert [s.image_dir for s in blueprint.subsets] == [str(data.reg)]


def test_bucket_errors_name_the_dataset_and_file(tmp_path, data):
    text = "[[datasets]]\nresolution = 64\nenable_bucket = true\nbucket_reso_steps = 32\n"
    text += f"[[datasets.subsets]]\nimage_dir = '{data.subject}'\n"
    with pytest.raises(ConfigError, match=r"datasets\[0\] in .*dataset.toml: bucket_reso_steps is 32"):
        blueprints_from(tmp_path, text, min_bucket_reso=64)


def test_resolution_is_required(tmp_path, data):
    text = f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data.subject}'\n"
    with pytest.raises(ConfigError, match="resolution is required"):
        blueprints_from(tmp_path, text)


def test_latent_caching_refuses_pixel_augmentations(tmp_path, data):
    text = f"[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data.subject}'\n"
    text += "random_crop = true\n"
    with pytest.raises(ConfigError, match=r"subsets\[0\] in .*: random_crop .* cannot be used with --cache_latents"):
        blueprints_from(tmp_path, text, cache_latents_to_disk=True)


# --- from the command line -----------------------------------------------------------------------


def test_dreambooth_folders_give_repeats_and_class_tokens(data, caplog):
    for name in ("5_my_style", "1_", "toy", "0_zero"):
        (data.train_data_dir / name).mkdir()
    (data.train_data_dir / "3_not_a_folder.txt").write_text("x")
    args = dataset_args(train_data_dir=str(data.train_data_dir), reg_data_dir=str(data.reg_data_dir), resolution="64")
    with caplog.at_level(logging.WARNING):
        (blueprint,) = build_blueprints(args)
    found = [(s.where, s.num_repeats, s.class_tokens, s.is_reg) for s in blueprint.subsets]
    assert found == [
        ("--train_data_dir/10_sks toy", 10, "sks toy", False),
        ("--train_data_dir/1_", 1, "", False),
        ("--train_data_dir/5_my_style", 5, "my_style", False),
        ("--reg_data_dir/1_toy", 1, "toy", True),
    ]
    assert "ignoring folder without a '<repeats>_' prefix" in caplog.text and "toy" in caplog.text
    assert "ignoring folder with 0 repeats" in caplog.text
    assert blueprint.where == "command line" and not blueprint.from_dataset_config
    assert blueprint.subsets[0].caption_extension == ".caption"  # kohya's default, not .txt


def test_a_train_data_dir_without_repeat_folders_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "sks toy").mkdir()
    with pytest.raises(DatasetError, match=r"--train_data_dir .*images has no '<repeats>_<class tokens>' sub-folders"):
        build_blueprints(dataset_args(train_data_dir=str(tmp_path / "images"), resolution="64"))
    with pytest.raises(DatasetError, match="is not a folder"):
        build_blueprints(dataset_args(train_data_dir=str(tmp_path / "nowhere"), resolution="64"))
    with pytest.raises(ConfigError, match="pass --train_data_dir, --in_json or --dataset_config"):
        build_blueprints(dataset_args(resolution="64"))


def test_in_json_makes_one_fine_tuning_subset(tmp_path):
    args = dataset_args(in_json="meta.json", train_data_dir=str(tmp_path), dataset_repeats=4, resolution="64")
    (blueprint,) = build_blueprints(args)
    (subset,) = blueprint.subsets
    assert not blueprint.is_dreambooth
    assert (subset.metadata_file, subset.image_dir, subset.num_repeats) == ("meta.json", str(tmp_path), 4)


def test_legacy_caption_extention_flag(data):
    args = dataset_args(train_data_dir=str(data.train_data_dir), resolution="64", caption_extention="txt")
    assert build_blueprints(args)[0].subsets[0].caption_extension == ".txt"


@pytest.mark.parametrize(
    ("value", "expected"), [("512", (512, 512)), ("768,512", (768, 512)), ((640, 448), (640, 448)), (256, (256, 256))]
)
def test_resolution_forms(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["big", "512,512,512", "0", "-64"])
def test_bad_resolution_names_the_flag(value):
    with pytest.raises(ConfigError, match="--resolution must be SIZE or WIDTH,HEIGHT"):
        parse_resolution(value)


@pytest.mark.parametrize(
    ("dataset_keys", "subset_keys", "message"),
    [
        (
            "validation_split = 1.0",
            "image_dir = '{dir}'",
            r"datasets\[0\] in .*: validation_split must be in \[0, 1\)",
        ),
        ("validation_split = 0.1", "metadata_file = 'm.json'", "validation_split works on DreamBooth datasets only"),
        ("batch_size = 0", "image_dir = '{dir}'", "batch_size must be at least 1"),
        ("resize_interpolation = 'sinc'", "image_dir = '{dir}'", "resize_interpolation 'sinc' is not one of"),
    ],
)
def test_dataset_values_are_checked(tmp_path, data, dataset_keys, subset_keys, message):
    text = f"[general]\nresolution = 64\n[[datasets]]\n{dataset_keys}\n[[datasets.subsets]]\n"
    text += subset_keys.format(dir=data.subject) + "\n"
    with pytest.raises(ConfigError, match=message):
        blueprints_from(tmp_path, text)


def test_a_dataset_without_subsets_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\[1\] in .*: no \[\[datasets.subsets\]\]"):
        blueprints_from(
            tmp_path, "[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets]]\n"
        )
