"""distill_unet.py's pieces below the end-to-end runs: flags, output formats, EMA, export, Theseus draws."""

import argparse
from types import SimpleNamespace

import pytest
import toml
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from library.distill.args import distill_unet_parser, output_format, verify_distill_args
from library.distill.ema import TrainingEMA
from library.distill.export import cpu_copy
from library.distill.task import DistillTask
from library.errors import ConfigError
from library.tiny_sd import tiny_unet_config
from library.training.args import parse_args
from library.training.theseus import TheseusController, draw_replacements, parse_replacement_schedule


def parsed(*argv: str) -> argparse.Namespace:
    base = ["--pretrained_model_name_or_path", "model", "--output_dir", "out", "--student", "bk_small"]
    return parse_args(distill_unet_parser(), [*base, *argv])


# ---- flags ----------------------------------------------------------------------------------


def test_distill_flags_have_the_documented_defaults():
    args = parsed()
    assert (args.task_loss_weight, args.output_kd_weight, args.feature_kd_weight) == (1.0, 1.0, 1.0)
    assert not args.feature_kd_normalize and not args.theseus and not args.use_ema
    assert args.ema_decay == 0.9999 and args.save_model_as is None and args.teacher_dtype is None
    verify_distill_args(args)


def test_config_files_carry_distill_keys_and_the_redefined_save_format(tmp_path):
    config = tmp_path / "distill.toml"
    config.write_text(
        toml.dumps({"model": {"student": "bk_tiny", "use_ema": True}, "saving": {"save_model_as": "diffusers"}})
    )
    args = parse_args(distill_unet_parser(), ["--config_file", str(config), "--ema_decay", "0.99"])
    assert (args.student, args.use_ema, args.ema_decay, args.save_model_as) == ("bk_tiny", True, 0.99, "diffusers")


@pytest.mark.parametrize(
    ("save_model_as", "network", "expected"),
    [
        (None, False, (True, "")),
        ("diffusers", False, (True, "")),
        ("diffusers_safetensors", False, (True, "")),
        ("safetensors", False, (True, "safetensors")),
        ("ckpt", False, (True, "ckpt")),
        (None, True, (False, "safetensors")),
        ("pt", True, (False, "pt")),
    ],
)
def test_output_formats(save_model_as, network, expected):
    resolved = output_format(save_model_as, network)
    assert (resolved.folder, resolved.extension) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output_kd_weight", "-1"], r"--output_kd_weight must be >= 0"),
        (["--task_loss_weight", "0", "--output_kd_weight", "0", "--feature_kd_weight", "0"], "nothing to train"),
        (["--network_module", "networks.lora"], r"cannot be combined with --student/--student_config"),
        (["--text_encoder_lr", "1e-4"], r"--text_encoder_lr cannot be used with distill_unet\.py"),
        (["--torch_compile"], r"--torch_compile cannot be used"),
        (["--ema_decay", "1.5"], r"--ema_decay must be in \[0, 1\]"),
        (["--theseus", "--theseus_steps", "-1"], r"--theseus_steps must be >= 0"),
        (["--theseus", "--theseus_schedule", "linear:0.1"], r"--theseus_schedule 'linear:0.1' is not a replacement"),
        (["--theseus_steps", "10"], r"--theseus_steps needs --theseus"),
        (["--student_config", "missing.json"], r"--student_config 'missing\.json' cannot be read"),
    ],
)
def test_bad_flag_combinations_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        verify_distill_args(parsed(*argv))


def test_a_network_is_saved_as_a_file_and_a_student_needs_a_source():
    args = parse_args(
        distill_unet_parser(),
        ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--network_module", "networks.lora"],
    )
    args.save_model_as = "diffusers"
    with pytest.raises(ConfigError, match=r"--save_model_as diffusers saves a UNet"):
        verify_distill_args(args)
    args = parse_args(distill_unet_parser(), ["--pretrained_model_name_or_path", "m", "--output_dir", "o"])
    students = r"bk_base, bk_small, bk_tiny, ssd_1b, vega"
    with pytest.raises(ConfigError, match=rf"pass --student \({students}\), --student_config FILE"):
        verify_distill_args(args)


# ---- EMA ------------------------------------------------------------------------------------


def test_ema_averages_half_precision_weights_in_float32():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ours, plain = TrainingEMA([weight], decay=0.999), EMAModel([weight], decay=0.999)
    for _ in range(100):  # diffusers' warm-up: decay min(0.999, (1 + step) / (10 + step)), 0.92 by now
        ours.step([weight])
        plain.step([weight])
    with torch.no_grad():
        weight.add_(2.0**-7)  # the next bf16 value after 1.0
    for _ in range(300):
        ours.step([weight])
        plain.step([weight])
    # Each update moves a bf16 average by under half its rounding step, so it never leaves 1.0.
    assert torch.equal(plain.shadow_params[0], torch.ones(4, dtype=torch.bfloat16))
    assert ours.shadow_params[0].dtype == torch.float32
    assert torch.all(ours.shadow_params[0] > 1 + 0.9 * 2.0**-7)


def test_ema_swaps_in_the_average_and_restores_the_exact_weights():
    weights = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(5))]
    ema = TrainingEMA(weights, decay=0.9)
    ema.step(weights)  # diffusers' first step copies the weights
    raw = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.mul_(3.0)
    ema.step(weights)
    trained = [w.detach().clone() for w in weights]
    with ema.averaged(weights):
        assert all(torch.equal(w, s) for w, s in zip(weights, ema.shadow_params))
        assert not any(torch.equal(w, t) for w, t in zip(weights, trained))
        assert not any(torch.equal(w, r) for w, r in zip(weights, raw))
    assert all(torch.equal(w, t) for w, t in zip(weights, trained))


def test_ema_state_round_trips_in_float32():
    weights = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    ema = TrainingEMA(weights, decay=0.9)
    ema.step(weights)
    restored = TrainingEMA(weights, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.optimization_step == 1
    assert restored.shadow_params[0].dtype == torch.float32
    assert torch.equal(restored.shadow_params[0], ema.shadow_params[0])


# ---- export ---------------------------------------------------------------------------------


def test_cpu_copy_casts_a_copy_and_leaves_the_live_model_alone():
    unet = UNet2DConditionModel(**tiny_unet_config(False))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    copy = cpu_copy(unet, torch.float16)
    assert {v.dtype for v in copy.state_dict().values()} == {torch.float16}
    assert all(torch.equal(copy.state_dict()[k], v.half()) for k, v in before.items())
    assert unet.dtype == torch.float32 and all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert copy.config == unet.config


# ---- Theseus draws under gradient accumulation ----------------------------------------------


def theseus_task(theseus_steps):
    """A DistillTask with only what ``on_step_start`` uses: the student, the controller, the dataset."""
    student = UNet2DConditionModel(**tiny_unet_config(False))
    units = [SimpleNamespace(use_successor=False) for _ in range(5)]
    controller = TheseusController(units, parse_replacement_schedule("linear:0.2,0.1"), seed=11)
    args = SimpleNamespace(use_ema=False, theseus_steps=theseus_steps)
    return DistillTask(
        args, None, SimpleNamespace(unet=student), None, student, [], None, None, None,
        SimpleNamespace(set_current_step=lambda step: None), theseus=controller,
    ), units  # fmt: skip


def test_each_micro_batch_draws_from_seed_step_and_index_and_theseus_steps_ends_the_draws():
    task, units = theseus_task(theseus_steps=2)
    for step, micro in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        task.on_step_start(step)
        expected = draw_replacements(5, min(1.0, 0.2 * step + 0.1), 11, step, micro)
        assert [unit.use_successor for unit in units] == expected.tolist(), (step, micro)
        assert task.theseus_state.rate == pytest.approx(expected.float().mean().item())
    task.on_step_start(2)
    assert all(unit.use_successor for unit in units) and task.theseus_state.probability == 1.0
