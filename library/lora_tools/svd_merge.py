"""``svd_merge_lora.py``: LoRAs merged exactly, then truncated to a rank by the exact factored SVD.

kohya's script sums the dense updates in float32, runs a full SVD per module and clamps the kept
factors at their 0.99 quantile. Here the merge is the exact concatenation of factors
(``lora_merge.exact_merge``) and the truncation is ``resize``'s factored SVD in float64 (the best
rank-k approximation of the exact sum, no dense matrix, no clamping), with kohya's rank caps
(``--new_conv_rank`` for 3x3 convs only, as in kohya's ``svd_merge_lora.py``) and, beyond kohya,
``resize_lora.py``'s dynamic methods.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import torch

from library.errors import ConfigError
from library.lora_tools.lora_merge import exact_merge, merged_metadata, merged_state_dict
from library.lora_tools.lora_sets import read_loras
from library.lora_tools.merge_files import check_save_to
from library.resize.files import OUTPUT_SUFFIXES, save_dtype
from library.resize.rank_reduction import ResizeRequest, ResizeResult, resize_state_dict
from library.resize.report import module_table, summary
from networks.lora_file import save_lora_file

logger = logging.getLogger(__name__)


def svd_merge_metadata(base: dict[str, str], request: ResizeRequest) -> dict[str, str]:
    """kohya's minimum metadata: dim and alpha are the new rank, ``conv_dim``/``conv_alpha`` in network args."""
    dim = "Dynamic" if request.dynamic_method else str(request.new_rank)
    conv = {"conv_dim": request.conv_rank, "conv_alpha": request.conv_rank}
    method = f" ({request.dynamic_method} {request.dynamic_param:g})" if request.dynamic_method else ""
    return base | {
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_network_args": json.dumps(conv),
        "ss_training_comment": f"SVD {base['ss_training_comment']}{method}",
    }


def svd_merge_files(
    models: list[str],
    ratios: list[float] | None,
    save_to: str | None,
    request: ResizeRequest,
    save_precision: str | None = None,
    device: str | None = None,
    verbose: bool = False,
) -> ResizeResult:
    """Merge ``models`` exactly, truncate each module to kohya's rank, write ``save_to`` and print the summary."""
    target = check_save_to(save_to, models)
    if target.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--save_to '{target}' must end in .safetensors, .ckpt, .pt or .pth")
    dtype = save_dtype(save_precision)
    inputs, ratios = read_loras(models, ratios)
    modules = exact_merge(inputs, ratios)
    request = replace(request, conv_rank_3x3_only=True)
    merged = merged_state_dict(modules, torch.float64)
    result = resize_state_dict(merged, request, "the merged LoRA", device or "cpu", dtype)
    metadata = svd_merge_metadata(merged_metadata(inputs, ratios, modules), request)
    save_lora_file(target, result.state_dict, metadata)
    if verbose:
        print(module_table(result.modules))
    print(summary(result.modules, target.stat().st_size))
    logger.info("saved '%s'", target)
    return result
