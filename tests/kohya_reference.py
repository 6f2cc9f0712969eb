"""Independent references for resize tests: kohya's dense method, written from its description.

research/kohya.md §5: kohya multiplies ``up @ down`` to a dense matrix, runs a full SVD and picks
the rank from the whole spectrum. These helpers do exactly that (in float64), so the factored
path is checked against the method it replaces, not against itself.
"""

import torch


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


# kohya's networks/lora.py targets (research/kohya.md §0.7), by class name.
KOHYA_TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
KOHYA_UNET_TARGETS = ("Transformer2DModel",)
KOHYA_UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def kohya_lora_names(root: torch.nn.Module, prefix: str, targets: tuple[str, ...], with_conv3x3: bool) -> set[str]:
    """The module names kohya's LoRA gives ``root``: every Linear and 1x1 Conv2d (and, with conv_dim,
    3x3 Conv2d) inside a module of a target class, named ``prefix_<path with '.' as '_'>``."""
    names = set()
    for parent_name, parent in root.named_modules():
        if type(parent).__name__ not in targets:
            continue
        for child_name, child in parent.named_modules():
            is_linear = isinstance(child, torch.nn.Linear)
            is_conv = isinstance(child, torch.nn.Conv2d)
            if is_linear or (is_conv and (child.kernel_size == (1, 1) or with_conv3x3)):
                names.add(f"{prefix}.{parent_name}.{child_name}".replace(".", "_"))
    return names


def kohya_unet_lora_names(unet: torch.nn.Module, conv_dim: bool) -> set[str]:
    targets = KOHYA_UNET_TARGETS + (KOHYA_UNET_CONV_TARGETS if conv_dim else ())
    return kohya_lora_names(unet, "lora_unet", targets, with_conv3x3=conv_dim)


def kohya_text_encoder_lora_names(text_encoder: torch.nn.Module) -> set[str]:
    return kohya_lora_names(text_encoder, "lora_te", KOHYA_TE_TARGETS, with_conv3x3=False)
