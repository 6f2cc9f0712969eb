"""Segmind's SDXL students (SSD-1B, Segmind-Vega; arXiv 2401.02677) built from an SDXL teacher's config.

Segmind compressed SDXL by removing transformer layers inside the attention blocks and the mid
block's attention and second resnet; channels, stages and resnets stay. The released UNets
(``segmind/SSD-1B`` and ``segmind/Segmind-Vega``, ``unet/config.json``) keep, per attention block,
this many of SDXL's transformer layers (SDXL: down 2, 2 | 10, 10; up 10, 10, 10 | 2, 2, 2)::

    SSD-1B   down  2, 2 |  4, 4     up   4, 4, 10 |  2, 1, 1     mid: one resnet
    Vega     down  1, 1 |  2, 2     up   2, 2, 2  |  1, 1, 1     mid: one resnet

(ComfyUI's ``model_detection.py`` lists the same depths for the released files: ``transformer_depth``
``[0, 0, 2, 2, 4, 4]``/``[0, 0, 1, 1, 2, 2]``, ``transformer_depth_output`` ``[0, 0, 0, 1, 1, 2, 10, 4, 4]``/
``[0, 0, 0, 1, 1, 1, 2, 2, 2]`` and a resnet-only middle block.) On the SDXL base teacher the presets
give exactly the released UNets' parameter counts (see ``PUBLISHED_PARAMETERS``).

A teacher with other depths (a tiny SDXL-shaped test model) keeps the same *fraction* of each
block's layers, at least one; on SDXL's own depths that fraction is the table above. Each kept
layer is the teacher's layer of the same index (the first ones), so ``block_map`` copies the
student from the teacher by name, as for BK-SDM, and the feature-KD pairs are the kept blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from library.errors import ConfigError

SDXL_STUDENTS = ("ssd_1b", "vega")

# SDXL base 1.0's transformer layers per attention block, and each student's (released configs).
_SDXL_DOWN = ((), (2, 2), (10, 10))
_SDXL_UP = ((10, 10, 10), (2, 2, 2), ())
_DEPTHS = {
    "ssd_1b": {"down": ((), (2, 2), (4, 4)), "up": ((4, 4, 10), (2, 1, 1), ())},
    "vega": {"down": ((), (1, 1), (2, 2)), "up": ((2, 2, 2), (1, 1, 1), ())},
}

# Parameters of the released UNets (segmind/SSD-1B, segmind/Segmind-Vega) as diffusers builds them from
# the depths above on SDXL base's channels; the paper rounds them to 1.3B and 0.74B, Segmind's Vega
# write-up gives 247M down / 31M mid / 460M up. SDXL base 1.0's UNet has 2,567,463,684.
PUBLISHED_PARAMETERS = {"ssd_1b": 1_331_334_404, "vega": 745_225_604}


def is_sdxl_shaped(config: Mapping) -> bool:
    """SDXL's layout: pooled-text/size conditioning, three stages, no attention in the first."""
    return (
        config.get("addition_embed_type") == "text_time"
        and len(config.get("block_out_channels", ())) == 3
        and tuple(config.get("down_block_types", ()))
        == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    )


def _per_layer(value, stages: int, layers: Sequence[int]) -> list[list[int]]:
    """A config's ``transformer_layers_per_block`` as one list of depths per stage."""
    if isinstance(value, int):
        value = [value] * stages
    return [[v] * n if isinstance(v, int) else list(v) for v, n in zip(value, layers, strict=True)]


def _keep(teacher: int, sdxl: int, student: int) -> int:
    return max(1, round(teacher * student / sdxl))


def sdxl_preset_config(teacher_config: Mapping, student: str, plain: dict) -> dict:
    """The student's UNet config: ``plain`` (the teacher's kwargs) with Segmind's removals applied."""
    if student not in SDXL_STUDENTS:
        raise ConfigError(f"--student '{student}' is not an SDXL student ({', '.join(SDXL_STUDENTS)})")
    if not is_sdxl_shaped(teacher_config):
        raise ConfigError(
            f"--student {student} is Segmind's SDXL student; the teacher is not an SDXL UNet "
            "(use bk_base, bk_small or bk_tiny for SD1.x/SD2.x)"
        )
    layers = plain["layers_per_block"]
    layers = [layers] * 3 if isinstance(layers, int) else list(layers)
    down = _per_layer(plain.get("transformer_layers_per_block", 1), 3, layers)
    reverse = plain.get("reverse_transformer_layers_per_block")
    up = (
        _per_layer(reverse, 3, [n + 1 for n in layers[::-1]])
        if reverse
        else [[d[0]] * (n + 1) for d, n in zip(down[::-1], layers[::-1])]
    )
    table = _DEPTHS[student]
    new_down = [list(d) for d in down]
    new_up = [list(u) for u in up]
    for stage in (1, 2):
        for j, (t, s) in enumerate(zip(_SDXL_DOWN[stage], table["down"][stage])):
            if j < len(down[stage]):
                new_down[stage][j] = _keep(down[stage][j], t, s)
    for block in (0, 1):
        for j, (t, s) in enumerate(zip(_SDXL_UP[block], table["up"][block])):
            if j < len(up[block]):
                new_up[block][j] = _keep(up[block][j], t, s)
    plain["transformer_layers_per_block"] = new_down
    plain["reverse_transformer_layers_per_block"] = new_up
    plain["mid_block_type"] = "UNetMidBlock2D"  # one resnet, no attention (diffusers' SSD-1B mid block)
    return plain
