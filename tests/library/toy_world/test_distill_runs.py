"""The distillation harness: its modes reach distill_unet.py's flags, and a run's student loads back."""

import pytest

import distill_unet
from library.distill.cost import count_parameters
from library.distill.students import preset_config
from library.models.stable_diffusion import save_ldm_checkpoint
from library.toy_world.distill_runs import (
    DISTILL_MODES,
    DistillRun,
    distill_argv,
    initial_student,
    load_student,
)
from library.toy_world.generator import write_dataset
from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer
from library.training.args import parse_args
from library.training.theseus import parse_replacement_schedule

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# mode -> (task, output KD, feature KD) weights, restated from docs/quality.md's distill row
EXPECTED_WEIGHTS = {
    "kd": (1.0, 1.0, 1.0),
    "kd_only": (0.0, 1.0, 1.0),
    "no_kd": (1.0, 0.0, 0.0),
    "kd_theseus": (1.0, 1.0, 1.0),
}


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_distill")
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(root / "tokenizers"))
    model = build_toy_model(tokenizer, seed=0)
    save_ldm_checkpoint(model, root / "toy.safetensors")
    write_dataset(root / "img" / "1_toy", [("red", "star"), ("blue", "ring")], 2, seed=0)
    return root, model


@pytest.mark.parametrize("mode", sorted(DISTILL_MODES))
def test_each_mode_sets_the_loss_weights_it_names(tmp_path, mode):
    run = DistillRun("bk_small", mode, max_train_steps=90)
    argv = distill_argv("toy.safetensors", "tok", tmp_path / "img", tmp_path / "out", run)
    args = parse_args(distill_unet.setup_parser(), argv)
    assert (args.task_loss_weight, args.output_kd_weight, args.feature_kd_weight) == EXPECTED_WEIGHTS[mode]
    assert args.student == "bk_small" and args.max_train_steps == 90 and args.cache_latents
    assert args.theseus == (mode == "kd_theseus")
    if args.theseus:  # p reaches 1 two thirds of the way through the run
        schedule = parse_replacement_schedule(args.theseus_schedule)
        assert schedule.probability(0) == 0.3
        assert schedule.probability(59) < 1.0 and schedule.probability(60) == 1.0


def test_a_run_saves_the_student_it_names_and_it_loads_back(toy_files, tmp_path):
    root, teacher = toy_files
    run = DistillRun("bk_tiny", "kd", max_train_steps=2, train_batch_size=2)
    distill_unet.main(distill_argv(root / "toy.safetensors", root / "tokenizers", root / "img", tmp_path, run))
    student = load_student(tmp_path)
    expected = preset_config(teacher.unet.config, "bk_tiny")
    assert list(student.config.block_out_channels) == list(expected["block_out_channels"])
    assert student.config.layers_per_block == 1 and student.config.mid_block_type is None
    assert count_parameters(student) == count_parameters(initial_student(teacher.unet, "bk_tiny"))
    assert count_parameters(student) < count_parameters(teacher.unet)
    assert not any(p.requires_grad for p in student.parameters())
