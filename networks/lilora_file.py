"""Light LoRA without a model: the frozen aux bases, baking cores into kohya factors, and the compact file.

Aux bases are a pure function of (aux_seed, module name, layer shape): float32 normals from a private CPU
generator seeded by sha256 (``hash()`` is salted per process), orthonormalised by a float64 QR (an fp32
QR changes bits with the thread count), signs fixed, cast to float32. Their sha256 is the fingerprint
that a compact file carries, so a regeneration that differs is refused instead of silently used.

Compact file: one tensor per module, ``<name>.lilora_factors`` = ``[D_train | U_train^T]`` (r x (a+b)), or
``<name>.lilora_core`` (b x a) with ``init=joint``; metadata ``ss_lilora_layers`` = ``{name: [rank, alpha,
layer weight shape]}``, ``ss_lilora_aux_seed``/``_down``/``_up``, ``ss_lilora_init``,
``ss_lilora_aux_algorithm`` and ``ss_lilora_aux_fingerprint``.

Imports only torch and ``networks/`` siblings: kohya users copy network files into their checkout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import torch

from networks.base import NetworkWeightsError

AUX_ALGORITHM = "1"  # bump when aux generation changes: older compact files then fail their check loudly
SUBSPACE_TOLERANCE = 1e-2  # relative residual of a standard factor off the aux bases (bf16 rounding is ~2e-3)
COMPACT_NAME = re.compile(r"\.lilora(-\d+|-step\d+)?\.safetensors$")  # also kohya's epoch/step file names
FORMAT_KEY, LAYERS_KEY, FINGERPRINT_KEY = "ss_lilora_format", "ss_lilora_layers", "ss_lilora_aux_fingerprint"
INIT_KEY, ALGORITHM_KEY = "ss_lilora_init", "ss_lilora_aux_algorithm"
AUX_KEYS = {"aux_seed": "ss_lilora_aux_seed", "aux_down": "ss_lilora_aux_down", "aux_up": "ss_lilora_aux_up"}
CORE_KEYS = ("lilora_factors", "lilora_core")


# ---- aux bases ----


def stable_seed(*parts: object) -> int:
    """A 63-bit generator seed from sha256 of the parts, the same in every process."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """float32 ``rows x cols`` with orthonormal rows (rows <= cols) or columns, Haar-distributed, bit-stable."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float32)
    q, r = torch.linalg.qr(gaussian.double())
    q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # unique signs: Haar measure, no LAPACK-dependent choice
    return (q if rows >= cols else q.T).float().contiguous()


def layer_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, out) of a layer weight shape: D_aux spans in·kh·kw, U_aux spans out."""
    return math.prod(shape[1:]), shape[0]


def aux_matrices(
    seed: int, name: str, shape: Sequence[int], aux_down: int, aux_up: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_aux ``a x fan_in``, U_aux ``out x b``) of layer ``name``, with a and b clamped to the layer."""
    fan_in, out = layer_dims(shape)
    down = orthonormal(min(aux_down, fan_in), fan_in, stable_seed(seed, name, "down"))
    return down, orthonormal(out, min(aux_up, out), stable_seed(seed, name, "up"))


def aux_digest(name: str, down_aux: torch.Tensor, up_aux: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{AUX_ALGORITHM}:{name}:{tuple(down_aux.shape)}:{tuple(up_aux.shape)}".encode())
    for aux in (down_aux, up_aux):
        digest.update(aux.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(digests: Mapping[str, str]) -> str:
    """One sha256 over the aux digests of the named modules, in name order."""
    return hashlib.sha256("".join(f"{name}={digests[name]};" for name in sorted(digests)).encode()).hexdigest()


# ---- cores <-> kohya factors ----


def bake(
    cores: Mapping[str, torch.Tensor], down_aux: torch.Tensor, up_aux: torch.Tensor, rank: int, shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's (lora_down, lora_up) for a module's cores: multiplied out in float64 on the CPU, returned in the
    cores' dtype or float32 if that is narrower.

    A joint core is split by SVD into its best rank-``rank`` approximation, singular values shared evenly
    (balanced factors stay accurate in fp16 files and later resizes); missing ranks are zero-padded.
    """
    dtype = torch.promote_types(next(iter(cores.values())).dtype, torch.float32)
    down_aux, up_aux = down_aux.detach().cpu().double(), up_aux.detach().cpu().double()
    cores = {key: value.detach().cpu().double() for key, value in cores.items()}
    if "lilora_core" in cores:
        u, s, vh = torch.linalg.svd(cores["lilora_core"], full_matrices=False)
        kept, root = min(rank, s.numel()), s[:rank].sqrt()
        up_train, down_train = up_aux.new_zeros(up_aux.shape[1], rank), up_aux.new_zeros(rank, down_aux.shape[0])
        up_train[:, :kept], down_train[:kept] = u[:, :kept] * root, root[:, None] * vh[:kept]
    else:
        down_train, up_train = cores["lilora_down"], cores["lilora_up"]
    down, up = (down_train @ down_aux).to(dtype), (up_aux @ up_train).to(dtype)
    return down.view(rank, *shape[1:]), up.view(*up.shape, 1, 1) if len(shape) == 4 else up


def project(
    down: torch.Tensor, up: torch.Tensor, down_aux: torch.Tensor, up_aux: torch.Tensor, name: str, source: str
) -> dict[str, torch.Tensor]:
    """Cores reproducing kohya factors that lie in the aux bases (orthonormal: a transpose inverts them).

    Refuses factors off the bases by more than rounding: no cores reproduce them.
    """
    down_aux, up_aux = down_aux.detach().cpu().double(), up_aux.detach().cpu().double()
    down, up = down.detach().cpu().double().flatten(1), up.detach().cpu().double().flatten(1)
    down_train, up_train = down @ down_aux.T, up_aux.T @ up
    for part, factor, inside in (("lora_down", down, down_train @ down_aux), ("lora_up", up, up_aux @ up_train)):
        residual = (factor - inside).norm() / factor.norm().clamp(min=torch.finfo(torch.float64).tiny)
        if residual > SUBSPACE_TOLERANCE:
            raise NetworkWeightsError(
                f"'{name}.{part}.weight' of '{source}' lies outside this network's aux bases ({residual:.2f} of "
                "its norm): networks.lilora did not save it with these aux settings; resume from its compact "
                "file, or train it with networks.lora"
            )
    return {"lilora_down": down_train.float(), "lilora_up": up_train.float()}


# ---- compact files ----


def is_compact_name(file: str | os.PathLike) -> bool:
    return COMPACT_NAME.search(str(file)) is not None


def is_compact(weights: Mapping[str, torch.Tensor]) -> bool:
    return any(key.endswith(CORE_KEYS) for key in weights)


def pack(cores: Mapping[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """(key, tensor) of a module's cores in a compact file: one tensor, as the header would otherwise be a fifth
    of the file."""
    if "lilora_core" in cores:
        return "lilora_core", cores["lilora_core"]
    return "lilora_factors", torch.cat([cores["lilora_down"], cores["lilora_up"].T], dim=1)


def unpack(weights: Mapping[str, torch.Tensor], name: str, a: int, b: int, source: str) -> dict[str, torch.Tensor]:
    """The cores of module ``name`` (aux sizes a, b) in a compact file's tensors."""
    core, factors = weights.get(f"{name}.lilora_core"), weights.get(f"{name}.lilora_factors")
    if core is not None and tuple(core.shape) == (b, a):
        return {"lilora_core": core}
    if factors is not None and factors.dim() == 2 and factors.shape[1] == a + b:
        return {"lilora_down": factors[:, :a], "lilora_up": factors[:, a:].T.contiguous()}
    shapes = [
        f"{key} {tuple(t.shape)}" for key, t in (("lilora_factors", factors), ("lilora_core", core)) if t is not None
    ]
    raise NetworkWeightsError(
        f"'{source}' has {shapes[0] if shapes else 'no cores'} for '{name}', but its aux sizes {a} and {b} need "
        f"lilora_factors (r, {a + b}) or lilora_core {(b, a)}"
    )


def aux_settings(metadata: Mapping[str, str]) -> dict[str, str]:
    """The network_args a Light LoRA file's metadata fixes (aux_seed, aux_down, aux_up, init)."""
    return {arg: metadata[key] for arg, key in {**AUX_KEYS, "init": INIT_KEY}.items() if key in metadata}


def compact_settings(metadata: Mapping[str, str], source: str) -> dict[str, str]:
    """:func:`aux_settings` of a compact file, refused when metadata is missing or from another aux algorithm."""
    missing = [
        k for k in [*AUX_KEYS.values(), INIT_KEY, ALGORITHM_KEY, LAYERS_KEY, FINGERPRINT_KEY] if k not in metadata
    ]
    if missing:
        raise NetworkWeightsError(f"'{source}' has Light LoRA cores but no {missing[0]} metadata: not a compact file")
    if metadata[ALGORITHM_KEY] != AUX_ALGORITHM:
        raise NetworkWeightsError(
            f"'{source}' used aux algorithm {metadata[ALGORITHM_KEY]} ({ALGORITHM_KEY}), this file implements "
            f"{AUX_ALGORITHM}: convert it with the networks/lilora.py that trained it"
        )
    return aux_settings(metadata)


def compact_layers(metadata: Mapping[str, str], source: str) -> dict[str, tuple[int, float, list[int]]]:
    """``{name: (rank, alpha, layer weight shape)}`` of a compact file."""
    try:
        layers = json.loads(metadata[LAYERS_KEY])
        return {
            name: (int(rank), float(alpha), [int(n) for n in shape]) for name, (rank, alpha, shape) in layers.items()
        }
    except (KeyError, ValueError, TypeError) as err:
        raise NetworkWeightsError(f"'{source}': {LAYERS_KEY} metadata is missing or malformed ({err})") from None


def check_fingerprint(metadata: Mapping[str, str], digests: Mapping[str, str], source: str) -> None:
    expected, actual = metadata.get(FINGERPRINT_KEY, ""), fingerprint(digests)
    if expected != actual:
        raise NetworkWeightsError(
            f"'{source}': the aux matrices regenerated here differ from those it was trained with "
            f"({FINGERPRINT_KEY} {expected[:12]}… != {actual[:12]}…); convert it where it was trained "
            "(python networks/lilora.py --to_lora IN OUT) and use the standard file"
        )


def compact_to_standard(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                        source: str = "the weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """A compact file's (tensors, metadata) as the standard file the network saves, in the cores' dtype."""
    settings = compact_settings(metadata, source)
    seed, dims = int(settings["aux_seed"]), (int(settings["aux_down"]), int(settings["aux_up"]))
    standard, digests = {}, {}
    for name, (rank, alpha, shape) in compact_layers(metadata, source).items():
        down_aux, up_aux = aux_matrices(seed, name, shape, *dims)
        digests[name] = aux_digest(name, down_aux, up_aux)
        cores = unpack(tensors, name, down_aux.shape[0], up_aux.shape[1], source)
        dtype = next(iter(cores.values())).dtype
        down, up = bake(cores, down_aux, up_aux, rank, shape)
        standard |= {f"{name}.lora_down.weight": down.to(dtype), f"{name}.lora_up.weight": up.to(dtype)}
        standard[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    check_fingerprint(metadata, digests, source)
    kept = {key: value for key, value in metadata.items() if key != LAYERS_KEY and not key.startswith("sshs_")}
    return standard, {**kept, FORMAT_KEY: "standard"}
