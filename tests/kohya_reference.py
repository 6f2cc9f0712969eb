"""Independent references written from kohya's descriptions: module naming, and the dense resize method.

Naming (networks/lora.py, dylora.py, lora_fa.py ``create_modules``): every Linear/Conv2d child of a module
whose class name is a target, named ``prefix.<parent path>.<child path>`` with dots turned into underscores.

Blocks (networks/lora.py v0.10.1 ``get_block_index`` with ``is_sdxl``): SDXL's 23 block-wise entries by the
module name's SGM path.

Resize, research/kohya.md §5: kohya multiplies ``up @ down`` to a dense matrix, runs a full SVD and picks
the rank from the whole spectrum. These helpers do exactly that (in float64), so the factored
path is checked against the method it replaces, not against itself.
"""

import torch
from torch import nn

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def dense_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` as a dense out x (in*kh*kw) float64 matrix."""
    return up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)


def dense_svd(up: torch.Tensor, down: torch.Tensor):
    return torch.linalg.svd(dense_delta(up, down), full_matrices=False)


def dense_truncation(up: torch.Tensor, down: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = dense_svd(up, down)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def kohya_rank(dense_spectrum: torch.Tensor, method: str | None, param: float | None, max_rank: int) -> int:
    """kohya's rank_resize on the full dense spectrum: index functions, clamp to [1, n-1], +1, caps."""
    s, n = dense_spectrum, len(dense_spectrum)
    if method is None:
        rank = max_rank
    elif method == "sv_ratio":
        rank = max(1, min(int((s > s[0] / param).sum()), n - 1)) + 1
    else:
        values, target = (s, param) if method == "sv_cumulative" else (s**2, param**2)
        index = int(torch.searchsorted(torch.cumsum(values, 0) / values.sum(), torch.tensor(target).double())) + 1
        rank = max(1, min(index, n - 1)) + 1
    if s[0] <= 1e-6:
        return 1
    return min(rank, max_rank)


def kohya_svd_merge(parts, new_rank: int, clamp_quantile: float = 0.99):
    """kohya's ``svd_merge_lora.py`` for one module, from its description: float32 dense sum of
    ``ratio * alpha / dim * up @ down``, full SVD, rank ``min(new_rank, in, out)``, ``up = U S``,
    ``down = Vh``, both clamped to the quantile of their joined entries. ``parts``: (ratio, up, down, alpha)."""
    total = sum(ratio * (alpha / down.shape[0]) * dense_delta(up, down).float() for ratio, up, down, alpha in parts)
    rank = min(new_rank, *total.shape)
    u, s, vh = torch.linalg.svd(total)
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def kohya_module_names(text_encoder: nn.Module, unet: nn.Module, convs: bool) -> set[str]:
    """kohya's module names for an SD1/2 text encoder (with its ``text_model`` level) and UNet."""
    names = set()
    unet_targets = UNET_TARGETS + (UNET_CONV_TARGETS if convs else ())
    for prefix, root, targets in (("lora_te", text_encoder, TEXT_ENCODER_TARGETS), ("lora_unet", unet, unet_targets)):
        for name, module in root.named_modules():
            if module.__class__.__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                if child.__class__.__name__ in ("Linear", "Conv2d"):
                    names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


def sgm_paths_by_diffusers_converter(sgm_unet_state: dict[str, torch.Tensor], unet_config) -> dict[str, str]:
    """{diffusers UNet parameter key: SGM key}, read off diffusers' own SGM -> diffusers converter.

    Every SGM tensor gets a distinct value; after diffusers converts the state dict, each diffusers key
    is traced back to the SGM key whose value it holds. Nothing of our naming code is involved.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    tagged = {key: torch.tensor([float(i)]) for i, key in enumerate(sgm_unet_state)}
    keys = list(sgm_unet_state)
    converted = convert_ldm_unet_checkpoint(tagged, dict(unet_config))
    return {key: keys[int(value.item())] for key, value in converted.items()}


def kohya_sdxl_module_names(text_encoders, unet, sgm_paths: dict[str, str], convs: bool) -> set[str]:
    """kohya's SDXL names: ``lora_te1_``/``lora_te2_`` + CLIP paths, ``lora_unet_`` + the layer's SGM path
    (kohya's SDXL UNet has SGM module paths, so its layer names are the SGM weight keys without ``.weight``)."""
    names = set()
    for i, encoder in enumerate(text_encoders):
        for name, module in encoder.named_modules():
            if module.__class__.__name__ in TEXT_ENCODER_TARGETS:
                for child_name, child in module.named_modules():
                    if child.__class__.__name__ in ("Linear", "Conv2d"):
                        names.add(f"lora_te{i + 1}.{name}.{child_name}".replace(".", "_"))
    targets = UNET_TARGETS + (UNET_CONV_TARGETS if convs else ())
    for name, module in unet.named_modules():
        if module.__class__.__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            if child.__class__.__name__ in ("Linear", "Conv2d"):
                sgm_key = sgm_paths[f"{name}.{child_name}.weight"]
                path = sgm_key.removeprefix("model.diffusion_model.").removesuffix(".weight")
                names.add(f"lora_unet.{path}".replace(".", "_"))
    return names


def kohya_sdxl_block(lora_name: str) -> int:
    """kohya v0.10.1 ``get_block_index(lora_name, is_sdxl=True)``, re-stated."""
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_") :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 10 + int(name.split("_")[2])
    if name.startswith("output_blocks_"):
        return 13 + int(name.split("_")[2])
    if name.startswith("out_"):
        return 22
    return -1
