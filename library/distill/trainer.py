"""``distill_unet.py``: build the teacher, the student (or a network on the loaded UNet), data and
optimizer, then hand a :class:`DistillTask` to the shared loop.

Everything that can fail on user input (flags, models, the student config against the teacher's
blocks, the network module, the dataset) fails before the first byte is written to --output_dir.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

from library.data.buckets import SDXL_BUCKET_RESO_STEPS_MULTIPLE
from library.data.latent_cache import SDXL_NPZ_SUFFIX
from library.distill.args import DEFAULT_THESEUS_SCHEDULE, output_format, verify_distill_args
from library.distill.block_map import weight_map
from library.distill.features import feature_pairs
from library.distill.hybrid import TheseusUNet
from library.distill.loss import DistillWeights
from library.distill.sdxl_distill import check_sdxl_distill_args
from library.distill.students import build_student, student_config
from library.distill.task import DistillTask
from library.distill.teacher import FrozenTeacher
from library.errors import ConfigError
from library.models.sdxl import SDXLModel, is_sdxl_model_path
from library.models.stable_diffusion import StableDiffusionModel
from library.training.model_setup import (
    SAVE_DTYPES,
    enable_xformers,
    load_training_model,
    place_frozen,
    trained_dtype,
    weight_dtype,
)
from library.training.network_protocol import TrainableNetwork
from library.training.networks import create_network, import_network_module, load_network_weights
from library.training.noise import NoiseOptions
from library.training.sdxl_trainer import load_sdxl_training_model
from library.training.skeleton import Prepared, RunInputs, TaskPlan, TrainerSkeleton, run_metadata
from library.training.theseus import TheseusController, parse_replacement_schedule

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Models:
    """The loaded model (its ``unet`` replaced by the student), the teacher UNet, and the network if any."""

    model: StableDiffusionModel | SDXLModel
    teacher: UNet2DConditionModel
    network: TrainableNetwork | None = None


class DistillTrainer(TrainerSkeleton):
    """``DistillTrainer(args).train()``, as kohya's trainers; returns the finished task (None for --debug_dataset)."""

    log_name = "distill_unet"
    refuse_zero_steps = False  # zero steps exports the initialised student

    def __init__(self, args: argparse.Namespace):
        self.sdxl = bool(args.pretrained_model_name_or_path) and is_sdxl_model_path(args.pretrained_model_name_or_path)
        verify_distill_args(args, self.sdxl)
        check_sdxl_distill_args(args, self.sdxl)  # a student or flag of the other family fails before loading
        if self.sdxl:
            self.bucket_reso_multiple = SDXL_BUCKET_RESO_STEPS_MULTIPLE
        super().__init__(args)
        self.output = output_format(args.save_model_as, network=bool(args.network_module))
        self.checkpoint_extension = self.output.extension
        self.module = None

    def check_inputs(self) -> None:
        if self.args.network_module:
            self.module = import_network_module(self.args.network_module)

    def load_models(self) -> StableDiffusionModel:
        self.models = self._load_models()  # builds the student: a config the teacher cannot serve fails here
        return self.models.model

    def tokenizers(self, model) -> list:
        return [model.tokenizer, model.tokenizer_2] if self.sdxl else [model.tokenizer]

    def before_latents(self, inputs: RunInputs) -> None:
        if self.sdxl:
            for group in (inputs.group, inputs.validation):
                if group is not None:
                    group.latent_cache_suffix = SDXL_NPZ_SUFFIX
        if self.module is not None:
            self.models.network = self._apply_network(self.module, self.models.model)

    def build_task(self, inputs: RunInputs) -> TaskPlan:
        task = self._task(inputs.accelerator, self.models, inputs.group, inputs.sample_prompts)
        return TaskPlan(task, *self._param_groups(task, self.models.network))

    def metadata(self, inputs: RunInputs, prepared: Prepared) -> dict[str, str]:
        if self.models.network is None:
            return {}
        return self._network_metadata(inputs, prepared)

    def describe(self, task: DistillTask) -> str:
        theseus = f", {len(task.theseus.units)} Theseus units" if task.theseus else ""
        return f", {len(task.pairs)} feature pairs{theseus}"

    def _task(self, accelerator: Accelerator, models: Models, group, sample_prompts) -> DistillTask:
        args = self.args
        teacher, pairs = self._place_models(accelerator, models)
        net, controller = self._theseus(teacher, models.model.unet)
        weights = DistillWeights(
            args.task_loss_weight, args.output_kd_weight, args.feature_kd_weight, args.feature_kd_normalize
        )
        return DistillTask(
            args, accelerator, models.model, teacher, net, pairs, weights, NoiseOptions.from_args(args),
            self.output, group, network=models.network, theseus=controller, sample_prompts=sample_prompts,
        )  # fmt: skip

    # ---- models ----------------------------------------------------------------------------

    def _load_models(self) -> Models:
        """The loaded model with the student as its UNet, and the teacher UNet (float32 until placed)."""
        args = self.args
        model = self._load(args.pretrained_model_name_or_path)
        teacher = model.unet if not args.teacher else self._load_teacher(model)
        try:
            student = self._student(model.unet, teacher)
            weight_map(student, teacher)  # the feature pairs and Theseus stages need the teacher's blocks
        except ConfigError as err:
            raise ConfigError(f"{self._student_flags()}: {err}") from err
        model.unet = student
        return Models(model, teacher)

    def _student(self, loaded: UNet2DConditionModel, teacher: UNet2DConditionModel) -> UNet2DConditionModel:
        args = self.args
        if args.network_module:
            # The network is applied to a copy, so that the teacher stays the original.
            return copy.deepcopy(loaded) if teacher is loaded else loaded
        if args.student or args.student_config:
            config = student_config(loaded.config, args.student, args.student_config)
            student, report = build_student(loaded, config, dtype=torch.float32)
            logger.info(report.summary())
            return student
        return loaded  # --teacher given: the loaded model is the student

    def _student_flags(self) -> str:
        """The flags that chose the student, for error messages."""
        args = self.args
        flags = [f"--{name} {getattr(args, name)}" for name in ("student", "student_config") if getattr(args, name)]
        return " ".join(flags) or f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}"

    def _load(self, path: str):
        return load_sdxl_training_model(self.args, path) if self.sdxl else load_training_model(self.args, path)

    def _load_teacher(self, model: StableDiffusionModel) -> UNet2DConditionModel:
        """The UNet of --teacher, which must read the loaded text encoder and predict the same target."""
        other = self._load(self.args.teacher)

        def kind(m) -> str:
            family = "SDXL" if isinstance(m, SDXLModel) else f"SD{'2' if m.v2 else '1'}"
            return f"{family} {'v-prediction' if m.v_parameterization else 'epsilon-prediction'}"

        if (
            kind(other) != kind(model)
            or other.unet.config.cross_attention_dim != model.unet.config.cross_attention_dim
        ):
            raise ConfigError(
                f"--teacher '{self.args.teacher}' is {kind(other)} but the loaded model is {kind(model)}; "
                "teacher and student share the text encoder and must predict the same target"
            )
        return other.unet

    def _apply_network(self, module, model: StableDiffusionModel) -> TrainableNetwork:
        """kohya's network on the student UNet only (the text encoder is shared with the teacher)."""
        network = create_network(self.args, module, model)
        network.apply_to(model.text_encoder, model.unet, apply_text_encoder=False, apply_unet=True)
        load_network_weights(self.args, network)
        return network

    def _place_models(self, accelerator: Accelerator, models: Models) -> tuple[FrozenTeacher, list]:
        """Student (and network) trainable on the device, teacher frozen there in --teacher_dtype.

        Frozen weights go in the mixed-precision dtype, as kohya's trainers do; the trained weights
        stay float32 unless --full_fp16/--full_bf16.
        """
        args = self.args
        device = accelerator.device
        model, student = models.model, models.model.unet
        pairs = feature_pairs(student, models.teacher) if args.feature_kd_weight else []
        teacher_dtype = SAVE_DTYPES[args.teacher_dtype] or weight_dtype(args)
        teacher_unet = models.teacher.to(device, dtype=teacher_dtype)
        teacher = FrozenTeacher(teacher_unet, [pair.teacher for pair in pairs], dtype=teacher_dtype)
        place_frozen(args, device, *self.text_encoders_of(model))
        if models.network is None:
            student.to(device, dtype=trained_dtype(args)).requires_grad_(True)
        else:
            place_frozen(args, device, student)
            student.requires_grad_(False)
            models.network.to(device, dtype=trained_dtype(args))
            models.network.prepare_grad_etc(model.text_encoder, student)
        if args.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if args.xformers:
            enable_xformers(student, teacher.unet)
        return teacher, pairs

    def text_encoders_of(self, model) -> list[torch.nn.Module]:
        """The frozen text encoders the step runs (SDXL: both)."""
        return [model.text_encoder, model.text_encoder_2] if self.sdxl else [model.text_encoder]

    def _theseus(self, teacher: FrozenTeacher, student: UNet2DConditionModel):
        """The network the step runs (student, or Theseus hybrid) and the replacement controller."""
        args = self.args
        if not args.theseus:
            return student, None
        hybrid = TheseusUNet(teacher.unet, student)
        schedule = parse_replacement_schedule(args.theseus_schedule or DEFAULT_THESEUS_SCHEDULE)
        return hybrid, TheseusController(hybrid.units, schedule, seed=args.seed)

    # ---- optimizer and metadata --------------------------------------------------------------

    def _param_groups(self, task: DistillTask, network: TrainableNetwork | None) -> tuple[list[dict], list[str]]:
        args = self.args
        if network is not None:
            return network.prepare_optimizer_params(None, args.unet_lr, args.learning_rate)
        return [{"params": task.trainable_parameters(), "lr": args.learning_rate}], ["unet"]

    def _network_metadata(self, inputs: RunInputs, prepared: Prepared) -> dict[str, str]:
        """kohya's ss_* keys of the network file, plus how it was distilled."""
        args = self.args
        metadata = run_metadata(
            args, inputs.accelerator, inputs.model, self.models.network, inputs.group, inputs.validation, prepared,
            inputs.started_at,
        )  # fmt: skip
        if not args.no_metadata:
            metadata.update(
                {
                    "ss_distill_teacher": str(args.teacher or args.pretrained_model_name_or_path),
                    "ss_distill_task_loss_weight": str(args.task_loss_weight),
                    "ss_distill_output_kd_weight": str(args.output_kd_weight),
                    "ss_distill_feature_kd_weight": str(args.feature_kd_weight),
                    "ss_distill_feature_kd_normalize": str(args.feature_kd_normalize),
                    "ss_distill_theseus_schedule": str(args.theseus_schedule if args.theseus else None),
                    "ss_distill_ema_decay": str(args.ema_decay if args.use_ema else None),
                }
            )
        return metadata
