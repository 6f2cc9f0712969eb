import pytest
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from library.distill.cost import count_macs, count_parameters
from library.distill.students import student_config
from library.models.sd_configs import SD15_UNET

# distill.md §1.4, MACs per forward at 512 px including the attention matmuls.
SD15_GMACS_512 = {"teacher": 401.6, "bk_base": 261.5, "bk_small": 255.4, "bk_tiny": 242.8}


def test_full_size_macs_match_the_research_note():
    with init_empty_weights():
        teacher = UNet2DConditionModel(**SD15_UNET)
    assert count_macs(SD15_UNET, 64) / 1e9 == pytest.approx(SD15_GMACS_512["teacher"], abs=0.05)
    for name in ("bk_base", "bk_small", "bk_tiny"):
        gmacs = count_macs(student_config(teacher.config, name), 64) / 1e9
        assert gmacs == pytest.approx(SD15_GMACS_512[name], abs=0.05), name


def test_cpu_attention_is_counted_like_explicit_matmuls(sd1_teacher):
    # diffusers' classic AttnProcessor computes attention with baddbmm/bmm, which flop_counter
    # knows; the default SDPA processor must give the same count on a real CPU model.
    config = dict(sd1_teacher.config)
    explicit = UNet2DConditionModel.from_config(config).eval()
    explicit.set_attn_processor(AttnProcessor())
    sdpa = UNet2DConditionModel.from_config(config).eval()
    assert count_macs(sdpa, 16, 24) == count_macs(explicit, 16, 24) == count_macs(config, 16, 24)
    assert count_macs(sdpa, 16, 24) > count_macs(sdpa, 8, 12)


def test_count_parameters(sd1_teacher):
    assert count_parameters(sd1_teacher) == sum(t.numel() for t in sd1_teacher.state_dict().values())


def test_sdxl_macs_drop_by_one_transformer_layer_exactly():
    """SDXL counts with its pooled-text/size conditioning; one fewer transformer layer in the innermost
    level (1280 channels, 16 x 16 = 256 tokens at 512 px, 77 x 2048 context) saves exactly that layer's
    MACs, written out here: q, k, v, out of self-attention (4 N C^2), its scores and values (2 N^2 C),
    cross-attention q and out (2 N C^2), k and v of the context (2 * 77 * 2048 * C), its scores and
    values (2 * 77 * N * C), and the GEGLU feed-forward (C -> 8C, 4C -> C: 12 N C^2)."""
    from library.models.sd_configs import SDXL_UNET

    fewer = {**SDXL_UNET, "transformer_layers_per_block": [[1, 1], [2, 2], [10, 10]],
             "reverse_transformer_layers_per_block": [[10, 10, 9], [2, 2, 2], [1, 1, 1]]}  # fmt: skip
    n, c, tokens, context = 256, 1280, 77, 2048
    layer = 4 * n * c * c + 2 * n * n * c + 2 * n * c * c + 2 * tokens * context * c + 2 * tokens * n * c
    layer += 12 * n * c * c
    assert count_macs(SDXL_UNET, 64) - count_macs(fewer, 64) == layer
