"""Frozen layers that keep a fp16/bf16 file's weights as stored and widen them for each product.

A float32 run (``--mixed_precision no``, the usual setting on a CPU) of a fp16 or bf16 checkpoint
used to cast every weight to float32 while loading: the frozen SD1.5 UNet took 3.2 GiB instead of
the file's 1.6, and loading spent seconds faulting in the new pages. Widening fp16 or bf16 to
float32 is exact, so a frozen ``Linear`` or ``Conv2d`` can keep the stored tensor and widen it into
a scratch buffer just before each product: every output and every gradient is bit for bit the one
of the float32 model. Everything else (norms, biases, embeddings: 4% of SD1.5's parameters) is
widened once, so the model computes in float32 throughout.

Written by hand because diffusers' layerwise casting (``diffusers.hooks``, for inference) widens a
layer's parameters in place for its forward: autograd then keeps every widened weight until the
backward pass, and a training step holds the float32 model again. Here a custom autograd function
saves only the narrow weight and widens it again in backward, so at most one widened weight exists
at a time. The cost is two widening passes over the weights per step: memory traffic, none of the
arithmetic (x1.11 to x1.22 of an SD1.5 LoRA step at 256 px on a 2-core CPU, docs/training.md;
on a GPU, by its bandwidth, a few milliseconds: not measured). ``--highvram`` keeps float32 copies.

diffusers' ``ModelMixin.dtype``, transformers' ``PreTrainedModel.dtype`` and the pipelines built on them
read a model's dtype from its first parameter, so that one is never kept narrow (SD's ``conv_in``:
0.001% of the UNet): the model reports, and its callers cast inputs to, the dtype it computes in.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from library.weights_reader import stored_dtypes

NARROW_DTYPES = (torch.float16, torch.bfloat16)
_MARK = "_widened_per_use"

_scratch = threading.local()


def _widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, written into this thread's scratch buffer for ``(device, dtype)``.

    One buffer (the largest weight's size) serves every layer: a fresh tensor per product would
    fault in fresh pages every step (costly on virtual machines) and fragment the heap. Under
    ``torch.compile`` (``--torch_compile``) a plain cast, which the compiler places itself.
    """
    if torch.compiler.is_compiling():
        return weight.to(dtype)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (weight.device, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < weight.numel():
        buffer = buffers[key] = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
    out = buffer[: weight.numel()].view(weight.shape)
    out.copy_(weight)
    return out


class _WidenedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, _widened(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ _widened(weight, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class _WidenedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, _widened(weight, x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            shape, stride, padding, dilation, groups = ctx.geometry
            weight = _widened(weight, grad.dtype)
            grad_x = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


def _linear_forward(layer: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if layer.weight.dtype == x.dtype or layer.weight.requires_grad:  # widened since, or trained: plain layer
            return F.linear(x, layer.weight.to(x.dtype), layer.bias)
        return _WidenedLinear.apply(x, layer.weight, layer.bias)

    return forward


def _conv_forward(layer: nn.Conv2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
        if layer.weight.dtype == x.dtype or layer.weight.requires_grad:
            return F.conv2d(x, layer.weight.to(x.dtype), layer.bias, *geometry)
        return _WidenedConv2d.apply(x, layer.weight, layer.bias, *geometry)

    return forward


def _can_stay_narrow(layer: nn.Module, compute: torch.dtype) -> bool:
    if type(layer) not in (nn.Linear, nn.Conv2d) or "forward" in layer.__dict__:  # exact types; unpatched
        return False
    weight = layer.weight
    if weight.dtype not in NARROW_DTYPES or compute.itemsize <= weight.itemsize or weight.requires_grad:
        return False
    return isinstance(layer, nn.Linear) or (layer.padding_mode == "zeros" and isinstance(layer.padding, tuple))


def keep_weights_narrow(module: nn.Module, compute: torch.dtype = torch.float32) -> int:
    """Let ``module``'s frozen fp16/bf16 ``Linear``/``Conv2d`` weights stay as they are, widened per use;
    widen every other floating tensor to ``compute``. Returns the number of layers kept narrow.

    Call it before a network patches the layers (the network's ``original_forward`` is then this one).
    """
    kept = 0
    first = next((tensor for tensor in module.parameters() if tensor.is_floating_point()), None)
    for layer in module.modules():
        if _can_stay_narrow(layer, compute) and layer.weight is not first:
            layer.forward = _linear_forward(layer) if isinstance(layer, nn.Linear) else _conv_forward(layer)
            setattr(layer, _MARK, True)
            kept += 1
    narrow = {id(layer.weight) for layer in module.modules() if getattr(layer, _MARK, False)}
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != compute and id(tensor) not in narrow:
                tensor.data = tensor.data.to(compute)
    return kept


def has_narrow_weights(module: nn.Module) -> bool:
    return any(getattr(layer, _MARK, False) for layer in module.modules())


def place_keeping_narrow(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, except that a model with narrow weights only moves (its dtypes are set)."""
    if has_narrow_weights(module):
        module.to(device)
    else:
        module.to(device, dtype=dtype)


def stored_float_dtype(files: Iterable[str | Path]) -> torch.dtype | None:
    """The one floating dtype every tensor of these ``.safetensors`` files is stored in (None: mixed or unknown)."""
    found: set[torch.dtype] = set()
    for file in files:
        for kind in stored_dtypes(file).values():
            if kind is None or (kind.is_floating_point and kind.itemsize == 1):  # unknown, or fp8: never kept
                return None
            if kind.is_floating_point:
                found.add(kind)
    return found.pop() if len(found) == 1 else None


def folder_load_dtype(folder: str | Path, requested: torch.dtype | None, keep_narrow: bool) -> torch.dtype | None:
    """The dtype to load a diffusers/transformers component folder in.

    ``requested`` unless ``keep_narrow`` and it is float32 and all of the folder's weights are stored
    in one narrow dtype: then that one (the caller widens all but the matmul weights afterwards).
    """
    if not keep_narrow or requested != torch.float32:
        return requested
    files = sorted(Path(folder).glob("*.safetensors"))
    stored = stored_float_dtype(files) if files else None
    return stored if stored in NARROW_DTYPES else requested
