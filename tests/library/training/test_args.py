"""kohya flags, --config_file precedence, unknown keys and flag checks."""

import argparse

import pytest
import toml

from library.errors import ConfigError
from library.training.args import int_or_float, parse_key_values, parse_resolution, verify_training_args
from library.training.args import train_network_parser as setup_parser
from library.training.config_file import parse_args, write_config_file


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


def test_config_file_tables_are_flattened_and_cli_wins(tmp_path):
    config = tmp_path / "my.toml"
    config.write_text(
        toml.dumps(
            {
                "model_arguments": {"pretrained_model_name_or_path": "model.safetensors", "v2": False},
                "training": {"learning_rate": 1e-4, "max_train_steps": 10, "gradient_checkpointing": True},
                "network_args": {"network_module": "networks.lora", "network_args": ["conv_dim=4", "conv_alpha=1"]},
                "resolution": [768, 512],
            }
        )
    )
    args = _parse(["--config_file", str(config), "--max_train_steps", "20"])
    assert args.pretrained_model_name_or_path == "model.safetensors"
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.max_train_steps == 20
    assert args.gradient_checkpointing is True
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.resolution == "768,512"
    # the extension may be omitted, as in kohya
    assert _parse(["--config_file", str(tmp_path / "my")]).learning_rate == 1e-4


def test_unknown_config_keys_are_named_with_a_suggestion(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("learning_rat = 1e-4\n")
    with pytest.raises(ConfigError, match=r"learning_rat \(did you mean learning_rate\?\)") as err:
        _parse(["--config_file", str(config)])
    assert str(config) in str(err.value)


def test_config_values_are_type_checked(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('gradient_checkpointing = "yes"\n')
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        _parse(["--config_file", str(config)])
    config.write_text('max_train_steps = "many"\n')
    with pytest.raises(SystemExit):
        _parse(["--config_file", str(config)])


def test_unsupported_kohya_keys_pass_at_defaults_and_are_refused_when_set(tmp_path):
    config = tmp_path / "gui.toml"
    config.write_text('huggingface_repo_id = ""\nfp8_base = false\nlearning_rate = 1e-4\n')
    assert _parse(["--config_file", str(config)]).learning_rate == 1e-4
    config.write_text("fp8_base = true\n")
    with pytest.raises(ConfigError, match="fp8_base"):
        _parse(["--config_file", str(config)])


def test_output_config_round_trips_and_refuses_overwrite(tmp_path):
    parser = setup_parser()
    args = parse_args(parser, ["--learning_rate", "3e-4", "--network_args", "conv_dim=8", "--flip_aug"])
    path = write_config_file(args, parser, str(tmp_path / "out"))
    written = toml.load(path)
    assert written == {"learning_rate": 3e-4, "network_args": ["conv_dim=8"], "flip_aug": True}
    again = parse_args(parser, ["--config_file", str(path)])
    assert vars(again) | {"config_file": None} == vars(args) | {"config_file": None}
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_config_file(args, parser, str(path))


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
        ({"v_pred_like_loss": 0.1, "v_parameterization": True}, "--v_pred_like_loss"),
    ],
)
def test_verify_refuses_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        verify_training_args(_valid(**overrides))
