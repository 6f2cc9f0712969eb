"""kohya's flags (every one of train_network.py v0.10.1), their defaults, refusals and checks."""

import argparse
import json
from pathlib import Path

import pytest

from library.errors import ConfigError
from library.training.args import (
    int_or_float,
    parse_args,
    parse_key_values,
    parse_resolution,
    verify_training_args,
)
from library.training.args import train_network_parser as setup_parser
from library.training.refused_flags import UNSUPPORTED_KOHYA_FLAGS

# Read from kohya's own parser (see the file's "how"), not from ours.
KOHYA_FLAGS = json.loads(
    (Path(__file__).parents[2] / "fixtures" / "kohya" / "train_network_flags_v0.10.1.json").read_text()
)["flags"]


def _parse(argv):
    return parse_args(setup_parser(), argv)


def test_kohya_defaults_are_kept():
    args = _parse([])
    assert args.learning_rate == 2e-6
    assert args.caption_extension == ".caption"
    assert args.max_train_steps == 1600
    assert args.network_alpha == 1
    assert args.save_model_as == "safetensors"
    assert args.lr_scheduler == "constant"
    assert args.min_bucket_reso == 256 and args.max_bucket_reso == 1024 and args.bucket_reso_steps == 64


def _sample_tokens(flag: dict) -> list[str]:
    """A value of the kind kohya's parser takes for this flag."""
    if flag["action"] == "store_true":
        return [flag["flag"]]
    choices = [c for c in flag["choices"] or [] if c is not None]
    value = choices[-1] if choices else {"int": 3, "float": 0.5}.get(flag["type"], "7")
    return [flag["flag"], str(value)]


def test_the_fixture_is_kohyas_whole_parser():
    assert len(KOHYA_FLAGS) == 193  # research/kohya.md: 193 options
    names = {f["flag"] for f in KOHYA_FLAGS}
    assert {"--dynamo_backend", "--wandb_run_name", "--masked_loss", "--initial_step", "--config_file"} <= names


@pytest.mark.parametrize("flag", KOHYA_FLAGS, ids=[f["flag"] for f in KOHYA_FLAGS])
def test_every_kohya_flag_parses_with_kohyas_default(flag):
    parser = setup_parser()
    dest = flag["flag"].removeprefix("--")
    assert parser.get_default(dest) == flag["default"]
    args = parser.parse_args(_sample_tokens(flag))
    assert getattr(args, dest) not in (None, False)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_KOHYA_FLAGS))
def test_unsupported_kohya_flags_are_refused_when_set_in_one_line(name):
    flag = next(f for f in KOHYA_FLAGS if f["flag"] == f"--{name}")
    assert _parse([]).__dict__[name] == flag["default"]  # at the default: accepted
    with pytest.raises(ConfigError, match=f"^--{name}: .* is not supported by this suite$"):
        _parse(_sample_tokens(flag))


def test_unknown_cli_flag_fails():
    with pytest.raises(SystemExit):
        _parse(["--learning_rat", "1"])


def test_int_or_float_and_resolution():
    assert int_or_float("500") == 500 and isinstance(int_or_float("500"), int)
    assert int_or_float("0.1") == 0.1
    assert int_or_float("10%") == 0.1
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("768,512") == (768, 512)
    with pytest.raises(ConfigError, match="--resolution"):
        parse_resolution("big")


def test_key_values():
    assert parse_key_values(["conv_dim=4", "a=b=c"], "--network_args") == {"conv_dim": "4", "a": "b=c"}
    with pytest.raises(ConfigError, match="--network_args"):
        parse_key_values(["conv_dim"], "--network_args")


def _valid(**overrides) -> argparse.Namespace:
    args = _parse(["--pretrained_model_name_or_path", "m", "--output_dir", "o"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_verify_normalises_kohya_aliases():
    args = _valid(caption_extention=".txt", cache_latents_to_disk=True, use_8bit_adam=True, sample_every_n_steps=0)
    verify_training_args(args)
    assert args.caption_extension == ".txt"
    assert args.cache_latents
    assert args.optimizer_type == "AdamW8bit"
    assert args.sample_every_n_steps is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bucket_reso_steps": 32}, "multiple of 64"),
        ({"cache_latents": True, "color_aug": True}, "--cache_latents"),
        ({"full_fp16": True}, "--full_fp16"),
        ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, "exclude each other"),
        ({"pretrained_model_name_or_path": None}, "--pretrained_model_name_or_path"),
        ({"metadata_thumbnail": "no/such.png"}, "--metadata_thumbnail 'no/such.png'"),
        ({"v_pred_like_loss": 0.1, "v_parameterization": True}, "--v_pred_like_loss"),
    ],
)
def test_verify_refuses_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        verify_training_args(_valid(**overrides))
