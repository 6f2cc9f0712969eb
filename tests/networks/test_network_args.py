"""Typed --network_args: parsing, errors, metadata round trip and kohya's block-wise lr weights."""

import math
from dataclasses import dataclass

import pytest

from networks.network_args import SDXL_BLOCKS, NetworkArgs, NetworkArgsError, parse_lr_weights, parse_network_args


@dataclass
class ExampleArgs(NetworkArgs):
    decompose_both: bool = False
    rank: int | None = None
    ratios: tuple[float, ...] | None = None


@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), ("0", False), ("True", True)])
def test_booleans_parse_by_meaning_not_truthiness(text, expected):
    assert parse_network_args(ExampleArgs, {"decompose_both": text}).decompose_both is expected


def test_values_are_typed_and_unset_values_keep_defaults():
    args = parse_network_args(ExampleArgs, {"rank": "8", "ratios": "0.5, 2", "loraplus_lr_ratio": "16"})
    assert (args.rank, args.ratios, args.loraplus_lr_ratio) == (8, (0.5, 2.0), 16.0)
    # kohya's train_network.py injects dropout=None into every network's args; metadata writes null.
    assert parse_network_args(ExampleArgs, {"dropout": None, "rank": "None"}) == ExampleArgs()


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(NetworkArgsError, match=r"unknown network_args rnak; valid keys: .*decompose_both.*rank"):
        parse_network_args(ExampleArgs, {"rnak": "4"})


@pytest.mark.parametrize("key, value", [("rank", "4.5"), ("decompose_both", "maybe"), ("ratios", "1,x")])
def test_bad_values_name_key_and_value(key, value):
    with pytest.raises(NetworkArgsError, match=f"{key}='{value}'"):
        parse_network_args(ExampleArgs, {key: value})


def test_metadata_lists_changed_args_and_parses_back():
    args = parse_network_args(ExampleArgs, {"decompose_both": "true", "ratios": "1,2.5", "down_lr_weight": "sine"})
    metadata = args.to_metadata()
    assert set(metadata) == {"decompose_both", "ratios", "down_lr_weight"}
    assert parse_network_args(ExampleArgs, metadata) == args


# ---- block-wise learning rates ----


def test_lr_weight_presets_follow_their_curves():
    ramp = [i / 11 for i in range(12)]
    assert parse_lr_weights("cosine") == pytest.approx([math.cos(math.pi / 2 * r) for r in ramp])
    assert parse_lr_weights("sine") == pytest.approx([math.sin(math.pi / 2 * r) for r in ramp])
    assert parse_lr_weights("linear") == pytest.approx(ramp)
    assert parse_lr_weights("reverse_linear+0.5") == pytest.approx([1.5 - r for r in ramp])
    assert parse_lr_weights("zeros+.25") == (0.25,) * 12


def test_lr_weight_lists_are_padded_with_ones_and_blanks_are_zero():
    assert parse_lr_weights("0.5,,2") == (0.5, 0.0, 2.0) + (1.0,) * 9


@pytest.mark.parametrize("value", ["sinus", "0.5", ",".join(["1"] * 13)])
def test_bad_lr_weights_raise(value):
    with pytest.raises(NetworkArgsError, match="down_lr_weight"):
        parse_network_args(NetworkArgs, {"down_lr_weight": value})


def test_block_lr_weights_lay_out_down_mid_up_and_cut_at_threshold():
    args = parse_network_args(
        NetworkArgs, {"down_lr_weight": "0.1,0.5", "mid_lr_weight": "2", "block_lr_zero_threshold": "0.2"}
    )
    assert args.block_lr_weights() == [0.0, 0.5] + [1.0] * 10 + [2.0] + [1.0] * 12
    assert NetworkArgs().block_lr_weights() is None


def test_sdxl_lr_weights_have_kohyas_23_blocks():
    """kohya on SDXL: 9 down, 3 mid, 9 up values, presets over 9 blocks, and 1.0 for time embedding and out."""
    args = parse_network_args(
        NetworkArgs, {"down_lr_weight": "0.1,0.5", "mid_lr_weight": "2,3", "up_lr_weight": "zeros+2"}
    )
    assert args.block_lr_weights(SDXL_BLOCKS) == [1.0, 0.1, 0.5] + [1.0] * 7 + [2.0, 3.0, 1.0] + [2.0] * 9 + [1.0]
    with pytest.raises(NetworkArgsError, match="mid_lr_weight on SD1/2: 2 values given, at most 1"):
        args.block_lr_weights()  # SD1/2 has one mid block


def test_lr_weights_are_kept_as_given_for_the_metadata():
    args = parse_network_args(NetworkArgs, {"down_lr_weight": "0.5,,2", "up_lr_weight": "sine+0.1"})
    assert args.to_metadata() == {"down_lr_weight": "0.5,0.0,2.0", "up_lr_weight": "sine+0.1"}
    assert parse_network_args(NetworkArgs, args.to_metadata()) == args
