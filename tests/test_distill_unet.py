"""distill_unet.py end to end on the tiny fixtures: KD, export, LoRA on the student, resume, errors, ranks."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import distill_unet
import train_network
from library.distill.students import build_student, student_config
from library.errors import ConfigError
from library.models.stable_diffusion import load_stable_diffusion, save_diffusers_folder
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.training.theseus import draw_replacements
from networks import lora
from networks.lora_file import load_lora_file
from tests.cli_runs import assert_one_line_refusal

REPO = Path(__file__).resolve().parents[1]

# Student block <- teacher tensor of BK-Tiny (docs/distill.md, Segmind's alignment), written out
# here so that the measurement does not depend on the code under test.
TINY_FEATURE_PAIRS = {
    "down_blocks.0": "down_blocks.0",
    "down_blocks.1": "down_blocks.1",
    "down_blocks.2": "up_blocks.0",
    "up_blocks.0": "up_blocks.1",
    "up_blocks.1": "up_blocks.2",
    "up_blocks.2": "up_blocks.3",
}
FIXED_TIMESTEPS = [100, 400, 700, 950]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def distill_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data / "img"),
        "--output_dir", str(out),
        "--output_name", "student",
        "--resolution", "64",
        "--caption_extension", ".txt",
        "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW",
        "--seed", "7",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def distilled(tiny_sd, tmp_path_factory):
    """A BK-Tiny student of the tiny SD1 model after 20 steps of output + feature KD.

    The tiny teacher has random weights, so its predictions are far from the true noise and the
    task term pulls the student away from it; KD alone is what this student measures.
    """
    root = tmp_path_factory.mktemp("distilled")
    shutil.copytree(tiny_sd.train_data_dir, root / "img")
    AcceleratorState._reset_state(reset_partial_state=True)
    argv = [
        "--student",
        "bk_tiny",
        "--task_loss_weight",
        "0",
        "--max_train_steps",
        "20",
        "--save_model_as",
        "safetensors",
    ]
    try:
        distill_unet.main(distill_argv(tiny_sd.sd1_dir, root, root / "out", *argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return root / "out"


# ---- independent measurements -----------------------------------------------------------------


def _image(path: Path) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((64, 64))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def fixed_inputs(model_dir: Path, image_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents, timesteps and text embeddings of four training images, with fixed noise."""
    model = load_stable_diffusion(model_dir)
    pngs = sorted(image_dir.glob("*.png"))[:4]
    captions = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    generator = torch.Generator().manual_seed(123)
    posterior = model.vae.encode(torch.stack([_image(p) for p in pngs])).latent_dist
    latents = posterior.sample(generator) * model.vae.config.scaling_factor
    timesteps = torch.tensor(FIXED_TIMESTEPS)
    noisy = model.noise_scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)
    return noisy, timesteps, encode_tokens(model.text_encoder, tokenize_captions(model.tokenizer, captions))


@torch.no_grad()
def run_recording(unet: torch.nn.Module, names, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    outputs = {}
    handles = [
        unet.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: outputs.__setitem__(name, out[0] if isinstance(out, tuple) else out)
        )
        for name in names
    ]
    prediction = unet(*inputs).sample
    for handle in handles:
        handle.remove()
    return prediction, outputs


def kd_terms(student, teacher, inputs, pairs=TINY_FEATURE_PAIRS) -> tuple[float, float]:
    """(output KD, summed feature KD): plain MSEs of the student against the teacher."""
    teacher_out, teacher_features = run_recording(teacher, pairs.values(), inputs)
    student_out, student_features = run_recording(student, pairs.keys(), inputs)
    output_kd = torch.nn.functional.mse_loss(student_out, teacher_out).item()
    feature_kd = sum(
        torch.nn.functional.mse_loss(student_features[s], teacher_features[t]).item() for s, t in pairs.items()
    )
    return output_kd, feature_kd


def saved_unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def state_objects(state_dir: Path) -> tuple[dict, dict]:
    """The raw student weights and the EMA state of a --save_state folder (the task's checkpoint objects)."""
    raw = torch.load(state_dir / "custom_checkpoint_0.pkl", weights_only=True)
    ema = torch.load(state_dir / "custom_checkpoint_1.pkl", weights_only=True)
    return raw, ema


def scalars(log_root: Path, tag: str) -> dict[int, float]:
    """A TensorBoard scalar by step, from whichever event file of the run holds it."""
    values = {}
    for path in log_root.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({event.step: event.value for event in events.Scalars(tag)})
    return values


# ---- KD and export ----------------------------------------------------------------------------


def test_distillation_lowers_both_kd_terms_on_fixed_batches(tiny_sd, distilled):
    teacher = load_stable_diffusion(tiny_sd.sd1_dir).unet
    initial, _ = build_student(teacher, student_config(teacher.config, "bk_tiny"))
    trained = UNet2DConditionModel.from_pretrained(distilled / "student" / "unet")
    inputs = fixed_inputs(tiny_sd.sd1_dir, tiny_sd.train_data_dir / "10_sks toy")
    output_before, features_before = kd_terms(initial, teacher, inputs)
    output_after, features_after = kd_terms(trained, teacher, inputs)
    assert output_after < 0.8 * output_before, (output_before, output_after)
    assert features_after < 0.8 * features_before, (features_before, features_after)


def test_the_saved_student_is_a_pipeline_and_a_single_file(tiny_sd, distilled):
    folder = distilled / "student"
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["layers_per_block"] == 1 and config["mid_block_type"] is None
    assert config["block_out_channels"] == [32, 64, 64]  # the student's config, not the teacher's

    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    images = pipeline(
        "a photo of sks toy",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0

    single = load_stable_diffusion(distilled / "student.safetensors", tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    for part in ("unet", "text_encoder", "vae"):
        from_file, from_folder = getattr(single, part).state_dict(), getattr(pipeline, part).state_dict()
        assert from_file.keys() == from_folder.keys()
        assert all(torch.equal(from_file[k], v) for k, v in from_folder.items()), part


def test_a_lora_trained_on_the_student_loads_back_and_changes_its_output(distilled, data):
    train_network.main(
        [
            "--pretrained_model_name_or_path", str(distilled / "student"),
            "--train_data_dir", str(data / "img"),
            "--output_dir", str(data / "lora"),
            "--output_name", "lora",
            "--resolution", "64",
            "--caption_extension", ".txt",
            "--network_module", "networks.lora",
            "--network_dim", "4",
            "--network_alpha", "4",
            "--learning_rate", "1e-3",
            "--max_train_steps", "4",
            "--seed", "7",
            "--max_data_loader_n_workers", "0",
        ]
    )  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator), 500, torch.randn(2, 77, 64, generator=generator))
    pipeline = StableDiffusionPipeline.from_pretrained(distilled / "student", local_files_only=True)
    with torch.no_grad():
        plain = pipeline.unet(*inputs).sample
        pipeline.load_lora_weights(str(data / "lora"), weight_name="lora.safetensors")
        with_diffusers = pipeline.unet(*inputs).sample

    ours = load_stable_diffusion(distilled / "student")
    network, weights = lora.create_network_from_weights(
        1.0, str(data / "lora" / "lora.safetensors"), None, ours.text_encoder, ours.unet
    )
    network.apply_to(ours.text_encoder, ours.unet)
    network.load_state_dict(weights)
    with torch.no_grad():
        with_ours = ours.unet(*inputs).sample
    assert (with_diffusers - plain).abs().max() > 1e-3
    torch.testing.assert_close(with_diffusers, with_ours, rtol=1e-4, atol=1e-5)


def test_a_saved_student_keeps_distilling_from_the_teacher_it_names(tiny_sd, distilled, data):
    argv = ["--teacher", str(tiny_sd.sd1_dir), "--task_loss_weight", "0", "--max_train_steps", "5"]
    distill_unet.main(distill_argv(distilled / "student", data, data / "out", *argv))

    loaded, continued = distilled / "student", data / "out" / "student"

    def unet_config(folder: Path) -> dict:
        config = json.loads((folder / "unet" / "config.json").read_text())
        return {key: value for key, value in config.items() if not key.startswith("_")}

    assert unet_config(continued) == unet_config(loaded)  # the loaded student, not a preset built anew
    # Trained from the loaded weights: 5 AdamW steps at lr 1e-3 move each weight by at most
    # 5 * lr * (1 - beta1) / sqrt(1 - beta2) = 0.016 (kd terms after so few steps are noise).
    start, end = saved_unet(loaded), saved_unet(continued)
    distances = [(end[name] - tensor).abs().max().item() for name, tensor in start.items()]
    assert 0 < max(distances) <= 5 * 1e-3 * 0.1 / 0.001**0.5 and sum(d > 0 for d in distances) > 0.9 * len(start)
    for part in ("text_encoder", "vae"):  # carried over unchanged
        (weights,) = (continued / part).glob("*.safetensors")
        before, after = load_file(loaded / part / weights.name), load_file(weights)
        assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "config", "message"),
    [
        (["--student", "bk_huge"], None, r"--student 'bk_huge' is unknown; choose one of bk_base, bk_small, bk_tiny"),
        (
            ["--student", "bk_small"],
            {"block_out_channels": [32, 64, 64, 96]},
            r"student tensor 'down_blocks\.3\..*' \(96,.*cannot come from teacher",
        ),
        ([], {"layers_per_block": 3}, r"student down_blocks\.0\.resnets has 3 layers but teacher .* only 2"),
        ([], {"layers_per_block": 1, "num_layers": 2}, r"'num_layers' is not a UNet2DConditionModel argument"),
        (
            ["--student", "bk_tiny", "--theseus_schedule", "linear:0.1,0.3"],
            None,
            r"--theseus_schedule needs --theseus",
        ),
        (["--student", "bk_tiny", "--network_dim", "4"], None, r"--network_dim needs --network_module"),
        (["--student", "bk_tiny", "--save_model_as", "pt"], None, r"--save_model_as pt is for network files"),
    ],
    ids=["unknown-student", "other-channels", "more-layers", "unknown-key", "theseus-flag", "network-flag", "format"],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tiny_sd, data, capsys, extra, config, message):
    if config is not None:
        (data / "student.json").write_text(json.dumps(config))
        extra = [*extra, "--student_config", str(data / "student.json")]
    argv = distill_argv(tiny_sd.sd1_dir, data, data / "out", "--logging_dir", str(data / "logs"), *extra)
    with pytest.raises(ConfigError, match=message):
        distill_unet.main(argv)
    assert_one_line_refusal(distill_unet.main, argv, capsys)
    assert not (data / "out").exists() and not (data / "logs").exists()


def test_a_teacher_of_another_kind_is_refused(tiny_sd, data):
    argv = distill_argv(
        tiny_sd.sd1_dir, data, data / "out", "--student", "bk_small", "--teacher", str(tiny_sd.sd2_dir)
    )
    with pytest.raises(ConfigError, match=r"--teacher '.*sd2' is SD2 v-prediction but the loaded model is SD1"):
        distill_unet.main(argv)
    assert not (data / "out").exists()


# ---- resume, EMA, Theseus ---------------------------------------------------------------------


def test_resume_continues_exactly_with_ema_and_theseus_draws(tiny_sd, data):
    flags = [
        "--student", "bk_tiny", "--max_train_steps", "6", "--save_state",
        "--use_ema", "--ema_decay", "0.9", "--theseus", "--theseus_schedule", "linear:0.15,0.2",
    ]  # fmt: skip
    whole, resumed = data / "whole", data / "resumed"
    distill_unet.main(
        distill_argv(
            tiny_sd.sd1_dir, data, whole, *flags, "--save_every_n_steps", "3", "--logging_dir", str(data / "logs")
        )
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    distill_unet.main(
        distill_argv(tiny_sd.sd1_dir, data, resumed, *flags, "--resume", str(whole / "student-step00000003-state"))
    )

    assert sorted(path.name for path in whole.iterdir()) == [
        "student", "student-state", "student-step00000003", "student-step00000003-state",
    ]  # fmt: skip
    assert saved_unet(resumed / "student").keys() == saved_unet(whole / "student").keys()
    assert all(torch.equal(v, saved_unet(whole / "student")[k]) for k, v in saved_unet(resumed / "student").items())
    (raw, ema), (raw_resumed, ema_resumed) = (
        state_objects(whole / "student-state"),
        state_objects(resumed / "student-state"),
    )
    assert all(torch.equal(v, raw_resumed[k]) for k, v in raw.items())
    assert all(torch.equal(a, b) for a, b in zip(ema["shadow_params"], ema_resumed["shadow_params"]))
    assert ema["optimization_step"] == ema_resumed["optimization_step"] == 6

    # The saved weights are the EMA (in the student's parameter order), not the raw weights.
    saved = saved_unet(whole / "student")
    names = list(UNet2DConditionModel.from_pretrained(whole / "student" / "unet").state_dict())
    assert len(names) == len(ema["shadow_params"])  # the tiny UNet has no buffers
    assert all(torch.equal(saved[name], average) for name, average in zip(names, ema["shadow_params"]))
    assert sum(not torch.equal(saved[name], raw[name]) for name in names) > 0.9 * len(names)

    # Theseus: p(t) = min(1, 0.15 t + 0.2) and the fraction of the 3 stage units replaced, logged per step.
    probabilities = scalars(data / "logs", "theseus/probability")
    rates = scalars(data / "logs", "theseus/replacement_rate")
    assert sorted(rates) == list(range(1, 7))
    for t in range(6):
        assert probabilities[t + 1] == pytest.approx(min(1.0, 0.15 * t + 0.2))
        assert rates[t + 1] == pytest.approx(draw_replacements(3, min(1.0, 0.15 * t + 0.2), 7, t).float().mean())


# ---- several processes ------------------------------------------------------------------------

# Run by each process of `accelerate launch`: train, then write this rank's student weights.
RANK_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from accelerate import PartialState
from safetensors.torch import save_file
from library.training.args import parse_args
from library.distill.args import distill_unet_parser
from library.distill.trainer import DistillTrainer

task = DistillTrainer(parse_args(distill_unet_parser(), sys.argv[1:])).train()
weights = {{name: tensor.contiguous() for name, tensor in task.student.state_dict().items()}}
save_file(weights, {out!r} + f"/rank{{PartialState().process_index}}.safetensors")
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_end_with_identical_students(tiny_sd, data):
    script = data / "train_and_dump.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), out=str(data)))
    # accelerate 1.x starts one process for `--cpu --num_processes 2`; `--multi_gpu` starts two, and
    # ACCELERATE_USE_CPU makes them a gloo group on the CPU (docs/distill.md).
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    argv = distill_argv(
        tiny_sd.sd1_dir, data, data / "out", "--student", "bk_tiny", "--max_train_steps", "3",
        "--gradient_accumulation_steps", "2", "--theseus", "--theseus_schedule", "constant:0.5",
    )  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, str(script), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    rank0, rank1 = load_file(data / "rank0.safetensors"), load_file(data / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(tensor, rank1[name]) for name, tensor in rank0.items())
    teacher = load_stable_diffusion(tiny_sd.sd1_dir).unet
    initial, _ = build_student(teacher, student_config(teacher.config, "bk_tiny"))
    changed = sum(not torch.equal(tensor, rank0[name]) for name, tensor in initial.state_dict().items())
    assert changed > 0.9 * len(rank0)  # both ranks trained (each on its own half of the batches)
    assert all(torch.equal(tensor, rank0[name]) for name, tensor in saved_unet(data / "out" / "student").items())


# ---- network KD and SD2 -----------------------------------------------------------------------


def shifted_teacher(tiny_sd, out: Path) -> Path:
    """The tiny SD1 model with a rank-1 change to every attention projection (a "fine-tune")."""
    model = load_stable_diffusion(tiny_sd.sd1_dir)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, module in model.unet.named_modules():
            if name.endswith(("attn1.to_v", "attn2.to_v", "attn1.to_out.0", "attn2.to_out.0")):
                rows, cols = module.weight.shape
                module.weight += (
                    0.1 * torch.randn(rows, 1, generator=generator) @ torch.randn(1, cols, generator=generator)
                )
    save_diffusers_folder(model, out)
    return out


def test_a_lora_distilled_from_a_fine_tuned_teacher_moves_the_base_towards_it(tiny_sd, data):
    teacher_dir = shifted_teacher(tiny_sd, data / "teacher")
    argv = distill_argv(
        tiny_sd.sd1_dir, data, data / "out", "--teacher", str(teacher_dir), "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "4", "--task_loss_weight", "0", "--max_train_steps", "15",
        "--learning_rate", "3e-3", "--cache_latents",
    )  # fmt: skip
    distill_unet.main(argv)

    lora_file = data / "out" / "student.safetensors"
    base, teacher = load_stable_diffusion(tiny_sd.sd1_dir), load_stable_diffusion(teacher_dir).unet
    inputs = fixed_inputs(tiny_sd.sd1_dir, tiny_sd.train_data_dir / "10_sks toy")
    pairs = {name: name for name in ("down_blocks.0", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.3")}
    output_before, features_before = kd_terms(base.unet, teacher, inputs, pairs)
    network, weights = lora.create_network_from_weights(1.0, str(lora_file), None, base.text_encoder, base.unet)
    network.apply_to(base.text_encoder, base.unet)
    network.load_state_dict(weights)
    output_after, features_after = kd_terms(base.unet, teacher, inputs, pairs)
    assert output_after < 0.8 * output_before, (output_before, output_after)
    assert features_after < 0.8 * features_before, (features_before, features_after)
    assert not network.text_encoder_loras  # the text encoder is shared with the teacher and stays as it is

    _, metadata = load_lora_file(lora_file)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_steps"] == "15"
    assert metadata["ss_distill_teacher"] == str(teacher_dir) and metadata["ss_distill_task_loss_weight"] == "0.0"


def test_sd2_v_prediction_student_in_bf16_saves_a_float_pipeline_and_samples(tiny_sd, data):
    (data / "prompts.txt").write_text("a photo of sks toy --w 64 --h 64 --s 2 --d 1\n")
    argv = distill_argv(
        tiny_sd.sd2_file, data, data / "out", "--tokenizer_cache_dir", str(tiny_sd.tokenizer_cache_dir),
        "--student", "bk_small", "--feature_kd_normalize", "--mixed_precision", "bf16", "--teacher_dtype", "bf16",
        "--max_train_steps", "4", "--sample_prompts", str(data / "prompts.txt"), "--sample_every_n_steps", "2",
        "--gradient_checkpointing", "--validation_split", "0.34", "--validate_every_n_steps", "2",
        "--logging_dir", str(data / "logs"),
    )  # fmt: skip
    distill_unet.main(argv)

    folder = data / "out" / "student"
    assert {tensor.dtype for tensor in saved_unet(folder).values()} == {torch.float32}
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.unet.config.mid_block_type is None and pipeline.unet.config.layers_per_block == 1
    images = pipeline("a cube", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert np.isfinite(images).all()
    samples = sorted(p.name for p in (data / "out" / "sample").glob("*.png"))
    assert [name.split("_")[1] for name in samples] == ["000002", "000004"]
    for term in ("", "_task", "_kd_output", "_kd_feature"):  # the held-out images' loss terms
        values = scalars(data / "logs", f"loss/validation{term}/step_average")
        assert sorted(values) == [2, 4] and all(np.isfinite(v) and v > 0 for v in values.values()), term
