"""Optimizer and learning-rate scheduler factories with kohya's names and argument syntax."""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)


def parse_optimizer_args(pairs: list[str] | None, flag: str = "--optimizer_args") -> dict[str, Any]:
    """``betas=0.9,0.99 weight_decay=0.01`` -> {"betas": (0.9, 0.99), "weight_decay": 0.01} (as kohya)."""
    parsed: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"{flag}: expected key=value, got {pair!r}")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed[key.strip()] = value.strip()  # kohya keeps unparsable values as strings
    return parsed


def _import(path: str, what: str, flag: str = "--optimizer_type") -> Callable:
    """``module.Class`` as kohya resolves it (case-sensitive), as a one-line error when it is not there."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{flag} {what}: cannot import {path} ({err})") from err


def _bnb(name: str) -> Callable:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as err:
        raise ConfigError(f"--optimizer_type {name} needs bitsandbytes") from err
    return getattr(bnb_optim, name)


def _adafactor(_: str) -> Callable:
    from transformers.optimization import Adafactor

    return Adafactor


def _adafactor_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """kohya's Adafactor defaults: relative step (its own schedule) unless told otherwise."""
    kwargs.setdefault("relative_step", True)
    kwargs.setdefault("scale_parameter", kwargs["relative_step"])
    kwargs.setdefault("warmup_init", False)
    return kwargs


# kohya's optimizer names (case-insensitive) -> how to build them.
_OPTIMIZERS: dict[str, Callable[[str], Callable]] = {
    "adamw": lambda _: torch.optim.AdamW,
    "adamw8bit": lambda _: _bnb("AdamW8bit"),
    "pagedadamw": lambda _: _bnb("PagedAdamW"),
    "pagedadamw8bit": lambda _: _bnb("PagedAdamW8bit"),
    "pagedadamw32bit": lambda _: _bnb("PagedAdamW32bit"),
    "lion": lambda n: _import("lion_pytorch.Lion", n),
    "lion8bit": lambda _: _bnb("Lion8bit"),
    "pagedlion8bit": lambda _: _bnb("PagedLion8bit"),
    "sgdnesterov": lambda _: torch.optim.SGD,
    "sgdnesterov8bit": lambda _: _bnb("SGD8bit"),
    "prodigy": lambda n: _import("prodigyopt.Prodigy", n),
    "dadaptation": lambda n: _import("dadaptation.DAdaptAdam", n),
    "dadaptadam": lambda n: _import("dadaptation.DAdaptAdam", n),
    "dadaptadagrad": lambda n: _import("dadaptation.DAdaptAdaGrad", n),
    "dadaptadan": lambda n: _import("dadaptation.DAdaptAdan", n),
    "dadaptlion": lambda n: _import("dadaptation.DAdaptLion", n),
    "dadaptsgd": lambda n: _import("dadaptation.DAdaptSGD", n),
    "adafactor": _adafactor,
    "adamwschedulefree": lambda n: _import("schedulefree.AdamWScheduleFree", n),
    "sgdschedulefree": lambda n: _import("schedulefree.SGDScheduleFree", n),
    "radamschedulefree": lambda n: _import("schedulefree.RAdamScheduleFree", n),
}
_ADAPTIVE = ("prodigy", "dadapt")


def optimizer_class(name: str) -> Callable:
    """The class behind kohya's ``--optimizer_type`` name; checked before any model is loaded."""
    key = (name or "AdamW").lower()
    if key in _OPTIMIZERS:
        return _OPTIMIZERS[key](name)
    if "." in name:
        return _import(name, name)
    if hasattr(torch.optim, name):
        return getattr(torch.optim, name)
    known = "AdamW, AdamW8bit, Lion, Lion8bit, SGDNesterov, Adafactor, Prodigy, DAdaptAdam, ... or pkg.module.Class"
    raise ConfigError(f"--optimizer_type '{name}' is unknown (known: {known})")


def make_optimizer(args: argparse.Namespace, param_groups: list[dict]) -> tuple[str, torch.optim.Optimizer]:
    """Build ``--optimizer_type`` over ``param_groups``; returns (kohya's logged name, optimizer)."""
    name = args.optimizer_type or "AdamW"
    key = name.lower()
    cls = optimizer_class(name)
    kwargs = parse_optimizer_args(args.optimizer_args)
    lr = args.learning_rate
    if key.startswith("sgdnesterov"):
        kwargs.setdefault("momentum", 0.9)
        kwargs["nesterov"] = True
    if key.startswith(_ADAPTIVE) and lr <= 0.1:
        logger.warning("%s adapts the learning rate itself; kohya recommends --learning_rate 1.0", name)
    if key == "adafactor" and _adafactor_defaults(kwargs)["relative_step"]:
        lr = None  # Adafactor computes its own step size; group lrs are dropped as kohya does
        for group in param_groups:
            group.pop("lr", None)
    implementation = _fused_default(cls, kwargs, param_groups)
    try:
        if lr is not None:
            optimizer = cls(param_groups, lr=lr, **kwargs, **implementation)
        else:
            optimizer = cls(param_groups, **kwargs, **implementation)
    except TypeError as err:
        raise ConfigError(f"--optimizer_args do not fit {cls.__name__}: {err}") from err
    logged = f"{cls.__module__}.{cls.__name__}"
    if kwargs:
        logged += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    if is_schedule_free(optimizer):
        optimizer.train()  # kohya: train mode while training; eval mode around sampling, validation and saving
    return logged, optimizer


def _fused_default(cls: Callable, kwargs: dict[str, Any], param_groups: list[dict]) -> dict[str, Any]:
    """``fused=True`` for torch's Adam and AdamW unless ``--optimizer_args`` choose an implementation.

    The same update in one kernel per step: on the CPU, torch's default for CPU tensors is a Python
    loop over every tensor (a LoRA has hundreds), 73 ms against 15 ms per step for 6.8 M parameters
    (``python -m bench.bench_cpu_levers --levers fused_adamw``). Not written into ``ss_optimizer``: the
    flags are the user's, as in kohya.
    """
    if cls not in (torch.optim.Adam, torch.optim.AdamW) or {"fused", "foreach"} & kwargs.keys():
        return {}
    params = [p for group in param_groups for p in group["params"]]
    supported = {"cpu", "cuda", "xpu", "mps"}
    if all(p.is_floating_point() and p.device.type in supported and p.dtype != torch.float64 for p in params):
        return {"fused": True}
    return {}


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """The schedulefree package's optimizers (kohya's ``*ScheduleFree`` names): they need train()/eval() calls."""
    return callable(getattr(optimizer, "train", None)) and "ScheduleFree" in type(optimizer).__name__


def is_d_adaptive(optimizer_type: str) -> bool:
    """Optimizers whose groups carry ``d`` (kohya logs ``lr/d*lr/<group>`` for them)."""
    return optimizer_type.lower().startswith("dadapt") or optimizer_type.lower() == "prodigy"


def lr_scheduler_class(name: str) -> Callable:
    """``--lr_scheduler_type``: a bare name is a ``torch.optim.lr_scheduler`` class, a dotted one any module's."""
    path = name if "." in name else f"torch.optim.lr_scheduler.{name}"
    return _import(path, name, flag="--lr_scheduler_type")


def resolve_steps(value: int | float, total_steps: int) -> int:
    """kohya's int-or-ratio step counts: ``0.1`` is 10% of ``total_steps``."""
    return int(value) if isinstance(value, int) or value >= 1 else int(math.floor(value * total_steps))


def make_lr_scheduler(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``--lr_scheduler`` by transformers' names (diffusers' ``piecewise_constant`` too), or a custom class."""
    warmup = resolve_steps(args.lr_warmup_steps, num_training_steps)
    scheduler_args = parse_optimizer_args(args.lr_scheduler_args, "--lr_scheduler_args")
    if is_schedule_free(optimizer):
        # kohya gives schedule-free optimizers a constant stand-in that only reports the lr.
        if args.lr_scheduler != "constant" or warmup or args.lr_scheduler_type:
            logger.warning(
                "%s schedules itself: --lr_scheduler* and --lr_warmup_steps are ignored", args.optimizer_type
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if args.lr_scheduler_type:
        if warmup:
            raise ConfigError("--lr_scheduler_type does not take --lr_warmup_steps (kohya's rule); set it to 0")
        scheduler_class = lr_scheduler_class(args.lr_scheduler_type)
        try:
            return scheduler_class(optimizer, **scheduler_args)
        except TypeError as err:
            raise ConfigError(f"--lr_scheduler_args do not fit {args.lr_scheduler_type}: {err}") from err
    name = args.lr_scheduler
    if type(optimizer).__name__ == "Adafactor" and optimizer.defaults.get("relative_step"):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=args.learning_rate)
    if name == "piecewise_constant":
        from diffusers.optimization import get_scheduler as diffusers_scheduler

        return diffusers_scheduler(name, optimizer, step_rules=scheduler_args.get("step_rules"))
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    if name not in {s.value for s in SchedulerType}:
        raise ConfigError(f"--lr_scheduler '{name}' is unknown (known: {', '.join(s.value for s in SchedulerType)})")
    schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    # kohya's own dispatch (train_util.get_scheduler_fix): each schedule gets its flags and every one
    # gets --lr_scheduler_args (transformers' get_scheduler drops them for several schedules).
    if name in ("constant", "reduce_lr_on_plateau"):
        return schedule(optimizer, **scheduler_args)
    if name == "constant_with_warmup":
        return schedule(optimizer, num_warmup_steps=warmup, **scheduler_args)
    if name == "inverse_sqrt":
        return schedule(optimizer, num_warmup_steps=warmup, timescale=args.lr_scheduler_timescale, **scheduler_args)
    specific: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        specific["num_cycles"] = args.lr_scheduler_num_cycles
    elif name == "polynomial":
        specific["power"] = args.lr_scheduler_power
    elif name == "cosine_with_min_lr":
        specific.update(num_cycles=args.lr_scheduler_num_cycles / 2, min_lr_rate=args.lr_scheduler_min_lr_ratio or 0.0)
    elif name == "warmup_stable_decay":
        decay = resolve_steps(args.lr_decay_steps, num_training_steps)
        return schedule(
            optimizer,
            num_warmup_steps=warmup,
            num_stable_steps=num_training_steps - warmup - decay,
            num_decay_steps=decay,
            num_cycles=args.lr_scheduler_num_cycles / 2,
            min_lr_ratio=args.lr_scheduler_min_lr_ratio or 0.0,
            **scheduler_args,
        )
    return schedule(
        optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps, **specific, **scheduler_args
    )
