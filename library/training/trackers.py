"""The accelerator, its trackers (TensorBoard, wandb) and what is logged to them, as kohya does it.

Scalar names and x-axes are kohya's train_network.py ones (docs/training.md lists them): step
scalars at the global step, ``loss/epoch_average`` and epoch validation at the epoch number;
wandb gets the same values with ``global_step``/``epoch`` fields instead of a step.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from pathlib import Path
from typing import Any

import toml
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DynamoBackend, ProjectConfiguration

from library.errors import ConfigError


def make_accelerator(args: argparse.Namespace, tracker_name: str) -> Accelerator:
    """Accelerator with kohya's logging layout ``logging_dir/<log_prefix><YYYYmmddHHMMSS>`` and trackers.

    ``--torch_compile`` selects accelerate's dynamo backend (``--dynamo_backend``); without it the
    backend is "no" whatever ``accelerate launch --dynamo_backend`` said, as in kohya.
    """
    log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
    if log_with in ("tensorboard", "all") and not args.logging_dir:
        raise ConfigError(f"--log_with {log_with} needs --logging_dir")
    project = None
    if args.logging_dir and log_with:
        stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        project = ProjectConfiguration(project_dir=str(Path(args.logging_dir) / f"{args.log_prefix or ''}{stamp}"))
    if log_with in ("wandb", "all"):
        _prepare_wandb(args, project)
    handlers = (
        [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout))] if args.ddp_timeout else []
    )
    accelerator = Accelerator(
        cpu=_distributed_without_gpu(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=project,
        kwargs_handlers=handlers,
        dynamo_backend=args.dynamo_backend.upper() if args.torch_compile else "NO",
        rng_types=[],  # each process manages its own RNG; see TrainingRun.run
    )
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress logs, not one per process
    if log_with:
        init_trackers(accelerator, args, tracker_name)
    return accelerator


def _prepare_wandb(args: argparse.Namespace, project: ProjectConfiguration | None) -> None:
    """kohya's wandb set-up: runs under the logging folder, optional login with ``--wandb_api_key``."""
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(f"--log_with {args.log_with} needs the wandb package (pip install wandb)") from err
    if project is not None:
        Path(project.project_dir).mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = project.project_dir
    if args.wandb_api_key:
        wandb.login(key=args.wandb_api_key)


# Never sent to a tracker by --log_config (kohya's list).
_SECRET_ARGS = ("wandb_api_key", "huggingface_token")


def init_trackers(accelerator: Accelerator, args: argparse.Namespace, default_name: str) -> None:
    """kohya's ``init_trackers``: project name, ``--wandb_run_name``, ``--log_tracker_config``, ``--log_config``."""
    init_kwargs: dict[str, Any] = {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}
    if args.log_tracker_config:
        init_kwargs = toml.load(args.log_tracker_config)  # kohya: the file replaces the run name
    config = {k: str(v) for k, v in vars(args).items() if k not in _SECRET_ARGS} if args.log_config else {}
    accelerator.init_trackers(args.log_tracker_name or default_name, config=config, init_kwargs=init_kwargs)
    if accelerator.is_main_process and any(t.name == "wandb" for t in accelerator.trackers):
        run = accelerator.get_tracker("wandb", unwrap=True)
        for hidden_axis in ("epoch", "val_step", "global_step"):
            run.define_metric(hidden_axis, hidden=True)


def compile_for_training(accelerator: Accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` compiled with accelerate's dynamo settings (``--torch_compile``), or as it is.

    The network is patched into the UNet rather than passed to ``accelerator.prepare``, so the
    compilation accelerate's prepare would do is done here, with the same plugin settings.
    """
    plugin = accelerator.state.dynamo_plugin
    if plugin.backend == DynamoBackend.NO:
        return module
    return torch.compile(module, **plugin.to_kwargs())


def _distributed_without_gpu() -> bool:
    """Several processes but no GPU (``accelerate launch --multi_gpu`` or ``torchrun`` on a CPU machine).

    accelerate only forms a CPU process group (gloo) when told to run on the CPU; otherwise every
    process would train alone and all of them would write the same outputs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.cuda.is_available() and not torch.backends.mps.is_available()


class LossRecorder:
    """kohya's running loss: the mean of the last epoch's worth of batch losses (in epoch 1, all so far)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.total = 0.0

    def add(self, epoch: int, batch_index: int, loss: float) -> None:
        if epoch == 0:
            self.losses.append(loss)
        else:
            while len(self.losses) <= batch_index:
                self.losses.append(0.0)
            self.total -= self.losses[batch_index]
            self.losses[batch_index] = loss
        self.total += loss

    @property
    def moving_average(self) -> float:
        return self.total / len(self.losses) if self.losses else 0.0


def lr_logs(
    learning_rates: list[float],
    descriptions: list[str] | None,
    param_groups: list[dict],
    optimizer_type: str,
    network_train_unet_only: bool,
) -> dict[str, float]:
    """kohya's ``lr/*`` scalars (``generate_step_logs``), quirk included.

    kohya's loop over the groups has an ``else:`` that always runs, so besides ``lr/<description>``
    it also writes ``lr/textencoder`` for group 0 (unless --network_train_unet_only) and
    ``lr/group<i>`` for the others; DAdaptation and Prodigy add ``lr/d*lr/<name>`` (their d times lr).
    """
    d_adaptive = optimizer_type.lower().startswith("dadapt") or optimizer_type.lower() == "prodigy"
    logs: dict[str, float] = {}

    def add(name: str, index: int) -> None:
        logs[f"lr/{name}"] = float(learning_rates[index])
        if d_adaptive:
            logs[f"lr/d*lr/{name}"] = param_groups[index]["d"] * param_groups[index]["lr"]

    for index in range(len(learning_rates)):
        if descriptions is not None and index < len(descriptions):
            add(descriptions[index], index)
        else:  # kohya's names when the network gives none
            group = index - (0 if network_train_unet_only else 1)
            add("textencoder" if group == -1 else (f"group{group}" if len(learning_rates) > 2 else "unet"), index)
    first = 0
    if not network_train_unet_only:
        logs["lr/textencoder"] = float(learning_rates[0])
        first = 1
    for index in range(first, len(learning_rates)):
        add(f"group{index}", index)
    return logs


def log_to_trackers(accelerator: Accelerator, values: dict[str, float], x: int, global_step: int, epoch: int) -> None:
    """kohya's ``accelerator_logging``: TensorBoard (and other trackers) at ``x``; wandb with axis fields."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({**values, "global_step": global_step, "epoch": epoch})
        else:
            tracker.log(values, step=x)


def log_sample_images(accelerator: Accelerator, samples: list[tuple[Path, str]]) -> None:
    """Sample images to wandb as kohya sends them (``sample_<i>``, the prompt as caption, not committed)."""
    if not any(t.name == "wandb" for t in accelerator.trackers):
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    for index, (image, prompt) in enumerate(samples):
        run.log({f"sample_{index}": wandb.Image(str(image), caption=prompt)}, commit=False)
