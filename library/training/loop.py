"""The accelerate training loop shared by train_network.py and distill_unet.py.

A script builds its models and a :class:`TrainingTask` (what one step computes, what is trained,
how a checkpoint is written); :class:`TrainingRun` owns everything else: epochs, gradient
accumulation, gradient sync across processes, clipping, the LR schedule, the progress bar,
TensorBoard scalars, save/sample cadence with kohya's file names and rotation, and exact resume.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from library.errors import ConfigError
from library.training.divergence import check_finite_weights, loss_is_finite, raise_non_finite_loss
from library.training.optimizers import is_schedule_free
from library.training.preflight import check_room_for_checkpoint
from library.training.saving import model_file_name, rotate, state_dir_name
from library.training.state import load_training_state, save_training_state
from library.training.trackers import LossRecorder, log_sample_images, log_to_trackers, lr_logs

logger = logging.getLogger(__name__)


class TrainingTask(Protocol):
    """What a training script plugs into :class:`TrainingRun`."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def checkpoint_objects(self) -> list[Any]:
        """Objects with state_dict/load_state_dict saved in --save_state folders (besides optimizer/RNG)."""

    def on_epoch_start(self, epoch: int) -> None: ...

    def on_step_start(self, step: int) -> None: ...

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to backpropagate, plus extra scalars to log."""

    def after_optimizer_step(self) -> dict[str, float]: ...

    def save_model(self, path: Path, epoch: int, step: int) -> None: ...

    def sample(self, epoch: int | None, step: int) -> list[tuple[Path, str]] | None:
        """Write sample images; the (file, prompt) pairs go to wandb when it is a tracker."""

    def validate(self) -> dict[str, float]:
        """Validation scalars (empty when there is no validation set); averaged over processes here."""


@dataclass
class Schedule:
    """How many steps and epochs a run takes (kohya's rules)."""

    max_train_steps: int
    num_epochs: int
    updates_per_epoch: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, batches_per_epoch: int) -> Schedule:
        updates = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        if updates == 0:
            raise ConfigError("the dataset yields no batches: check the image folders and --train_batch_size")
        steps = args.max_train_epochs * updates if args.max_train_epochs else args.max_train_steps
        return cls(max_train_steps=steps, num_epochs=math.ceil(steps / updates), updates_per_epoch=updates)


@dataclass
class Cadence:
    """When to save, sample and validate, and under which names (kohya's flags)."""

    output_dir: Path
    output_name: str
    extension: str
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    sample_every_n_epochs: int | None = None
    sample_every_n_steps: int | None = None
    sample_at_first: bool = False
    validate_every_n_epochs: int | None = 1
    validate_every_n_steps: int | None = None

    def checkpoints_to_keep(self, by_step: bool) -> tuple[int | None, int | None]:
        """How many model and state checkpoints rotation keeps, as kohya counts them.

        ``--save_last_n_epochs`` counts checkpoints; ``--save_last_n_steps`` is a span of steps (kohya
        keeps every checkpoint of the last N steps: N // save_every_n_steps + 1 of them). The
        ``*_state`` variants fall back to the model setting when not given.
        """
        if by_step:
            span_models, span_states = self.save_last_n_steps, self.save_last_n_steps_state or self.save_last_n_steps
            every = self.save_every_n_steps or 1
            return tuple(span // every + 1 if span else None for span in (span_models, span_states))
        return self.save_last_n_epochs, self.save_last_n_epochs_state or self.save_last_n_epochs

    @classmethod
    def from_args(cls, args: argparse.Namespace, default_name: str, num_epochs: int) -> Cadence:
        every_n_epochs = args.save_every_n_epochs
        if args.save_n_epoch_ratio:
            every_n_epochs = max(1, num_epochs // args.save_n_epoch_ratio)
        names = [f for f in cls.__dataclass_fields__ if f not in ("output_dir", "output_name", "extension")]
        values = {name: getattr(args, name, None) for name in names}
        values["save_every_n_epochs"] = every_n_epochs
        return cls(
            output_dir=Path(args.output_dir),
            output_name=args.output_name or default_name,
            extension=args.save_model_as,
            **{k: v for k, v in values.items() if v is not None},
        )


_END = object()


def _without_global_rng(batches: Iterable) -> Iterator:
    """The batches, fetched without touching torch's global RNG, so that resumes are exact.

    A DataLoader draws a base seed from the global RNG whenever an iterator starts; an uninterrupted
    run starts it at the epoch start, a resumed one after restoring the RNG (and accelerate starts it
    lazily, at the first batch), so the draw would shift every later noise sample. Batches never
    depend on the global RNG (library/data/dataset_group.py), so the loader gets a forked one.
    """
    with torch.random.fork_rng(devices=[]):
        iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, _END)
        if batch is _END:
            return
        yield batch


class TrainingRun:
    """Runs a :class:`TrainingTask` to ``schedule.max_train_steps`` optimizer steps."""

    def __init__(
        self,
        accelerator: Accelerator,
        task: TrainingTask,
        dataloader: Iterable,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        schedule: Schedule,
        cadence: Cadence,
        lr_descriptions: list[str],
        max_grad_norm: float = 1.0,
        seed: int | None = None,
        optimizer_type: str = "",
        network_train_unet_only: bool = False,
    ):
        self.accelerator = accelerator
        self.task = task
        self.dataloader = dataloader
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.schedule = schedule
        self.cadence = cadence
        self.lr_descriptions = lr_descriptions
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.optimizer_type = optimizer_type
        self.network_train_unet_only = network_train_unet_only
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.loss_recorder = LossRecorder()
        self.last_saved: Path | None = None  # named when a diverged run stops
        accelerator.register_for_checkpointing(*task.checkpoint_objects())

    # ---- resume ---------------------------------------------------------------------------

    def resume(self, state_dir: str) -> None:
        """Restore optimizer, scheduler, RNG, trained weights and counters from a --save_state folder."""
        path = Path(state_dir)
        objects = self.task.checkpoint_objects()
        state = load_training_state(self.accelerator, path, self.optimizer, self.lr_scheduler, objects)
        self._optimizer_mode("train")  # states are saved in eval mode (schedule-free optimizers)
        self.global_step = state["current_step"]
        self.epoch = state["current_epoch"]
        self.step_in_epoch = state.get("batches_in_epoch", 0)
        logger.info("resumed from %s at step %d (epoch %d)", path, self.global_step, self.epoch + 1)

    def start_at(self, initial_step: int | None, initial_epoch: int | None, skip_batches: bool) -> None:
        """kohya's ``--initial_step`` / ``--initial_epoch`` (step wins) and ``--skip_until_initial_step``.

        The counters start there (the LR schedule does not: it starts at 0 unless resumed, as in
        kohya); with ``skip_batches`` the epoch's batches before that step are drawn and discarded,
        so the data is the data an uninterrupted run would see. Unlike kohya, the step counter
        starts at the initial step in both cases (kohya restarts it at 0 without skipping), so
        checkpoint names and logs line up with the run being continued.
        """
        if initial_step is None and initial_epoch is None:
            return
        updates = self.schedule.updates_per_epoch
        step = initial_step if initial_step is not None else (initial_epoch - 1) * updates
        if step < 0 or step >= self.schedule.max_train_steps:
            raise ConfigError(
                f"--initial_step/--initial_epoch start at step {step}, which must be >= 0 and below "
                f"--max_train_steps ({self.schedule.max_train_steps})"
            )
        self.global_step, self.epoch = step, step // updates
        self.step_in_epoch = (step % updates) * self.accelerator.gradient_accumulation_steps if skip_batches else 0
        logger.info("starting at step %d (epoch %d), skipping %d batches", step, self.epoch + 1, self.step_in_epoch)

    def _optimizer_mode(self, mode: str) -> None:
        """Schedule-free optimizers sample, validate and save in eval mode and train in train mode (kohya)."""
        if is_schedule_free(getattr(self.optimizer, "optimizer", self.optimizer)):
            getattr(self.optimizer, mode)()

    def _save_state(self, name: str) -> None:
        path = self.cadence.output_dir / name
        check_finite_weights(self.task.trainable_parameters(), path, self.global_step, self.last_saved)
        counters = {
            "current_epoch": self.epoch,
            "current_step": self.global_step,
            "batches_in_epoch": self.step_in_epoch,
        }
        save_training_state(self.accelerator, path, counters)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        if self.accelerator.is_main_process:
            s = self.cadence
            check_room_for_checkpoint(
                s.output_dir, self.task.trainable_parameters(), s.save_state or s.save_state_on_train_end
            )
        if self.accelerator.num_processes > 1 and self.seed is not None:
            # Same init on every rank (done before this), different noise per rank from here on.
            torch.manual_seed(self.seed + 1_000_003 * self.accelerator.process_index + self.global_step)
        progress = tqdm(
            total=self.schedule.max_train_steps,
            initial=self.global_step,
            desc="steps",
            disable=not self.accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        if self.cadence.sample_at_first and self.global_step == 0:
            self._sample(epoch=None)
        while self.epoch < self.schedule.num_epochs and self.global_step < self.schedule.max_train_steps:
            self._run_epoch(progress)
        progress.close()
        self._finish()

    def _run_epoch(self, progress: tqdm) -> None:
        accelerator = self.accelerator
        self.task.on_epoch_start(self.epoch)
        batches = self.dataloader
        if self.step_in_epoch:
            batches = accelerator.skip_first_batches(self.dataloader, self.step_in_epoch)
        for batch in _without_global_rng(batches):
            with accelerator.accumulate():
                self.task.on_step_start(self.global_step)
                loss, extra = self.task.training_step(batch)
                if not loss_is_finite(loss, accelerator):
                    raise_non_finite_loss(self.global_step + 1, loss.item(), self.last_saved)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    self._sync_and_clip()
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.loss_recorder.add(self.epoch, self.step_in_epoch, loss.item())
            self.step_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            self.global_step += 1
            extra.update(self.task.after_optimizer_step())
            average = self.loss_recorder.moving_average
            progress.update(1)
            progress.set_postfix(avr_loss=f"{average:.4f}")
            self._log_step({"loss/current": loss.item(), "loss/average": average, **extra})
            self._step_checkpoints()
            if self.global_step >= self.schedule.max_train_steps:
                break
        # kohya logs the epoch's running average at the epoch number (1-based), not at a step.
        epoch_number = self.epoch + 1
        log_to_trackers(
            accelerator, {"loss/epoch_average": self.loss_recorder.moving_average}, epoch_number, self.global_step,
            epoch_number,
        )  # fmt: skip
        finished_epoch = self.step_in_epoch >= len(self.dataloader)
        self.epoch += 1 if finished_epoch else 0
        self.step_in_epoch = 0 if finished_epoch else self.step_in_epoch
        if finished_epoch:
            self._epoch_checkpoints()

    def _sync_and_clip(self) -> None:
        params = self.task.trainable_parameters()
        if self.accelerator.num_processes > 1:
            # The network is patched into the UNet rather than wrapped by DDP, so gradients are
            # averaged here: one flat all-reduce, with absent grads as zeros so ranks line up.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            flat = self.accelerator.reduce(flat, reduction="mean")
            for param, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                param.grad = synced
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(params, self.max_grad_norm)

    def _log_step(self, values: dict[str, float]) -> None:
        """Step scalars and kohya's ``lr/*`` ones at the global step."""
        if not self.accelerator.trackers:
            return
        values.update(
            lr_logs(
                self.lr_scheduler.get_last_lr(), self.lr_descriptions, self.optimizer.param_groups,
                self.optimizer_type, self.network_train_unet_only,
            )
        )  # fmt: skip
        log_to_trackers(self.accelerator, values, self.global_step, self.global_step, self.epoch + 1)

    # ---- checkpoints and samples ----------------------------------------------------------

    def _save_model(self, name: str, epoch: int) -> None:
        path = self.cadence.output_dir / name
        self.accelerator.wait_for_everyone()
        self._optimizer_mode("eval")  # the values saved: check those
        check_finite_weights(self.task.trainable_parameters(), path, self.global_step, self.last_saved)
        if self.accelerator.is_main_process:
            self.cadence.output_dir.mkdir(parents=True, exist_ok=True)
            self.task.save_model(path, epoch, self.global_step)
        self.last_saved = path

    def _checkpoint(self, *, epoch: int | None = None, step: int | None = None) -> None:
        """An intermediate save (model, then state), each followed by kohya's rotation of older ones."""
        s = self.cadence
        by_step = step is not None
        self._save_model(model_file_name(s.output_name, s.extension, epoch=epoch, step=step), epoch or self.epoch + 1)
        keep_models, keep_states = s.checkpoints_to_keep(by_step)
        if self.accelerator.is_main_process:
            rotate(s.output_dir, s.output_name, keep_models, by_step=by_step, state=False, extension=s.extension)
        if s.save_state:
            self._save_state(state_dir_name(s.output_name, epoch=epoch, step=step))
            if self.accelerator.is_main_process:
                rotate(s.output_dir, s.output_name, keep_states, by_step=by_step, state=True)
        self._optimizer_mode("train")

    def _step_checkpoints(self) -> None:
        s, step = self.cadence, self.global_step
        if s.save_every_n_steps and step % s.save_every_n_steps == 0 and step < self.schedule.max_train_steps:
            self._checkpoint(step=step)
        if s.sample_every_n_steps and step % s.sample_every_n_steps == 0:
            self._sample(epoch=None)
        if s.validate_every_n_steps and step % s.validate_every_n_steps == 0:
            self._validate("step")

    def _epoch_checkpoints(self) -> None:
        s, epoch = self.cadence, self.epoch
        last = epoch >= self.schedule.num_epochs or self.global_step >= self.schedule.max_train_steps
        if s.save_every_n_epochs and epoch % s.save_every_n_epochs == 0 and not last:
            self._checkpoint(epoch=epoch)
        if s.sample_every_n_epochs and epoch % s.sample_every_n_epochs == 0:
            self._sample(epoch=epoch)
        if s.validate_every_n_epochs and epoch % s.validate_every_n_epochs == 0:
            self._validate("epoch")

    def _validate(self, when: str) -> None:
        self._optimizer_mode("eval")
        values = self.task.validate()
        self._optimizer_mode("train")
        if not values:
            return
        averaged = {}
        for name, value in values.items():
            tensor = torch.tensor(value, device=self.accelerator.device)
            average = self.accelerator.reduce(tensor, reduction="mean").item()
            averaged[f"{name}/{when}_average"] = average
            averaged[f"{name}/{when}_divergence"] = average - self.loss_recorder.moving_average
        logger.info("validation at step %d: %s", self.global_step, averaged)
        # kohya: step validation at the global step, epoch validation at the epoch number
        x = self.global_step if when == "step" else self.epoch
        log_to_trackers(self.accelerator, averaged, x, self.global_step, self.epoch + (when == "step"))

    def _sample(self, epoch: int | None) -> None:
        self.accelerator.wait_for_everyone()
        self._optimizer_mode("eval")
        if self.accelerator.is_main_process:
            log_sample_images(self.accelerator, self.task.sample(epoch, self.global_step) or [])
        self._optimizer_mode("train")
        self.accelerator.wait_for_everyone()

    def _check_processes_agree(self) -> None:
        """Every process must end with the same trained weights; a divergence is a bug worth stopping for."""
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.task.trainable_parameters()])
        digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        digests = gather_object([digest])
        if len(set(digests)) != 1:
            raise RuntimeError(f"trained weights differ between processes: {digests}")
        logger.info("trained weights identical on %d processes (sha256 %s)", len(digests), digest[:16])

    def _finish(self) -> None:
        s = self.cadence
        if self.accelerator.num_processes > 1:
            self._check_processes_agree()
        self._save_model(model_file_name(s.output_name, s.extension), self.epoch)
        if s.save_state or s.save_state_on_train_end:
            self._save_state(state_dir_name(s.output_name))
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
