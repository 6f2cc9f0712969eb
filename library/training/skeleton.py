"""The trainer skeleton every training script follows: check, load, place, prepare, run.

``TrainerSkeleton.train`` is the one order of work (train_network.py, distill_unet.py and the
compression stages' Theseus run use it): everything checkable on user input fails before the model
loads or anything is written; then the accelerator and seed, the dataset, latents, the trainer's
own task, the optimizer/schedule/loader through accelerate, and the loop (resumed with --resume).
A trainer fills in only what differs: which models it loads, what it trains and how a step works.
The pieces (``prepare_optimization``, ``start_run``) also serve loops without images (block-wise
FFN training).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import DatasetGroup, build_dataset_group, build_validation_group, make_dataloader
from library.models.stable_diffusion import StableDiffusionModel
from library.training.loop import Cadence, Schedule, TrainingRun
from library.training.memory import return_free_heap
from library.training.model_setup import prepare_latents
from library.training.network_protocol import TrainableNetwork
from library.training.optimizers import make_lr_scheduler, make_optimizer
from library.training.preflight import check_before_model, claim_output
from library.training.sampling import SamplePrompt, load_sample_prompts, make_sampler
from library.training.saving import modelspec_metadata, training_metadata
from library.training.trackers import make_accelerator

logger = logging.getLogger(__name__)


def shared_seed(accelerator: Accelerator, seed: int | None) -> int:
    """The given seed, or one drawn on the main process and shared, so every process plans the same data."""
    if seed is not None:
        return seed
    drawn = [random.SystemRandom().randint(0, 2**31 - 1)]
    broadcast_object_list(drawn)
    return drawn[0]


def print_dataset_preview(group: DatasetGroup, batches: int = 4) -> None:
    """kohya's --debug_dataset, in text: what the first batches of epoch 1 hold."""
    group.set_current_epoch(1)
    for index in range(min(batches, len(group))):
        batch = group[index]
        data = batch["latents"] if "latents" in batch else batch["images"]
        print(f"batch {index}: {tuple(data.shape)} loss weights {batch['loss_weights'].tolist()}")
        for key, caption in zip(batch["image_keys"], batch["captions"]):
            print(f"  {key}: {caption}")


@dataclass
class Prepared:
    """What accelerate hands back for the loop, and the figures the metadata needs."""

    optimizer_name: str
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: object
    validation_loader: object | None
    schedule: Schedule


def prepare_optimization(
    args: argparse.Namespace,
    accelerator: Accelerator,
    param_groups: list[dict],
    loader: torch.utils.data.DataLoader,
    validation_loader: torch.utils.data.DataLoader | None = None,
) -> Prepared:
    """Optimizer, LR schedule and loaders through accelerate, with kohya's step counting."""
    optimizer_name, optimizer = make_optimizer(args, param_groups)
    # Batches each process sees per epoch once accelerate shards the loader (it pads to even).
    schedule = Schedule.from_args(args, math.ceil(len(loader) / accelerator.num_processes))
    # accelerate steps a prepared scheduler once per process per optimizer step (as kohya counts).
    lr_scheduler = make_lr_scheduler(args, optimizer, schedule.max_train_steps * accelerator.num_processes)
    optimizer, loader, lr_scheduler = accelerator.prepare(optimizer, loader, lr_scheduler)
    if validation_loader is not None:
        validation_loader = accelerator.prepare(validation_loader)
    return Prepared(optimizer_name, optimizer, lr_scheduler, loader, validation_loader, schedule)


def start_run(
    args: argparse.Namespace,
    accelerator: Accelerator,
    task,
    prepared: Prepared,
    lr_descriptions: list[str],
    extension: str | None = None,
    default_name: str = "last",
) -> TrainingRun:
    """The loop over ``task`` with kohya's save/sample cadence, resumed from ``--resume`` if given.

    ``extension`` overrides ``--save_model_as`` in checkpoint names ("" names folders).
    """
    cadence = Cadence.from_args(args, default_name=default_name, num_epochs=prepared.schedule.num_epochs)
    if extension is not None:
        cadence = dataclasses.replace(cadence, extension=extension)
    run = TrainingRun(
        accelerator, task, prepared.loader, prepared.optimizer, prepared.lr_scheduler, prepared.schedule, cadence,
        lr_descriptions, max_grad_norm=args.max_grad_norm, seed=args.seed, optimizer_type=args.optimizer_type,
        network_train_unet_only=getattr(args, "network_train_unet_only", False),
    )  # fmt: skip
    if args.resume:
        run.resume(args.resume)
    run.start_at(args.initial_step, args.initial_epoch, args.skip_until_initial_step)  # overrides the resumed step
    return run


def run_metadata(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: StableDiffusionModel,
    network: TrainableNetwork,
    group: DatasetGroup,
    validation: DatasetGroup | None,
    prepared: Prepared,
    started_at: float,
) -> dict[str, str]:
    """kohya's ``ss_*`` and ``modelspec.*`` keys of a network file written by this run."""
    metadata = training_metadata(
        args,
        network_metadata=network.network_metadata(),
        dataset_metadata=group.metadata(
            validation=validation,
            num_processes=accelerator.num_processes,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        ),
        optimizer_name=prepared.optimizer_name,
        base_model_version=model.base_model_version,
        v2=model.v2,
        num_epochs=prepared.schedule.num_epochs,
        num_batches_per_epoch=len(prepared.loader),
        started_at=started_at,
    )
    metadata.update(
        modelspec_metadata(
            args, v2=model.v2, v_parameterization=model.v_parameterization, started_at=started_at, family=model.family
        )
    )
    return metadata


@dataclass
class RunInputs:
    """What one run trains on, handed to the trainer's hooks."""

    accelerator: Accelerator
    model: StableDiffusionModel
    group: DatasetGroup
    validation: DatasetGroup | None
    sample_prompts: list[SamplePrompt] | None
    started_at: float


@dataclass
class TaskPlan:
    """A trainer's task and the parameter groups the optimizer gets (with their log names)."""

    task: object
    param_groups: list[dict]
    lr_descriptions: list[str]


class TrainerSkeleton:
    """``Trainer(args).train()``: the order of work shared by every trainer; subclasses fill the hooks."""

    log_name = "train"  # accelerate's project name for the logs
    checkpoint_extension: str | None = None  # None: --save_model_as
    bucket_reso_multiple = 64  # bucket sides the UNet can halve down to its smallest level (SDXL: 32)
    refuse_zero_steps = True  # --max_train_steps 0 would save an untrained network

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def train(self):
        """Check inputs, load and place models, prepare data and optimizer, run; returns the finished task.

        The output folder is held for the whole run (one run per output name; docs/reliability.md).
        """
        with claim_output(self.args):
            return self._train()

    def _train(self):
        args = self.args
        started_at = time.time()
        self.check_inputs()  # what fails on user input fails before anything loads
        blueprints = build_blueprints(args, self.bucket_reso_multiple)
        check_before_model(args, blueprints, needs_steps=self.refuse_zero_steps)
        sample_prompts = load_sample_prompts(args.sample_prompts) if args.sample_prompts else None
        if sample_prompts:
            make_sampler(args.sample_sampler, False)  # an unknown sampler name fails now, not mid-run
        model = self.load_models()
        return_free_heap()  # what the reads and conversions freed
        accelerator = make_accelerator(args, self.log_name)
        args.seed = shared_seed(accelerator, args.seed)
        set_seed(args.seed)
        tokens = {"max_token_length": args.max_token_length, "seed": args.seed}
        group = build_dataset_group(blueprints, self.tokenizers(model), **tokens)
        if args.debug_dataset:
            print_dataset_preview(group)
            return None
        validation = build_validation_group(blueprints, self.tokenizers(model), **tokens)
        inputs = RunInputs(accelerator, model, group, validation, sample_prompts, started_at)
        self.before_latents(inputs)
        prepare_latents(args, accelerator, model, [group, validation])
        plan = self.build_task(inputs)
        self.release_unneeded(inputs, plan)
        return_free_heap()  # what latent caching and the released models freed
        loader = make_dataloader(group, args.max_data_loader_n_workers, args.persistent_data_loader_workers)
        validation_loader = make_dataloader(validation) if validation is not None else None
        prepared = prepare_optimization(args, accelerator, plan.param_groups, loader, validation_loader)
        group.set_max_train_steps(prepared.schedule.max_train_steps)
        plan.task.validation_loader = prepared.validation_loader
        plan.task.metadata = self.metadata(inputs, prepared)
        run = start_run(args, accelerator, plan.task, prepared, plan.lr_descriptions, self.checkpoint_extension)
        schedule = prepared.schedule
        logger.info(
            "training %d steps (%d epochs x %d batches), %d trainable parameters%s",
            schedule.max_train_steps, schedule.num_epochs, len(prepared.loader),
            sum(p.numel() for p in plan.task.trainable_parameters()), self.describe(plan.task),
        )  # fmt: skip
        run.run()
        return plan.task

    # ---- hooks ---------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """Checks of the trainer's own flags that need no model (the dataset and prompts are checked after)."""

    def load_models(self) -> StableDiffusionModel:
        """The model whose tokenizer, VAE and text encoder the run uses (models stay on the CPU)."""
        raise NotImplementedError

    def tokenizers(self, model) -> list:
        """The tokenizers whose ids batches carry (SDXL: both, as ``input_ids`` and ``input_ids2``)."""
        return [model.tokenizer]

    def before_latents(self, inputs: RunInputs) -> None:
        """Work on the models that must happen before latents are cached (which draws random numbers)."""

    def build_task(self, inputs: RunInputs) -> TaskPlan:
        """Place the models and build the loop's task and its parameter groups."""
        raise NotImplementedError

    def release_unneeded(self, inputs: RunInputs, plan: TaskPlan) -> None:
        """Free the models the task no longer needs (latents and text outputs cached); none by default."""

    def metadata(self, inputs: RunInputs, prepared: Prepared) -> dict[str, str]:
        """The metadata saved files carry (none by default)."""
        return {}

    def describe(self, task) -> str:
        """Extra words for the start-of-run log line."""
        return ""
