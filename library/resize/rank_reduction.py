"""Resizing the modules of a LoRA state dict to a lower rank, exactly and with kohya's rank rules.

Each module's update ``up @ down`` is decomposed from its factors (``networks.svd``), never as a
dense matrix, and truncated to the rank kohya's ``resize_lora.py`` would pick for the same flags;
``alpha / rank`` is kept, so the effective scale does not change. Beyond kohya:

* a rule that asks for more singular values than the update has keeps the module as it is
  (kohya would add zero singular vectors, i.e. numerical noise);
* a module that keeps its rank is copied bit for bit; a module without ``alpha`` gets none
  (every consumer reads that as scale 1, before and after);
* a LyCORIS Tucker LoCon (``lora_mid``) becomes a plain LoCon of the same update;
* with ``keep_alpha`` every module keeps its input alpha and the rank change is folded into its
  factors: the same update, and diffusers (which gives all attention layers one alpha) reads
  dynamic-rank files right.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from library.errors import ConfigError
from library.resize.lora_pairs import LoRAPair, find_lora_pairs
from networks.errors import LoRAFileError
from networks.svd import (
    DYNAMIC_METHODS,
    NonFiniteFactors,
    RankChoice,
    Retention,
    factored_singular_values,
    factored_svd,
    lora_matrices,
    lora_pair,
    retention,
    select_rank,
    tucker_to_lora_down,
)


@dataclass(frozen=True)
class ResizeRequest:
    """kohya's resize flags: ``--new_rank``, ``--new_conv_rank``, ``--dynamic_method``, ``--dynamic_param``."""

    new_rank: int = 4
    new_conv_rank: int | None = None
    dynamic_method: str | None = None
    dynamic_param: float | None = None
    keep_alpha: bool = False  # write the input alphas, fold the rank change into the factors
    conv_rank_3x3_only: bool = False  # svd_merge_lora.py's cap: --new_conv_rank for 3x3 convs, not 1x1
    module_ranks: Mapping[str, int] | None = None  # ranks chosen for a size budget (library.resize.budget)
    budget_label: str = ""  # what the budget was, for the metadata comment

    def __post_init__(self) -> None:
        if self.new_rank < 1 or (self.new_conv_rank is not None and self.new_conv_rank < 1):
            raise ConfigError("--new_rank and --new_conv_rank must be at least 1")
        if self.dynamic_method is not None and self.dynamic_method not in DYNAMIC_METHODS:
            raise ConfigError(f"--dynamic_method must be one of {', '.join(DYNAMIC_METHODS)}")
        if self.dynamic_method is not None and self.dynamic_param is None:
            raise ConfigError(f"--dynamic_method {self.dynamic_method} needs --dynamic_param")
        if self.dynamic_param is not None and not self.dynamic_param > 0:
            raise ConfigError(f"--dynamic_param must be positive, got {self.dynamic_param}")

    @property
    def conv_rank(self) -> int:
        return self.new_rank if self.new_conv_rank is None else self.new_conv_rank

    def max_rank(self, is_conv: bool, kernel: tuple[int, ...] = ()) -> int:
        """kohya's cap: ``--new_conv_rank`` for every 4-D (conv) module, 1x1 included; ``--new_rank`` otherwise.

        With ``conv_rank_3x3_only`` (kohya's ``svd_merge_lora.py``) a 1x1 ``kernel`` gets ``--new_rank``.
        """
        if is_conv and self.conv_rank_3x3_only and tuple(kernel) == (1, 1):
            return self.new_rank
        return self.conv_rank if is_conv else self.new_rank


@dataclass(frozen=True)
class ModuleSpectrum:
    """A module's non-zero singular values and the shapes that decide its rank and size."""

    pair: LoRAPair
    spectrum: torch.Tensor
    old_rank: int
    out_features: int
    in_features: int  # in * kh * kw for convs
    down_tail: tuple[int, ...]  # lora_down's shape after the rank: (in,) or (in, kh, kw)
    scale: float | None  # alpha / old rank; None when the file has no alpha for it

    @property
    def name(self) -> str:
        return self.pair.name

    @property
    def is_conv(self) -> bool:
        return len(self.down_tail) == 3

    @property
    def full_length(self) -> int:
        """Length of the dense matrix's spectrum, which kohya's index clamp refers to."""
        return min(self.out_features, self.in_features)

    def choose(self, request: ResizeRequest) -> RankChoice:
        if request.module_ranks is not None:
            rank = request.module_ranks[self.name]
            return RankChoice(rank, rank)
        return select_rank(
            self.spectrum,
            request.max_rank(self.is_conv, self.down_tail[1:]),
            self.full_length,
            request.dynamic_method,
            request.dynamic_param,
        )

    def new_alpha(self, rank: int, keep_alpha: bool = False) -> float | None:
        """kohya's ``scale * rank`` (same alpha / rank), or with ``keep_alpha`` the input alpha."""
        if self.scale is None:
            return None
        return self.scale * (self.old_rank if keep_alpha else rank)


@dataclass(frozen=True)
class ModuleResize:
    """What happened to one module."""

    module: ModuleSpectrum
    choice: RankChoice
    retention: Retention
    copied: bool  # tensors written unchanged (apart from --save_precision)
    new_alpha: float | None


@dataclass
class ResizeResult:
    """The resized tensors (in file order) and one :class:`ModuleResize` per LoRA module."""

    state_dict: dict[str, torch.Tensor]
    modules: list[ModuleResize]

    @property
    def max_old_rank(self) -> int:
        return max(m.module.old_rank for m in self.modules)


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64: the Gram matrices square the spectrum's range. Apple's MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


@contextlib.contextmanager
def _one_thread_per_op() -> Iterator[int]:
    """Run torch ops single-threaded inside; yields the thread count to use for whole modules instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def map_modules(work: Callable, pairs: list[LoRAPair], device: torch.device, desc: str) -> list:
    """``work(pair)`` for every module, in order, with a progress bar.

    On the CPU, modules run side by side, one thread each: the LAPACK calls of one module (QRs of
    a few thousand rows, an r x r SVD) are too small to split across threads, and split they slow
    down tenfold and more as soon as another process holds a core (threads wait at each barrier).
    """
    if device.type != "cpu":
        return [work(pair) for pair in tqdm(pairs, desc=desc, unit="module")]
    with _one_thread_per_op() as threads, ThreadPoolExecutor(max(threads, 1)) as pool:
        futures = [pool.submit(work, pair) for pair in pairs]
        try:
            return [future.result() for future in tqdm(futures, desc=desc, unit="module")]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _factors(pair: LoRAPair, state_dict: dict[str, torch.Tensor], device: torch.device, source: str):
    up, down = state_dict[pair.up_key].to(device), state_dict[pair.down_key].to(device)
    if pair.mid_key in state_dict:
        down = tucker_to_lora_down(
            state_dict[pair.mid_key].to(device, compute_dtype(device)), down.to(compute_dtype(device))
        )
    return up, down


@contextlib.contextmanager
def _finite_check(pair: LoRAPair, source: str) -> Iterator[None]:
    """The SVD finds NaN/inf factors on its small Gram matrices (cheaper than scanning the inputs)."""
    try:
        yield
    except NonFiniteFactors:
        raise LoRAFileError(f"{source}: module '{pair.name}' has NaN or infinite weights") from None


def _spectrum_of(
    pair: LoRAPair, state_dict: dict[str, torch.Tensor], up: torch.Tensor, down: torch.Tensor, spectrum: torch.Tensor
) -> ModuleSpectrum:
    up2d, down2d = lora_matrices(up, down)
    alpha = state_dict.get(pair.alpha_key)
    old_rank = down2d.shape[0]
    return ModuleSpectrum(
        pair=pair,
        spectrum=spectrum.to("cpu", torch.float64),
        old_rank=old_rank,
        out_features=up2d.shape[0],
        in_features=down2d.shape[1],
        down_tail=tuple(down.shape[1:]),
        scale=None if alpha is None else float(alpha) / old_rank,
    )


def module_spectra(
    state_dict: dict[str, torch.Tensor], source: str, device: str | torch.device = "cpu"
) -> list[ModuleSpectrum]:
    """The spectrum of every LoRA module (singular values only: what a rank preview needs)."""
    device = torch.device(device)

    def spectrum_of(pair: LoRAPair) -> ModuleSpectrum:
        up, down = _factors(pair, state_dict, device, source)
        with _finite_check(pair, source):
            spectrum = factored_singular_values(up, down, compute_dtype(device))
        return _spectrum_of(pair, state_dict, up, down, spectrum)

    return map_modules(spectrum_of, find_lora_pairs(state_dict, source), device, "singular values")


def _resize_pair(
    pair: LoRAPair,
    state_dict: dict[str, torch.Tensor],
    request: ResizeRequest,
    device: torch.device,
    source: str,
    save_dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], ModuleResize]:
    up, down = _factors(pair, state_dict, device, source)
    with _finite_check(pair, source):
        svd = factored_svd(up, down, compute_dtype(device))
    module = _spectrum_of(pair, state_dict, up, down, svd.S)
    choice = module.choose(request)
    copied = choice.rank == module.old_rank and pair.mid_key not in state_dict
    new_alpha = module.new_alpha(choice.rank, request.keep_alpha)
    if copied:
        tensors = {pair.down_key: state_dict[pair.down_key], pair.up_key: state_dict[pair.up_key]}
    else:
        new_up, new_down = svd.truncate(choice.rank)
        if new_alpha is not None and request.keep_alpha:
            # alpha / rank grows by old_rank / rank: shrink both factors to keep the update
            fold = (choice.rank / module.old_rank) ** 0.5
            new_up, new_down = new_up * fold, new_down * fold
        new_up, new_down = lora_pair(new_up, new_down, down.shape)
        tensors = {pair.down_key: new_down.cpu(), pair.up_key: new_up.cpu()}
    if new_alpha is not None:
        tensors[pair.alpha_key] = torch.tensor(new_alpha)
    tensors = {k: cast_tensor(v, save_dtype) for k, v in tensors.items()}
    return tensors, ModuleResize(module, choice, retention(module.spectrum, choice.rank), copied, new_alpha)


def resize_state_dict(
    state_dict: dict[str, torch.Tensor],
    request: ResizeRequest,
    source: str = "LoRA",
    device: str | torch.device = "cpu",
    save_dtype: torch.dtype = torch.float32,
) -> ResizeResult:
    """Resize every LoRA module of ``state_dict``; other keys are copied. Floating tensors end in ``save_dtype``.

    ``source`` names the file in error messages. The input dict is not modified.
    """
    device = torch.device(device)
    pairs = find_lora_pairs(state_dict, source)
    owned = {key for pair in pairs for key in pair.keys}
    outcomes = map_modules(
        lambda pair: _resize_pair(pair, state_dict, request, device, source, save_dtype), pairs, device, "resizing"
    )
    resized = {key: tensor for tensors, _ in outcomes for key, tensor in tensors.items()}
    modules = [outcome for _, outcome in outcomes]
    # File order; a Tucker module's lora_mid is gone (folded into its lora_down).
    output = {
        k: resized[k] if k in resized else cast_tensor(v, save_dtype)
        for k, v in state_dict.items()
        if k not in owned or k in resized
    }
    return ResizeResult(output, modules)


def is_no_op(state_dict: dict[str, torch.Tensor], request: ResizeRequest, source: str = "LoRA") -> bool:
    """A fixed ``--new_rank``/``--new_conv_rank`` at or above every module's rank would change nothing."""
    if request.dynamic_method is not None or request.module_ranks is not None:
        return False
    downs = [state_dict[pair.down_key] for pair in find_lora_pairs(state_dict, source)]
    return all(request.max_rank(down.dim() == 4, tuple(down.shape[2:])) >= down.shape[0] for down in downs)


def cast_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``--save_precision`` cast; unlike kohya, integer tensors (other than alphas) keep their type."""
    return tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()


def resized_metadata(
    metadata: dict[str, str], request: ResizeRequest, max_old_rank: int, network_alpha: float | None
) -> dict[str, str]:
    """kohya's metadata update: ``ss_training_comment`` prefix and ``ss_network_dim``/``ss_network_alpha``.

    ``network_alpha`` is the new alpha of the linear modules (:func:`linear_alpha`). Everything else
    is kept; ``sshs_*`` hashes are dropped here and recomputed when the file is saved.
    """
    updated = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    comment = metadata.get("ss_training_comment", "")
    if request.module_ranks is not None:
        what = f"Resized to fit {request.budget_label} from {max_old_rank}"
        alpha = str(network_alpha) if request.keep_alpha and network_alpha is not None else "Dynamic"
        updated.update(ss_network_dim="Dynamic", ss_network_alpha=alpha)
    elif request.dynamic_method:
        param = float(request.dynamic_param)
        what = f"Dynamic resize with {request.dynamic_method}: {param} from {max_old_rank}"
        alpha = str(network_alpha) if request.keep_alpha and network_alpha is not None else "Dynamic"
        updated.update(ss_network_dim="Dynamic", ss_network_alpha=alpha)
    else:
        conv = "" if request.conv_rank == request.new_rank else f" (conv: {request.conv_rank})"
        what = f"dimension is resized from {max_old_rank} to {request.new_rank}{conv}"
        # Without alphas in the file the scale is 1, so alpha equals the rank, as kohya writes then.
        alpha = float(request.new_rank) if network_alpha is None else network_alpha
        updated.update(ss_network_dim=str(request.new_rank), ss_network_alpha=str(alpha))
    updated["ss_training_comment"] = f"{what}; {comment}"
    return updated


def linear_alpha(modules: list[ModuleResize]) -> float | None:
    """The new alpha most linear modules have (kohya writes the last module's, which may be a conv's)."""
    alphas = [m.new_alpha for m in modules if not m.module.is_conv and m.new_alpha is not None]
    alphas = alphas or [m.new_alpha for m in modules if m.new_alpha is not None]
    return statistics.mode(alphas) if alphas else None
