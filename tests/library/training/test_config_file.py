"""kohya's --config_file: flattened tables, precedence, unknown keys, GUI booleans, --output_config."""

import logging

import pytest
import toml

from library.errors import ConfigError
from library.training.args import parse_args
from library.training.args import train_network_parser as setup_parser
from library.training.config_file import config_bool, write_config_file


def _parse(argv):
    return parse_args(setup_parser(), argv)


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


def test_unknown_keys_are_ignored_with_one_warning_that_lists_them(tmp_path, caplog):
    config = tmp_path / "gui.toml"
    config.write_text('epoch = 10\nnoise_offset_type = "Original"\nlearning_rat = 1e-4\nmax_train_steps = 7\n')
    with caplog.at_level(logging.WARNING):
        args = _parse(["--config_file", str(config)])
    assert args.max_train_steps == 7 and args.learning_rate == 2e-6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(config) in warnings[0]
    assert "epoch" in warnings[0] and "noise_offset_type" in warnings[0]
    assert "learning_rat (did you mean learning_rate?)" in warnings[0]


def test_known_keys_give_no_warning(tmp_path, caplog):
    config = tmp_path / "ok.toml"
    config.write_text('dynamo_backend = "no"\nwandb_run_name = "run"\nmasked_loss = false\n')
    with caplog.at_level(logging.WARNING):
        args = _parse(["--config_file", str(config)])
    assert args.dynamo_backend == "no" and args.wandb_run_name == "run"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False), ('"true"', True), ('"False"', False), ('"1"', True)],
)
def test_store_true_keys_take_the_gui_spellings(tmp_path, value, expected):
    config = tmp_path / "b.toml"
    config.write_text(f"persistent_data_loader_workers = {value}\nflip_aug = 1\n")
    args = _parse(["--config_file", str(config)])
    assert args.persistent_data_loader_workers is expected
    assert args.flip_aug is True


def test_config_bool_refuses_values_with_no_clear_meaning():
    assert config_bool(1.0, "k", "f.toml") is True
    for bad in (2, "maybe", [True]):
        with pytest.raises(ConfigError, match=r"^f\.toml: 'k' must be true or false"):
            config_bool(bad, "k", "f.toml")


def test_integral_floats_fill_int_flags(tmp_path):
    config = tmp_path / "n.toml"
    config.write_text("bucket_reso_steps = 64.0\ngradient_accumulation_steps = 2.0\n")
    args = _parse(["--config_file", str(config)])
    assert args.bucket_reso_steps == 64 and isinstance(args.bucket_reso_steps, int)
    assert args.gradient_accumulation_steps == 2


def test_config_values_are_type_checked(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('gradient_checkpointing = "yes please"\n')
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        _parse(["--config_file", str(config)])
    config.write_text('max_train_steps = "many"\n')
    with pytest.raises(SystemExit):
        _parse(["--config_file", str(config)])


def test_unsupported_kohya_keys_pass_at_defaults_and_are_refused_when_set(tmp_path):
    config = tmp_path / "gui.toml"
    config.write_text("fp8_base = false\nzero_stage = 2\nlearning_rate = 1e-4\n")
    assert _parse(["--config_file", str(config)]).learning_rate == 1e-4
    config.write_text("fp8_base = true\n")
    with pytest.raises(ConfigError, match="^--fp8_base: float8"):
        _parse(["--config_file", str(config)])


def test_output_config_round_trips_refuses_overwrite_and_keeps_no_api_key(tmp_path):
    parser = setup_parser()
    args = parse_args(
        parser, ["--learning_rate", "3e-4", "--network_args", "conv_dim=8", "--flip_aug", "--wandb_api_key", "k"]
    )
    path = write_config_file(args, parser, str(tmp_path / "out"))
    written = toml.load(path)
    assert written == {"learning_rate": 3e-4, "network_args": ["conv_dim=8"], "flip_aug": True}
    again = parse_args(parser, ["--config_file", str(path)])
    assert vars(again) | {"config_file": None, "wandb_api_key": "k"} == vars(args) | {"config_file": None}
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_config_file(args, parser, str(path))
