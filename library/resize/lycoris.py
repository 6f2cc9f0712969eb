"""LyCORIS LoHa and LoKr modules rewritten as plain LoRA modules with exactly the same update.

* LoHa: ``ΔW = (A1 B1) ⊙ (A2 B2) * scale``. A Hadamard product of two low-rank products is a
  low-rank product: ``(A1 B1) ⊙ (A2 B2) = (A1 • A2)(B1 ⊙_c B2)``, where ``A1 • A2`` (out x r1 r2)
  takes row-wise Kronecker products (the face-splitting product) and ``B1 ⊙_c B2`` column-wise
  ones (Khatri-Rao). So a LoHa of rank r is a LoRA of rank r².
* LoKr: ``ΔW = kron(W1, W2) * scale`` and ``kron(P1 Q1, P2 Q2) = kron(P1, P2) kron(Q1, Q2)``: with
  each factor written as a product (its stored LoRA factors, or ``I @ W`` for a full one), the
  Kronecker product is a LoRA of rank ``r1 r2``. In kohya's matrix view of a conv weight
  (out, in kh kw) this holds with ``W2`` flattened the same way.

The conversion is exact (float64 products, no SVD); ``resize``'s factored SVD then truncates it.
LyCORIS stores non-Tucker conv factors flattened to (r, in kh kw), so the kernel size is not in the
file: it follows from the SD module name (ResNet ``conv1``/``conv2``, samplers' ``conv``, ``conv_in``
and ``conv_out`` are 3x3; everything else is 1x1), checked against the stored width. Formats
checked against lycoris-lora 3.2 (``modules/loha.py``, ``modules/lokr.py``, ``functional/``).
"""

from __future__ import annotations

import math

import torch

from networks.lora_file import LoRAFileError

_THREE_BY_THREE = ("_conv1", "_conv2", "_conv", "_conv_in", "_conv_out")


def _module_names(state_dict: dict[str, torch.Tensor], marker: str) -> list[str]:
    return [key[: -len(marker)] for key in state_dict if key.endswith(marker)]


def _kernel_for(name: str, fan_in: int, source: str) -> tuple[int, int]:
    kernel = (3, 3) if name.endswith(_THREE_BY_THREE) else (1, 1)
    if fan_in % (kernel[0] * kernel[1]):
        raise LoRAFileError(f"{source}: module '{name}': width {fan_in} does not fit a {kernel} conv kernel")
    return kernel


def _face_splitting(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: row i is ``kron(a1[i], a2[i])``."""
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def _khatri_rao(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: column j is ``kron(b1[:, j], b2[:, j])``."""
    return (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])


def _tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker: ``einsum('i j ..., j r -> i r ...')`` flattened to (R, in kh kw)."""
    return torch.einsum("ij...,jr->ir...", core, down).reshape(core.shape[0], -1)


def _loha(sd: dict[str, torch.Tensor], name: str, source: str):
    w = {p: sd[f"{name}.hada_{p}"].double() for p in ("w1_a", "w1_b", "w2_a", "w2_b")}
    rank = w["w1_b"].shape[0]
    if f"{name}.hada_t1" in sd:  # Tucker: w*_a is (r, out), w*_b (r, in), t* (r, r, kh, kw)
        t1, t2 = sd[f"{name}.hada_t1"].double(), sd[f"{name}.hada_t2"].double()
        up1, up2 = w["w1_a"].T, w["w2_a"].T
        down1, down2 = _tucker_down(t1, w["w1_b"]), _tucker_down(t2, w["w2_b"])
        tail = (w["w1_b"].shape[1], *t1.shape[2:])
    else:
        up1, up2 = w["w1_a"].reshape(w["w1_a"].shape[0], -1), w["w2_a"].reshape(w["w2_a"].shape[0], -1)
        down1, down2 = w["w1_b"].reshape(rank, -1), w["w2_b"].reshape(w["w2_b"].shape[0], -1)
        tail = None
    keys = [k for k in sd if k.startswith(f"{name}.hada_")]
    return _face_splitting(up1, up2), _khatri_rao(down1, down2), rank, tail, keys


def _as_product(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``I @ W`` or ``W @ I``, whichever has the smaller inner size (exact, no decomposition)."""
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows, dtype=matrix.dtype), matrix
    return matrix, torch.eye(cols, dtype=matrix.dtype)


def _lokr_part(sd, name: str, index: int) -> tuple[torch.Tensor, torch.Tensor, int | None, tuple | None]:
    """(P, Q, stored rank or None, conv kernel if known) of W1 or W2 in kohya's matrix view."""
    full = sd.get(f"{name}.lokr_w{index}")
    if full is not None:
        full = full.double()
        kernel = tuple(full.shape[2:]) or None
        return (*_as_product(full.reshape(full.shape[0], -1)), None, kernel)
    a, b = sd[f"{name}.lokr_w{index}_a"].double(), sd[f"{name}.lokr_w{index}_b"].double()
    if index == 2 and f"{name}.lokr_t2" in sd:  # Tucker: w2_a (r, out2), w2_b (r, in2), t2 (r, r, kh, kw)
        core = sd[f"{name}.lokr_t2"].double()
        return a.T, _tucker_down(core, b), b.shape[0], tuple(core.shape[2:])
    return a, b, b.shape[0], None


def _lokr(sd: dict[str, torch.Tensor], name: str, source: str):
    p1, q1, rank1, _ = _lokr_part(sd, name, 1)
    p2, q2, rank2, kernel = _lokr_part(sd, name, 2)
    rank = rank2 or rank1  # LyCORIS: alpha / lora_dim, scale 1 when both parts are full
    tail = None
    if kernel is not None:
        tail = (q1.shape[1] * q2.shape[1] // math.prod(kernel), *kernel)
    keys = [k for k in sd if k.startswith(f"{name}.lokr_")]
    kron = [torch.kron(a.contiguous(), b.contiguous()) for a, b in ((p1, p2), (q1, q2))]
    return *kron, rank, tail, keys


def lycoris_to_lora(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with every LoHa and LoKr module replaced by kohya LoRA keys of the same update (float64).

    A module with DoRA's ``dora_scale`` is left as it is (resize refuses it by name). Other keys are unchanged.
    """
    converters = [(n, _loha) for n in _module_names(state_dict, ".hada_w1_a")]
    converters += [(n, _lokr) for n in _module_names(state_dict, ".lokr_w1")]
    converters += [(n, _lokr) for n in _module_names(state_dict, ".lokr_w1_a")]
    converters = [(n, c) for n, c in converters if f"{n}.dora_scale" not in state_dict]
    if not converters:
        return state_dict
    converted = dict(state_dict)
    for name, convert in converters:
        try:
            up, down, rank, tail, keys = convert(state_dict, name, source)
        except KeyError as err:
            raise LoRAFileError(
                f"{source}: module '{name}' lacks '{err.args[0]}': an incomplete LyCORIS module"
            ) from err
        alpha = state_dict.get(f"{name}.alpha")
        scale = 1.0 if alpha is None or rank is None else float(alpha) / rank
        if tail is None and name.startswith("lora_unet"):  # flattened conv factors: the kernel from the name
            kernel = _kernel_for(name, down.shape[1], source)
            if kernel != (1, 1):
                tail = (down.shape[1] // math.prod(kernel), *kernel)
        for key in [*keys, f"{name}.alpha"]:
            converted.pop(key, None)
        new_rank = down.shape[0]
        if tail is not None:
            up, down = up.reshape(*up.shape, 1, 1), down.reshape(new_rank, *tail)
        converted[f"{name}.lora_down.weight"] = down
        converted[f"{name}.lora_up.weight"] = up * scale
        converted[f"{name}.alpha"] = torch.tensor(float(new_rank), dtype=torch.float64)
    return converted
