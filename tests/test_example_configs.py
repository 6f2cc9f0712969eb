"""The accelerate config shipped under examples/ parses with accelerate's own loader."""

from pathlib import Path

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]


def test_the_sdxl_student_accelerate_config_is_a_multi_gpu_bf16_config():
    config = load_config_from_file(str(REPO / "examples" / "accelerate_sdxl_student.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_processes == 8 and config.num_machines == 1
    assert str(config.mixed_precision) == "bf16" and not config.use_cpu
    assert not config.fsdp_config and not config.deepspeed_config
