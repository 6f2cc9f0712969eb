"""distill_unet.py on the tiny SDXL fixture: Segmind's students distil with feature KD, save, reload in diffusers."""

import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

import distill_unet
from library.errors import ConfigError, SuiteError
from library.models.sdxl import load_sdxl
from tests.cli_runs import assert_one_line_refusal
from tests.test_distill_unet import distill_argv, state_objects

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

KEPT_BLOCKS = [f"down_blocks.{i}" for i in range(3)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(3)]


def sdxl_distill_argv(tiny_sd, data: Path, out: Path, *extra: str) -> list[str]:
    return distill_argv(
        tiny_sd.sdxl_file, data, out, "--tokenizer_cache_dir", str(tiny_sd.tokenizer_cache_dir), *extra
    )


@pytest.fixture(scope="module")
def sdxl_students(tiny_sd, tmp_path_factory):
    """An SSD-1B student of the tiny SDXL model as initialised (0 steps) and after 12 steps of KD."""
    root = tmp_path_factory.mktemp("sdxl_distilled")
    shutil.copytree(tiny_sd.train_data_dir, root / "img")
    common = [
        "--student",
        "ssd_1b",
        "--task_loss_weight",
        "0",
        "--learning_rate",
        "1e-4",
        "--save_model_as",
        "safetensors",
    ]
    outputs = {}
    for steps in (0, 12):
        AcceleratorState._reset_state(reset_partial_state=True)
        out = root / f"out{steps}"
        try:
            distill_unet.main(sdxl_distill_argv(tiny_sd, root, out, *common, "--max_train_steps", str(steps)))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        outputs[steps] = out
    return outputs


@torch.no_grad()
def kd_terms(student, teacher, tiny_sd) -> tuple[float, float]:
    """(output KD, summed feature KD at the kept blocks) on fixed inputs, conditioned by diffusers' own
    SDXL prompt encoding (not this suite's)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sd.sdxl_dir, local_files_only=True)
    captions = [p.read_text().strip() for p in sorted(Path(tiny_sd.train_data_dir).rglob("*.txt"))[:4]]
    hidden, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    generator = torch.Generator().manual_seed(123)
    sample = torch.randn((len(captions), 4, 8, 8), generator=generator)
    timesteps = torch.tensor([100, 400, 700, 950][: len(captions)])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * len(captions))
    added = {"text_embeds": pooled, "time_ids": time_ids}

    def run(unet):
        features = {}
        handles = [
            unet.get_submodule(name).register_forward_hook(
                lambda m, a, out, name=name: features.__setitem__(name, out[0] if isinstance(out, tuple) else out)
            )
            for name in KEPT_BLOCKS
        ]
        prediction = unet(sample, timesteps, hidden, added_cond_kwargs=added).sample
        for handle in handles:
            handle.remove()
        return prediction, features

    (s_out, s_feat), (t_out, t_feat) = run(student), run(teacher)
    mse = torch.nn.functional.mse_loss
    return mse(s_out, t_out).item(), sum(mse(s_feat[b], t_feat[b]).item() for b in KEPT_BLOCKS)


def test_an_ssd_1b_student_distils_and_reloads_in_stock_diffusers(tiny_sd, sdxl_students):
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd.sdxl_dir, subfolder="unet")
    before = UNet2DConditionModel.from_pretrained(sdxl_students[0] / "student", subfolder="unet")
    after = UNet2DConditionModel.from_pretrained(sdxl_students[12] / "student", subfolder="unet")
    assert after.config.mid_block_type == "UNetMidBlock2D" and len(after.mid_block.resnets) == 1
    assert [len(a.transformer_blocks) for a in after.up_blocks[0].attentions] == [1, 1, 2]
    assert sum(p.numel() for p in after.parameters()) < sum(p.numel() for p in teacher.parameters())
    output_before, features_before = kd_terms(before, teacher, tiny_sd)
    output_after, features_after = kd_terms(after, teacher, tiny_sd)
    # The trained objective (output + feature KD; the task term is off) falls, led by the features:
    # the copied student starts with its output already near the teacher's.
    assert features_after < 0.9 * features_before
    assert output_after + features_after < 0.9 * (output_before + features_before)
    # The whole folder is an SDXL pipeline that generates; the SGM single file holds the same UNet.
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_students[12] / "student", local_files_only=True)
    image = pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="pil").images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    single = load_sdxl(sdxl_students[12] / "student.safetensors", tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    single_state = single.unet.state_dict()
    assert single_state.keys() == after.state_dict().keys()
    assert all(torch.equal(single_state[key], value) for key, value in after.state_dict().items())


def test_an_sdxl_student_samples_with_the_sdxl_pipeline(tiny_sd, data):
    """--sample_prompts on SDXL: kohya's names in <output_dir>/sample, drawn by the student, not the teacher."""
    import argparse

    import numpy as np

    from library.training.sampling import parse_prompt_line
    from library.training.sdxl_sampling import render_sdxl_samples

    prompt = "sks toy --w 64 --h 64 --s 2 --d 5"
    (data / "prompts.txt").write_text(prompt + "\n")
    out = data / "out"
    distill_unet.main(sdxl_distill_argv(
        tiny_sd, data, out, "--student", "ssd_1b", "--max_train_steps", "1", "--sample_prompts",
        str(data / "prompts.txt"), "--sample_at_first", "--sample_every_n_steps", "1",
    ))  # fmt: skip
    (first,) = (out / "sample").glob("student_000000_00_*_5.png")
    (_,) = (out / "sample").glob("student_000001_00_*_5.png")
    teacher = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    args = argparse.Namespace(sample_sampler="ddim", output_dir=str(data / "teacher"), output_name=None)
    ((by_teacher, _),) = render_sdxl_samples(
        args, torch.device("cpu"), teacher, teacher.unet, [parse_prompt_line(prompt)], None, 0
    )
    student_pixels = np.asarray(Image.open(first), dtype=np.int16)
    assert student_pixels.std() > 1
    assert not np.array_equal(student_pixels, np.asarray(Image.open(by_teacher), dtype=np.int16))


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("sd1", ["--student", "ssd_1b"], r"--student ssd_1b is Segmind's SDXL student but .* is not an SDXL model"),
        ("sdxl", ["--student", "bk_small"], r"--student bk_small is a BK-SDM student of SD1.x/SD2.x but .* is SDXL"),
        ("sdxl", ["--student", "vega", "--theseus"], r"--theseus cannot be used with an SDXL model"),
        ("sdxl", ["--network_module", "networks.lora"], r"--network_module cannot be used with an SDXL model"),
    ],
    ids=["ssd-on-sd1", "bk-on-sdxl", "theseus", "network"],
)
def test_students_and_flags_of_the_other_family_are_one_line_exit_2(tiny_sd, data, capsys, model, extra, message):
    path = tiny_sd.sd1_dir if model == "sd1" else tiny_sd.sdxl_file
    argv = distill_argv(path, data, data / "out", "--tokenizer_cache_dir", str(tiny_sd.tokenizer_cache_dir), *extra)
    with pytest.raises(ConfigError, match=message):
        distill_unet.main(argv)
    assert_one_line_refusal(distill_unet.main, argv, capsys)
    assert not (data / "out").exists()


def test_a_vega_student_resumes_exactly_with_ema(tiny_sd, data):
    flags = ["--student", "vega", "--max_train_steps", "4", "--save_state", "--use_ema", "--ema_decay", "0.9",
             "--learning_rate", "1e-4"]  # fmt: skip
    whole, resumed = data / "whole", data / "resumed"
    distill_unet.main(sdxl_distill_argv(tiny_sd, data, whole, *flags, "--save_every_n_steps", "2"))
    AcceleratorState._reset_state(reset_partial_state=True)
    state = str(whole / "student-step00000002-state")
    distill_unet.main(sdxl_distill_argv(tiny_sd, data, resumed, *flags, "--resume", state))
    first = UNet2DConditionModel.from_pretrained(whole / "student", subfolder="unet").state_dict()
    second = UNet2DConditionModel.from_pretrained(resumed / "student", subfolder="unet").state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    raw, ema = state_objects(whole / "student-state")
    assert ema["optimization_step"] == 4
    assert sum(not torch.equal(first[k], raw[k]) for k in first) > 0.9 * len(first)  # the save is the EMA


def test_a_teacher_of_the_other_family_is_refused(tiny_sd, data):
    argv = sdxl_distill_argv(tiny_sd, data, data / "out", "--student", "ssd_1b", "--teacher", str(tiny_sd.sd1_file))
    with pytest.raises(SuiteError, match=r"is an SD1.x/SD2.x checkpoint"):
        distill_unet.main(argv)
    assert not (data / "out").exists()


def test_the_sdxl_distillation_quickstart_config_runs(tiny_sd, tmp_path):
    """examples/quickstart_sdxl_distill.toml, pointed at the test's tiny model and shortened to 2 steps."""
    repo = Path(__file__).resolve().parents[1]
    tiny = Path(tiny_sd.sdxl_file).parent
    dataset = (repo / "examples" / "quickstart_dataset.toml").read_text().replace('"tiny/', f'"{tiny}/')
    (tmp_path / "dataset.toml").write_text(dataset)
    config = (repo / "examples" / "quickstart_sdxl_distill.toml").read_text()
    for old, new in {
        '"tiny/sdxl.safetensors"': f'"{tiny_sd.sdxl_file}"',
        '"tiny/tokenizers"': f'"{tiny_sd.tokenizer_cache_dir}"',
        "examples/quickstart_dataset.toml": str(tmp_path / "dataset.toml"),
        "output/quickstart_sdxl_student": str(tmp_path / "out"),
        "max_train_steps = 20": "max_train_steps = 2",
    }.items():
        assert old in config
        config = config.replace(old, new)
    (tmp_path / "quickstart.toml").write_text(config)
    distill_unet.main(["--config_file", str(tmp_path / "quickstart.toml")])
    student = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "tiny_ssd_1b", subfolder="unet")
    assert student.config.mid_block_type == "UNetMidBlock2D"
