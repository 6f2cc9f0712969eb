"""Bench-only Light LoRA variants the suite does not offer, as a kohya ``--network_module``.

The Light LoRA article (docs/lilora.md) reports two initialisations that do not learn: both trainable
factors zero, and Gaussian instead of orthogonal aux projections. ``networks.lilora`` refuses the
first (its gradients are products with the other, zero, factor) and has only orthogonal aux, so the
quality bench (bench/quality_dreambooth.py) trains them through this module, which builds a suite
network and then changes its initial state; the suite's refusal is untouched.

``--network_args variant=NAME`` plus any ``networks.lilora`` argument:

- ``both_zero``: ``init=up_zero`` with the down core zeroed as well (the article's variant 3);
- ``gaussian``: the article's variant 5 as written: aux entries ~ N(0, 1), down core ~ N(0, 1/rank^2),
  up core zero;
- ``gaussian_scaled``: Gaussian aux scaled to the orthonormal aux's row/column norms (N(0, 1/fan_in)
  and N(0, 1/out)), the suite's own core init; separates "Gaussian" from "1 is the wrong scale".

Saved files are standard kohya LoRA files (the product with whatever aux was used), so they load
with ``networks.lora``; ``networks.lilora`` would refuse the Gaussian ones (their factors do not lie
in its orthonormal aux bases).
"""

from __future__ import annotations

import torch

from networks import lilora
from networks.lilora_file import aux_digest, stable_seed
from networks.network_args import NetworkArgsError

VARIANTS = ("both_zero", "gaussian", "gaussian_scaled")


def _gaussian(rows: int, cols: int, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32) * std


@torch.no_grad()
def apply_variant(network: lilora.LiLoRANetwork, variant: str, aux_seed: int = 0) -> None:
    """Change a freshly built ``init=up_zero`` network's initial state to ``variant``."""
    for module in network.adapters:
        if variant == "both_zero":
            module.lilora_down.zero_()
            module.lilora_up.zero_()
            continue
        (a, fan_in), (out, b) = module.down_aux.shape, module.up_aux.shape
        scaled = variant == "gaussian_scaled"
        seed = stable_seed(aux_seed, module.lora_name, "gaussian")
        module.down_aux.copy_(_gaussian(a, fan_in, fan_in**-0.5 if scaled else 1.0, seed))
        module.up_aux.copy_(_gaussian(out, b, out**-0.5 if scaled else 1.0, seed + 1))
        if not scaled:  # the article: nn.init.normal_(down, std=1 / rank); up stays zero
            module.lilora_down.copy_(_gaussian(*module.lilora_down.shape, 1.0 / module.lora_dim, seed + 2))
        module.digest = aux_digest(module.lora_name, module.down_aux, module.up_aux)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **network_args: str,
) -> lilora.LiLoRANetwork:
    """``networks.lilora.create_network`` (``init=up_zero``), then ``variant``'s initial state."""
    args = dict(network_args)
    variant = args.pop("variant", None)
    if variant not in VARIANTS:
        raise NetworkArgsError(f"network_args variant={variant}: use one of {', '.join(VARIANTS)}")
    if args.get("init", "up_zero") != "up_zero":
        raise NetworkArgsError(f"network_args init={args['init']}: the variants start from init=up_zero")
    network = lilora.create_network(
        multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout, **args
    )
    apply_variant(network, variant, network.args.aux_seed)
    network.module_name = __name__  # ss_network_module: the file loads through this module, not the suite's
    return network


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, **kwargs):
    """A saved variant is a standard kohya LoRA file: load it as one."""
    from networks import lora

    return lora.create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=weights_sd)
