"""pca / prune initialisation against numpy's least squares and eigenvalues, and against the original FFNs."""

import copy

import numpy as np
import pytest
import torch
from diffusers.models.attention import FeedForward

from library.errors import ConfigError
from library.ffn_compression.calibration import FFNRecorder
from library.ffn_compression.initialise import (
    choose_units,
    default_ridge,
    fold_into_kept,
    initialise_network,
    literal_pca_rotation,
    pca_bottleneck,
    pca_units,
    prune_units,
    scaled_axes,
)
from library.ffn_compression.statistics import HiddenStats
from library.models.stable_diffusion import load_stable_diffusion
from networks import lowrank_ffn


def stats_of(hidden: torch.Tensor) -> HiddenStats:
    stats = HiddenStats.empty(hidden.shape[-1])
    stats.add(hidden)
    return stats


def output_error(hidden, weight, bias, kept, folded_weight, folded_bias) -> float:
    """Mean squared error of the folded readout of the kept units against ``W h + b``."""
    target = hidden.double() @ weight.double().T + bias.double()
    approximation = hidden.double()[:, kept] @ folded_weight.T + folded_bias
    return (target - approximation).square().sum(1).mean().item()


def uncorrelated(stds: list[float], rows: int = 500, seed: int = 0) -> torch.Tensor:
    """Rows whose sample covariance is exactly diag(stds²): centred orthogonal columns, rescaled."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(rows, len(stds), generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(data - data.mean(0))
    return q * torch.tensor(stds, dtype=torch.float64) * rows**0.5 + 3.0


def test_fold_is_numpys_least_squares_readout_from_the_kept_units():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2000, 12, generator=generator, dtype=torch.float64)
    hidden = hidden @ torch.randn(12, 12, generator=generator, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(5, 12, generator=generator), torch.randn(5, generator=generator)
    kept = torch.tensor([0, 3, 5, 7, 11])
    folded_weight, folded_bias = fold_into_kept(stats_of(hidden), weight, bias, kept, ridge=0.0)
    design = np.c_[hidden[:, kept].double().numpy(), np.ones(len(hidden))]
    target = hidden.double().numpy() @ weight.double().numpy().T + bias.double().numpy()
    coefficients = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(folded_weight.numpy(), coefficients[:-1].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(folded_bias.numpy(), coefficients[-1], rtol=1e-6, atol=1e-8)


def test_nothing_dropped_keeps_net2_bit_for_bit():
    weight, bias = torch.randn(4, 6), torch.randn(4)
    folded_weight, folded_bias = fold_into_kept(stats_of(torch.randn(3, 6)), weight, bias, torch.arange(6))
    assert torch.equal(folded_weight.float(), weight) and torch.equal(folded_bias.float(), bias)


def test_pca_bottleneck_error_is_the_discarded_variance_on_a_linear_ffn():
    """No GEGLU: the hidden layer is x Aᵀ + a, where PCA's projection is legal and optimal."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 10, generator=generator, dtype=torch.float64)
    hidden = x @ torch.randn(10, 16, generator=generator, dtype=torch.float64) + 1.0
    weight, bias = torch.randn(6, 16, generator=generator), torch.randn(6, generator=generator)
    bottleneck = pca_bottleneck(stats_of(hidden), weight, bias, k=4)
    eigenvalues = np.linalg.eigvalsh(np.cov(hidden.numpy(), rowvar=False, bias=True))  # ascending
    centred = hidden - hidden.mean(0)
    basis = bottleneck.down.T
    residual = centred - centred @ basis @ basis.T
    assert residual.square().sum(1).mean().item() == pytest.approx(eigenvalues[:-4].sum(), rel=1e-8)
    assert bottleneck.discarded_variance == pytest.approx(eigenvalues[:-4].sum(), rel=1e-8)
    reconstructed = hidden.mean(0) + centred @ basis @ basis.T
    np.testing.assert_allclose(bottleneck(hidden).numpy(), (reconstructed @ weight.double().T + bias).numpy())


def test_pca_keeps_the_top_principal_units_when_the_axes_are_units():
    """Uncorrelated units: the principal axes are units, and the error is exactly the discarded variance."""
    stds = [0.5, 2.0, 0.1, 1.5, 1.0, 0.3]
    hidden = uncorrelated(stds)
    weight = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bias = torch.zeros(4, dtype=torch.float64)
    stats = stats_of(hidden)
    kept = pca_units(scaled_axes(stats, weight), 3)
    scaled_variance = torch.tensor(stds).double() ** 2 * weight.norm(dim=0) ** 2
    assert kept.tolist() == sorted(scaled_variance.argsort(descending=True)[:3].tolist())
    folded = fold_into_kept(stats, weight, bias, kept, ridge=0.0)
    scaled_covariance = np.diag(weight.norm(dim=0).numpy()) @ np.diag(np.square(stds))
    scaled_covariance = scaled_covariance @ np.diag(weight.norm(dim=0).numpy())
    discarded = np.linalg.eigvalsh(scaled_covariance)[:3].sum()
    assert output_error(hidden, weight, bias, kept, *folded) == pytest.approx(discarded, rel=1e-6)


def test_pca_keeps_one_of_each_redundant_pair_where_scores_keep_both():
    """Units 4..7 copy 0..3 a little louder: 4 units carry everything, but the loudest 4 are two pairs."""
    generator = torch.Generator().manual_seed(3)
    sources = uncorrelated([1.0, 0.95, 0.5, 0.45], seed=3)
    hidden = torch.cat([sources, 1.02 * sources], dim=1)
    weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    weight = weight / weight.norm(dim=0)  # equal column norms: scores follow the activations alone
    bias = torch.zeros(5, dtype=torch.float64)
    stats = stats_of(hidden)
    pca_kept, prune_kept = pca_units(scaled_axes(stats, weight), 4), prune_units(stats, weight, 4)
    assert sorted(i % 4 for i in pca_kept.tolist()) == [0, 1, 2, 3]
    assert prune_kept.tolist() == [0, 1, 4, 5]
    target_energy = (hidden @ weight.T).var(0).sum().item()
    pca_error = output_error(hidden, weight, bias, pca_kept, *fold_into_kept(stats, weight, bias, pca_kept))
    prune_error = output_error(hidden, weight, bias, prune_kept, *fold_into_kept(stats, weight, bias, prune_kept))
    assert pca_error < 1e-3 * target_energy < prune_error


def test_both_choices_ignore_how_a_unit_splits_its_scale_between_value_and_net2():
    generator = torch.Generator().manual_seed(4)
    ff = FeedForward(16, inner_dim=24).double()
    x = torch.randn(400, 16, generator=generator, dtype=torch.float64)
    scale = torch.rand(24, generator=generator, dtype=torch.float64) * 10 + 0.1
    rescaled = copy.deepcopy(ff)
    with torch.no_grad():
        rescaled.net[0].proj.weight[:24] *= scale[:, None]
        rescaled.net[0].proj.bias[:24] *= scale
        rescaled.net[2].weight /= scale
        torch.testing.assert_close(rescaled(x), ff(x))  # the same function
        stats, rescaled_stats = stats_of(ff.net[0](x)), stats_of(rescaled.net[0](x))
    for method in ("pca", "prune"):
        kept = choose_units(method, stats, ff.net[2].weight, 9)
        assert torch.equal(kept, choose_units(method, rescaled_stats, rescaled.net[2].weight, 9))


@pytest.fixture(scope="module")
def tiny_unet(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir).unet


def calibrated(unet, calls=6):
    """Statistics of every FFN over a few UNet calls on random inputs."""
    targets = {t.name: t.module for t in lowrank_ffn.ffn_targets(unet)}
    generator = torch.Generator().manual_seed(5)
    with FFNRecorder(targets, tokens=64) as recorder, torch.no_grad():
        for t in range(calls):
            latents = torch.randn(2, 4, 8, 8, generator=generator)
            unet(latents, torch.tensor([100 + 150 * t] * 2), torch.randn(2, 77, 64, generator=generator))
    return recorder.stats


@pytest.mark.parametrize("method", ["pca", "prune"])
def test_full_width_initialisation_reproduces_the_original_unet(tiny_unet, method):
    unet = copy.deepcopy(tiny_unet)
    stats = calibrated(unet)
    inputs = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 64)
    with torch.no_grad():
        expected = unet(*inputs).sample
        network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio="1")
        initialise_network(network, stats, method)
        network.apply_to(None, unet)
        torch.testing.assert_close(unet(*inputs).sample, expected, rtol=1e-5, atol=1e-5)
    assert network.init_method == method


def test_rotating_value_and_gate_rows_by_the_pca_basis_is_wrong_even_at_full_width():
    generator = torch.Generator().manual_seed(6)
    ff = FeedForward(16, inner_dim=24).double()
    x = torch.randn(500, 16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        stats = stats_of(ff.net[0](x))
        proj, out = ff.net[0].proj, ff.net[2]
        rotated = FeedForward(16, inner_dim=24).double()
        weights = literal_pca_rotation(stats, proj.weight, proj.bias, out.weight, out.bias, 24)
        targets = (rotated.net[0].proj.weight, rotated.net[0].proj.bias, rotated.net[2].weight, rotated.net[2].bias)
        for param, value in zip(targets, weights):
            param.copy_(value)
        error = (rotated(x) - ff(x)).norm() / ff(x).norm()
    assert error > 0.1


def test_missing_statistics_and_unknown_methods_are_named(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio="0.5", blocks="MID")
    with pytest.raises(ConfigError, match="no statistics for lora_unet_mid_block_attentions_0_transformer_blocks_0"):
        initialise_network(network, {}, "pca")
    with pytest.raises(ConfigError, match="--init 'svd' is unknown"):
        choose_units("svd", HiddenStats.empty(4), torch.ones(2, 4), 2)


def test_an_axes_cache_serves_several_widths_from_one_eigendecomposition(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    stats, cache = calibrated(unet), {}
    for ratio in ("0.25", "0.5"):
        cached = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio=ratio, blocks="IN4,MID")
        initialise_network(cached, stats, "pca", axes_cache=cache)
        plain = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio=ratio, blocks="IN4,MID")
        initialise_network(plain, stats, "pca")
        for key, value in plain.state_dict().items():
            assert torch.equal(cached.state_dict()[key], value)
    assert set(cache) == {m.lora_name for m in plain.ffn_modules}


def test_the_default_ridge_holds_the_refit_back_when_tokens_barely_outnumber_units():
    generator = torch.Generator().manual_seed(7)
    mixing = torch.randn(60, 60, generator=generator, dtype=torch.float64)
    fit = torch.randn(48, 60, generator=generator, dtype=torch.float64) @ mixing  # N = 48 tokens, k = 40 units
    held_out = torch.randn(4000, 60, generator=generator, dtype=torch.float64) @ mixing
    weight, bias = torch.randn(8, 60, generator=generator, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    stats, kept = stats_of(fit), torch.arange(40)
    default = fold_into_kept(stats, weight, bias, kept)
    assert all(torch.equal(a, b) for a, b in zip(default, fold_into_kept(stats, weight, bias, kept, ridge=40 / 48)))
    unregularised = fold_into_kept(stats, weight, bias, kept, ridge=1e-9)
    default_error = output_error(held_out, weight, bias, kept, *default)
    assert default_error < 0.5 * output_error(held_out, weight, bias, kept, *unregularised)
    assert default_ridge(40, 1_000_000) == pytest.approx(4e-5)  # fades with plenty of tokens
