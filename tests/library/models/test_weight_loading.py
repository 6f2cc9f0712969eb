"""Loading tensor by tensor (meta-built modules, per-tensor casts, unmapped reads, --lowram's device)
gives the very model the whole-file loader gave: every parameter and buffer, bit for bit (issue 14)."""

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.errors import CheckpointError
from library.fileio import read_state_dict
from library.models import sdxl as sdxl_module
from library.models import stable_diffusion as sd_module
from library.models.sdxl import load_sdxl
from library.models.stable_diffusion import ldm_state_dict, load_stable_diffusion, write_single_file
from library.weights_reader import read_safetensors_unmapped


def whole_file(path, **_):
    """The loader before issue 14: the whole file in memory, as stored, cast after assembly."""
    if str(path).endswith(".safetensors"):
        return safetensors.torch.load_file(str(path))
    return dict(torch.load(path, weights_only=True)["state_dict"])


def tensors(model, parts) -> dict[str, torch.Tensor]:
    out = {}
    for part in parts:
        module = getattr(model, part)
        out.update({f"{part}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
        out.update({f"{part}.buffer.{k}": v for k, v in module.named_buffers()})
    return out


def assert_identical(loaded, reference, parts) -> None:
    got, want = tensors(loaded, parts), tensors(reference, parts)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].device.type == "cpu" and got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


SD_PARTS = ("unet", "vae", "text_encoder")
XL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
OPTIONS = [
    {},
    {"mmap": False},
    {"dtype": torch.float16},
    {"dtype": torch.bfloat16, "vae_dtype": torch.float32},
    {"dtype": torch.float16, "mmap": False},
    {"device": "cpu", "dtype": torch.float16},  # --lowram: straight onto the training device
]
IDS = ["as-stored", "unmapped", "fp16", "bf16-fp32-vae", "fp16-unmapped", "device"]


def reference_cast(model, parts, options) -> None:
    dtype = options.get("dtype")
    for part in parts if dtype is not None else ():
        getattr(model, part).to(options.get("vae_dtype", dtype) if part == "vae" else dtype)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_sd_single_file_equals_the_whole_file_loader(tiny_sd, monkeypatch, version, options):
    path = getattr(tiny_sd, f"{version}_file")
    loaded = load_stable_diffusion(path, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir, **options)
    monkeypatch.setattr(sd_module, "read_state_dict", whole_file)
    reference = load_stable_diffusion(path, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    reference_cast(reference, SD_PARTS, options)
    assert_identical(loaded, reference, SD_PARTS)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_sdxl_single_file_equals_the_whole_file_loader(tiny_sd, monkeypatch, options):
    loaded = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir, **options)
    monkeypatch.setattr(sdxl_module, "read_state_dict", whole_file)
    reference = load_sdxl(tiny_sd.sdxl_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    reference_cast(reference, XL_PARTS, options)
    assert_identical(loaded, reference, XL_PARTS)


@pytest.mark.parametrize("options", [{}, {"dtype": torch.float16}], ids=["as-stored", "fp16"])
def test_ckpt_file_equals_the_whole_file_loader(tiny_sd, tmp_path, monkeypatch, options):
    path = tmp_path / "sd1.ckpt"
    write_single_file(ldm_state_dict(load_stable_diffusion(tiny_sd.sd1_dir)), path)
    loaded = load_stable_diffusion(path, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir, **options)
    monkeypatch.setattr(sd_module, "read_state_dict", whole_file)
    reference = load_stable_diffusion(path, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    reference_cast(reference, SD_PARTS, options)
    assert_identical(loaded, reference, SD_PARTS)


@pytest.mark.parametrize("options", [{}, {"dtype": torch.bfloat16, "vae_dtype": torch.float32}], ids=IDS[::3])
def test_diffusers_folders_equal_diffusers_own_loaders(tiny_sd, options):
    dtype, vae_dtype = options.get("dtype"), options.get("vae_dtype", options.get("dtype"))
    loaded = load_stable_diffusion(tiny_sd.sd1_dir, **options)

    class Reference:
        unet = UNet2DConditionModel.from_pretrained(tiny_sd.sd1_dir, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(tiny_sd.sd1_dir, subfolder="vae", torch_dtype=vae_dtype)
        text_encoder = CLIPTextModel.from_pretrained(tiny_sd.sd1_dir, subfolder="text_encoder", torch_dtype=dtype)

    assert_identical(loaded, Reference, SD_PARTS)
    loaded_xl = load_sdxl(tiny_sd.sdxl_dir, **options)
    folder = tiny_sd.sdxl_dir

    class ReferenceXL:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=vae_dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", torch_dtype=dtype
        )

    assert_identical(loaded_xl, ReferenceXL, XL_PARTS)


def test_unmapped_reader_equals_safetensors_and_reports_truncation(tiny_sd, tmp_path):
    reference = safetensors.torch.load_file(str(tiny_sd.sdxl_file))
    for read in (read_safetensors_unmapped(tiny_sd.sdxl_file), read_state_dict(tiny_sd.sdxl_file, mmap=False)):
        assert read.keys() == reference.keys()
        assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in reference.items())
    data = tiny_sd.sd1_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cut.safetensors': truncated"):
        read_state_dict(cut, mmap=False)
    cut.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match="cut.safetensors'"):
        read_state_dict(cut, dtype=torch.float16)


def test_cast_reads_share_one_buffer_and_stored_reads_own_theirs(tiny_sd, monkeypatch):
    """A cast read takes no fresh memory per tensor (one scratch buffer, the largest tensor's size);
    a read without a cast hands out each tensor's own buffer (never the scratch: see the equality tests)."""
    reference = safetensors.torch.load_file(str(tiny_sd.sd1_file))
    sizes = {k: v.numel() * v.element_size() for k, v in reference.items()}
    floats = [k for k, v in reference.items() if v.is_floating_point() and v.dtype != torch.float16]
    empty, buffers = torch.empty, []

    def recording_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        if kwargs.get("dtype") == torch.uint8:
            buffers.append(tensor.numel())
        return tensor

    monkeypatch.setattr(torch, "empty", recording_empty)
    cast = read_safetensors_unmapped(tiny_sd.sd1_file, dtype=torch.float16)
    assert floats and all(cast[k].dtype == torch.float16 for k in floats)
    others = [sizes[k] for k in reference if k not in floats]
    assert sorted(buffers) == sorted([max(sizes[k] for k in floats), *others])
    buffers.clear()
    read_safetensors_unmapped(tiny_sd.sd1_file)
    assert sorted(buffers) == sorted([0, *sizes.values()])
