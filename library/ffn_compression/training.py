"""Training narrow FFNs: block-wise on cached FFN inputs, then Theseus replacement inside the UNet.

* Block-wise (the article's first stage): each narrow FFN learns to reproduce its original on the
  calibration's cached input tokens. The loss is the mean over FFNs of their MSE divided by the
  mean square of the original output, so FFNs of different scales weigh alike. It runs in the
  shared loop (:class:`library.training.loop.TrainingRun`: saving cadence, logging, exact resume) and
  validates with each FFN's held-out relative error.
* Theseus: train_network.py's step, with a :class:`library.training.theseus.TheseusController` that draws
  before every step which FFNs run narrow (each with probability p(t)); the others run the frozen
  original, through which gradients still reach the narrow FFNs before them. Once p reaches 1 the
  remaining steps fine-tune end to end (BERT-of-Theseus' successor fine-tuning).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from library.errors import ConfigError
from library.ffn_compression.calibration import Calibration, relative_errors
from library.training.network_trainer import NetworkTask, NetworkTrainer
from library.training.saving import per_save_metadata
from library.training.skeleton import prepare_optimization, start_run
from library.training.theseus import ReplacementState, TheseusController, parse_replacement_schedule
from library.training.trackers import make_accelerator
from networks.base import block_index
from networks.lowrank_ffn import LowRankFFNNetwork, NarrowFFNModule, block_name, ffn_layers

DEFAULT_OPTIMIZER = "Adafactor"  # the article's choice: no learning rate to tune per block


def short_names(modules: list[NarrowFFNModule]) -> dict[str, str]:
    """kohya block names (``IN07``) for logging, or the module names where a block holds several FFNs."""
    blocks = {m.lora_name: block_name(block_index(m.lora_name)) for m in modules}
    unique = len(set(blocks.values())) == len(blocks)
    return blocks if unique else {name: name for name in blocks}


@torch.no_grad()
def original_outputs(network: LowRankFFNNetwork, inputs: dict[str, torch.Tensor], chunk: int = 8192) -> dict:
    """Each original FFN's outputs on its cached inputs (the block-wise targets), on the CPU."""
    outputs = {}
    for module in network.ffn_modules:
        weight = ffn_layers(module.lora_name, module.original)[0].weight  # the original's device and dtype
        pieces = [module.reference(x.to(weight)).float().cpu() for x in inputs[module.lora_name].split(chunk)]
        outputs[module.lora_name] = torch.cat(pieces)
    return outputs


class TokenBatches(Dataset):
    """Item i: for every FFN, tokens [i*b, (i+1)*b) of a fixed shuffle of its (input, target) pairs, wrapping."""

    def __init__(self, inputs: dict, targets: dict, batch_tokens: int, seed: int = 0):
        if batch_tokens < 1:
            raise ConfigError(f"--token_batch_size must be >= 1, got {batch_tokens}")
        empty = [name for name, x in inputs.items() if not len(x)]
        if empty:
            raise ConfigError(f"the calibration holds no fit tokens for {empty[0]}")
        generator = torch.Generator().manual_seed(seed)
        self.inputs, self.targets, self.batch_tokens = inputs, targets, batch_tokens
        self.order = {name: torch.randperm(len(x), generator=generator) for name, x in inputs.items()}
        self.length = max(math.ceil(len(x) / batch_tokens) for x in inputs.values())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        batch = {}
        for name, order in self.order.items():
            positions = (torch.arange(self.batch_tokens) + index * self.batch_tokens) % len(order)
            picked = order[positions]
            batch[name] = (self.inputs[name][picked], self.targets[name][picked])
        return batch


@dataclass
class BlockwiseTask:
    """The :class:`library.training.loop.TrainingTask` of block-wise training."""

    network: LowRankFFNNetwork
    heldout: dict[str, torch.Tensor]
    energy: dict[str, float]  # mean square of each original FFN's output on its fit tokens
    metadata: dict[str, str]
    save_dtype: torch.dtype | None = None
    names: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = short_names(self.network.ffn_modules)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.network.get_trainable_params())

    def checkpoint_objects(self) -> list:
        return [self.network]

    def on_epoch_start(self, epoch: int) -> None:
        self.network.train()

    def on_step_start(self, step: int) -> None:
        pass

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        losses = {}
        for module in self.network.ffn_modules:
            inputs, targets = batch[module.lora_name]
            losses[module.lora_name] = F.mse_loss(module.narrow(inputs), targets) / self.energy[module.lora_name]
        detached = torch.stack(list(losses.values())).detach().tolist()  # one host sync for all
        extra = {f"blockwise/{self.names[name]}": value for name, value in zip(losses, detached)}
        return torch.stack(list(losses.values())).mean(), extra

    def after_optimizer_step(self) -> dict[str, float]:
        return {}

    def save_model(self, path, epoch: int, step: int) -> None:
        self.network.save_weights(str(path), self.save_dtype, {**self.metadata, **per_save_metadata(epoch, step)})

    def sample(self, epoch: int | None, step: int) -> None:
        pass

    def validate(self) -> dict[str, float]:
        errors = relative_errors(self.network, self.heldout)
        return {f"heldout_error/{self.names[name]}": error for name, error in errors.items()}


def train_blockwise(
    args: argparse.Namespace,
    unet: torch.nn.Module,
    network: LowRankFFNNetwork,
    calibration: Calibration,
    metadata: dict[str, str],
    save_dtype: torch.dtype | None = None,
) -> None:
    """Train every narrow FFN of ``network`` (built on ``unet``) on ``calibration``'s tokens, with kohya's flags."""
    missing = [m.lora_name for m in network.ffn_modules if m.lora_name not in calibration.fit]
    if missing:
        raise ConfigError(f"the calibration holds no tokens for {missing[0]}: calibrate with the same blocks")
    accelerator = make_accelerator(args, "lowrank_ffn_blockwise")
    unet.to(accelerator.device)
    network.to(accelerator.device, torch.float32)
    targets = original_outputs(network, calibration.fit)
    energy = {name: y.double().square().mean().item() or 1.0 for name, y in targets.items()}
    inputs = {m.lora_name: calibration.fit[m.lora_name] for m in network.ffn_modules}
    batches = TokenBatches(inputs, targets, args.token_batch_size, args.seed or 0)
    loader = DataLoader(batches, batch_size=None, shuffle=True)
    network.requires_grad_(True)
    param_groups = [{"params": list(network.get_trainable_params()), "lr": args.learning_rate}]
    prepared = prepare_optimization(args, accelerator, param_groups, loader)
    task = BlockwiseTask(network, calibration.heldout, energy, metadata, save_dtype)
    run = start_run(args, accelerator, task, prepared, ["blockwise"], default_name="blockwise")
    run.run()


@dataclass
class TheseusNetworkTask(NetworkTask):
    """train_network.py's step with Theseus replacement of the network's replaceable modules."""

    controller: TheseusController = field(init=False)

    def __post_init__(self) -> None:
        units = [m for m in getattr(self.network, "adapters", []) if hasattr(m, "use_successor")]
        if not units:
            raise ConfigError(f"--theseus_schedule: {self.args.network_module} has no replaceable modules")
        schedule = parse_replacement_schedule(self.args.theseus_schedule)
        self.controller = TheseusController(units, schedule, seed=self.args.seed)

    def on_step_start(self, step: int) -> None:
        super().on_step_start(step)
        self.controller.step(step)

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, extra = super().training_step(batch)
        state: ReplacementState = self.controller.last_state
        if not loss.requires_grad:
            # The draw replaced no unit, so no trainable weight ran: a step without gradients (the
            # optimizer skips parameters without one), logged like any other.
            loss = loss.detach().requires_grad_()
        return loss, {**extra, "theseus/probability": state.probability, "theseus/replaced": state.rate}

    def validate(self) -> dict[str, float]:
        """The student's validation loss: every unit replaced, whatever this step drew."""
        drawn = [unit.use_successor for unit in self.controller.units]
        for unit in self.controller.units:
            unit.use_successor = True
        try:
            return super().validate()
        finally:
            for unit, use_successor in zip(self.controller.units, drawn):
                unit.use_successor = use_successor


class TheseusNetworkTrainer(NetworkTrainer):
    """train_network.py with ``--theseus_schedule`` replacement of narrow FFNs."""

    task_class = TheseusNetworkTask
