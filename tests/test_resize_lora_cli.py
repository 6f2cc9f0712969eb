"""resize_lora.py end to end: kohya's command lines, the file it writes, diffusers reading it, bad input."""

import copy
import hashlib
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

import resize_lora
from library.synthetic_lora import LoRATarget, kohya_lora_targets, random_lora
from networks.lora_file import load_lora_file
from tests.cli_runs import exit_status
from tests.kohya_reference import dense_delta, dense_truncation

REPO = Path(__file__).resolve().parents[1]
TARGETS = [
    LoRATarget("lora_te", "text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
    LoRATarget("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 40, 24),
    LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 16, 8, (3, 3), is_conv=True),
]
METADATA = {
    "ss_network_dim": "8",
    "ss_network_alpha": "4",
    "ss_training_comment": "my lora",
    "ss_output_name": "big",
    "sshs_model_hash": "stale",
    "sshs_legacy_hash": "stale",
}


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file(random_lora(TARGETS, dim=8, alpha=4, conv_dim=6, conv_alpha=3, seed=2), path, metadata=METADATA)
    return path


def run(*args) -> int:
    return exit_status(resize_lora.main, *args)


def data_hash(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def test_resize_writes_kohya_tensors_and_metadata(lora_file, tmp_path, capsys):
    before = lora_file.read_bytes()
    out = tmp_path / "small.safetensors"
    assert run("--model", lora_file, "--save_to", out, "--new_rank", 3, "--save_precision", "fp16", "--verbose") == 0
    tensors, metadata = load_lora_file(out)
    original, _ = load_lora_file(lora_file)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    for target in TARGETS:
        up, down = tensors[f"{target.name}.lora_up.weight"], tensors[f"{target.name}.lora_down.weight"]
        assert down.shape[0] == 3 and tensors[f"{target.name}.alpha"].item() == pytest.approx(
            original[f"{target.name}.alpha"].item() * 3 / original[f"{target.name}.lora_down.weight"].shape[0]
        )
        expected = dense_truncation(
            original[f"{target.name}.lora_up.weight"], original[f"{target.name}.lora_down.weight"], 3
        )
        torch.testing.assert_close(dense_delta(up, down), expected, rtol=2e-2, atol=2e-3)  # fp16 output
    assert metadata["ss_training_comment"] == "dimension is resized from 8 to 3; my lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_output_name"]) == (
        "3",
        "1.5",
        "big",
    )
    assert metadata["sshs_model_hash"] == data_hash(out)  # fresh, after the fp16 cast
    assert lora_file.read_bytes() == before  # the input is only read
    printed = capsys.readouterr().out
    assert TARGETS[0].name in printed and "Average Frobenius norm retention" in printed


def test_hints_for_float32_output_and_mixed_alphas(lora_file, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    args = ("--model", lora_file, "--new_rank", 8, "--dynamic_method", "sv_ratio", "--dynamic_param", 3)
    assert run(*args, "--save_to", tmp_path / "a.safetensors") == 0
    assert "--save_precision not given: saving float32 like kohya although the input is float16" in caplog.text
    assert "resize with --keep_alpha for a file diffusers reads right" in caplog.text
    caplog.clear()
    assert run(*args, "--save_to", tmp_path / "b.safetensors", "--save_precision", "fp16", "--keep_alpha") == 0
    assert "--save_precision" not in caplog.text and "--keep_alpha" not in caplog.text
    metadata = load_lora_file(tmp_path / "b.safetensors")[1]
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("Dynamic", "4.0")  # the input alpha


def test_dynamic_resize_to_a_torch_file(lora_file, tmp_path):
    out = tmp_path / "small.pt"
    args = (
        "--model",
        lora_file,
        "--save_to",
        out,
        "--new_rank",
        8,
        "--dynamic_method",
        "sv_fro",
        "--dynamic_param",
        0.5,
    )
    assert run(*args) == 0
    tensors, metadata = load_lora_file(out)
    assert metadata == {} and all(tensors[f"{t.name}.lora_down.weight"].shape[0] == 2 for t in TARGETS)


@pytest.mark.slow
def test_kohyas_documented_command_line_runs_the_same_script(lora_file, tmp_path):
    out = tmp_path / "small.safetensors"
    command = [sys.executable, "networks/resize_lora.py", "--model", lora_file, "--save_to", out, "--new_rank", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_lora_file(out)[1]["ss_training_comment"].startswith("dimension is resized from 8 to 2;")


def test_rank_at_or_above_every_module_is_a_copy_with_a_warning(lora_file, tmp_path, caplog):
    out = tmp_path / "copy.safetensors"
    assert run("--model", lora_file, "--save_to", out, "--new_rank", 64) == 0
    assert "is a copy of the input" in caplog.text
    tensors, metadata = load_lora_file(out)
    original, _ = load_lora_file(lora_file)
    assert all(torch.equal(tensors[k], original[k].float()) for k in original)
    assert metadata["ss_training_comment"] == "my lora" and metadata["sshs_model_hash"] == data_hash(out)


def test_sweep_previews_without_writing(lora_file, tmp_path, capsys):
    listing = sorted(tmp_path.iterdir())
    args = ("--model", lora_file, "--dynamic_method", "sv_ratio", "--sweep", "2,4,1000", "--new_rank", 8)
    assert run(*args, "--save_to", tmp_path / "ignored.safetensors") == 0
    assert sorted(tmp_path.iterdir()) == listing
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["sv_ratio", "size"]
    assert [line.split()[0] for line in lines[2:]] == ["2", "4", "1000"]


def test_sweep_plot_is_a_readable_picture(lora_file, tmp_path):
    from PIL import Image

    plot = tmp_path / "sweep.png"
    listing = sorted(tmp_path.iterdir())
    args = ("--model", lora_file, "--dynamic_method", "sv_ratio", "--sweep", "2,4,1000", "--new_rank", 8)
    assert run(*args, "--sweep_plot", plot) == 0
    assert sorted(tmp_path.iterdir()) == sorted([*listing, plot])  # the plot only, no temporary file left
    with Image.open(plot) as image:
        image.load()
        assert image.format == "PNG" and image.size == (840, 540)
        assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # drawn on, not blank


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sweep", "2,4"], r"--sweep_plot needs matplotlib: pip install matplotlib"),
        (["--dynamic_param", "4"], r"--sweep_plot draws the --sweep preview: add --sweep V1,V2,\.\.\."),
    ],
)
def test_sweep_plot_refused_before_any_work(lora_file, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setattr(resize_lora, "preview_sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    plot = tmp_path / "sweep.png"
    assert run("--model", lora_file, "--dynamic_method", "sv_ratio", *flags, "--sweep_plot", plot) == 2
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: {message}", error), error
    assert not plot.exists()


def test_sweep_plot_format_comes_from_its_suffix(lora_file, tmp_path, capsys):
    args = ("--model", lora_file, "--dynamic_method", "sv_ratio", "--sweep", "2,4")
    assert run(*args, "--sweep_plot", tmp_path / "sweep.txt") == 2
    assert "matplotlib cannot write '.txt' files" in capsys.readouterr().err
    assert run(*args, "--sweep_plot", tmp_path / "sweep.svg") == 0
    assert (tmp_path / "sweep.svg").read_text().lstrip().startswith("<?xml")


def test_sweep_values_must_be_numbers(lora_file, capsys):
    assert run("--model", lora_file, "--sweep", "8,x") == 2
    assert "--sweep: expected comma-separated numbers, got '8,x'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", r"truncated\.safetensors.*truncated or corrupt"),
        ("not_lora", r"not_lora\.safetensors: no LoRA modules found"),
        ("rank_mismatch", r"rank_mismatch\.safetensors: module 'lora_unet_x': rank mismatch"),
        ("no_dynamic_param", r"--dynamic_method sv_ratio needs --dynamic_param"),
        ("same_file", r"--save_to '.*big\.safetensors' is the input --model"),
        ("bad_suffix", r"--save_to '.*out\.bin' must end in \.safetensors"),
        ("incomplete_loha", r"module 'lora_unet_x' lacks 'lora_unet_x\.hada_w2_a': an incomplete LyCORIS module"),
        ("glora", r"module 'lora_unet_x' is a GLoRA module"),
        ("full_diff", r"module 'lora_unet_x' is a LyCORIS full module"),
        ("nan", r"nan\.safetensors: module 'lora_unet_x' has NaN or infinite weights"),
    ],
)
def test_bad_input_is_one_line_and_no_output(lora_file, tmp_path, capsys, case, message):
    model, out, extra = lora_file, tmp_path / "out.safetensors", []
    if case == "truncated":
        model = tmp_path / "truncated.safetensors"
        model.write_bytes(lora_file.read_bytes()[:300])
    elif case == "not_lora":
        model = tmp_path / "not_lora.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, model)
    elif case == "rank_mismatch":
        model = tmp_path / "rank_mismatch.safetensors"
        save_file(
            {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 3)}, model
        )
    elif case == "no_dynamic_param":
        extra = ["--dynamic_method", "sv_ratio"]
    elif case == "same_file":
        out = lora_file
    elif case == "bad_suffix":
        out = tmp_path / "out.bin"
    elif case == "incomplete_loha":
        model = tmp_path / "loha.safetensors"
        save_file({"lora_unet_x.hada_w1_a": torch.zeros(8, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 8)}, model)
    elif case == "glora":
        model = tmp_path / "glora.safetensors"
        names = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
        save_file({f"lora_unet_x.{n}": torch.zeros(2, 2) for n in names}, model)
    elif case == "full_diff":
        model = tmp_path / "full.safetensors"
        save_file({"lora_unet_x.diff": torch.zeros(8, 8)}, model)
    elif case == "nan":
        model = tmp_path / "nan.safetensors"
        down = torch.ones(4, 8, dtype=torch.float16)
        down[3, 5] = float("nan")
        save_file({"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": torch.ones(8, 4)}, model)
    listing = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert run("--model", model, "--save_to", out, "--new_rank", 2, *extra) == 2
    error = capsys.readouterr().err.strip()
    if case == "nan":  # found during the SVDs, after the progress bar started (same line, no newline)
        error = error.split("module/s]")[-1]
    assert re.fullmatch(rf"error: .*{message}.*", error), error
    assert "\n" not in error
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == listing  # nothing written, no temp file left


# --- diffusers ------------------------------------------------------------------------------------


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def diffusers_updates(path: Path, pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """Each module's weight update as ``load_lora_weights`` (diffusers + PEFT, unmodified) reads the file."""
    from peft.tuners.lora import LoraLayer

    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # raises on keys it cannot map
    updates = {}
    for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                (adapter,) = module.active_adapters
                delta = module.get_delta_weight(adapter)
                updates[f"{prefix}.{name}"] = delta.reshape(delta.shape[0], -1).double()
    return updates


@pytest.fixture(scope="module")
def tiny_pipeline_lora(tiny_sd, tmp_path_factory):
    """The tiny SD1 pipeline and a dim-8 kohya LoCon over all its kohya targets (295 modules)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd.sd1_dir, local_files_only=True)
    targets = kohya_lora_targets(pipe.unet, pipe.text_encoder, conv=True)
    source = tmp_path_factory.mktemp("lora") / "big.safetensors"
    save_file(random_lora(targets, dim=8, alpha=4, conv_dim=4, conv_alpha=2, dtype=torch.float32), source)
    return pipe, targets, source


@pytest.mark.parametrize(
    "flags",
    [
        ["--new_rank", "3", "--new_conv_rank", "2"],
        ["--new_rank", "8", "--dynamic_method", "sv_ratio", "--dynamic_param", "4", "--keep_alpha"],
    ],
)
def test_diffusers_reads_every_key_with_the_intended_update(tiny_pipeline_lora, tmp_path, flags):
    pipe, targets, source = tiny_pipeline_lora
    out = tmp_path / "small.safetensors"
    assert run("--model", source, "--save_to", out, *flags) == 0
    resized, _ = load_lora_file(out)
    read = diffusers_updates(out, pipe)
    components = {"lora_unet": ("unet", pipe.unet), "lora_te": ("text_encoder", pipe.text_encoder)}
    assert set(read) == {f"{components[t.prefix][0]}.{t.path}" for t in targets}
    for target in targets:
        component, model = components[target.prefix]
        up, down = resized[f"{target.name}.lora_up.weight"], resized[f"{target.name}.lora_down.weight"]
        intended = dense_delta(up, down) * (resized[f"{target.name}.alpha"].item() / down.shape[0])
        weight = model.get_submodule(target.path).weight
        assert intended.shape == weight.reshape(weight.shape[0], -1).shape
        # PEFT computes the update in the file's float32; a wrong scale would be off by percents
        torch.testing.assert_close(read[f"{component}.{target.path}"], intended, rtol=1e-5, atol=1e-8)
