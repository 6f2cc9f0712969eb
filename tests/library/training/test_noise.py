"""Noise, timesteps, targets and loss weights against direct formulas."""

import pytest
import torch
import torch.nn.functional as F

from library.models.families import make_training_scheduler
from library.training.noise import (
    NoiseOptions,
    diffusion_loss,
    make_noise,
    noisy_latents,
    per_sample_loss,
    prediction_target,
    sample_timesteps,
    snr,
    timestep_weights,
    validation_timesteps,
)


@pytest.fixture
def scheduler():
    return make_training_scheduler(v_parameterization=False)


def test_snr_matches_alphas(scheduler):
    t = torch.tensor([0, 10, 500, 999])
    a = scheduler.alphas_cumprod[t]
    expected = (a.sqrt() / (1 - a).sqrt()) ** 2
    assert torch.allclose(snr(scheduler, t), expected)


def test_min_snr_weights_for_epsilon_and_v():
    t = torch.tensor([1, 100, 400, 900])
    options = NoiseOptions(min_snr_gamma=5.0)
    for v in (False, True):
        sched = make_training_scheduler(v_parameterization=v)
        s = snr(sched, t)
        expected = torch.minimum(s, torch.full_like(s, 5.0)) / (s + 1 if v else s)
        assert torch.allclose(timestep_weights(t, sched, options), expected)


def test_debiased_and_v_like_weights(scheduler):
    t = torch.tensor([3, 300])
    s = snr(scheduler, t).clamp(max=1000)
    assert torch.allclose(timestep_weights(t, scheduler, NoiseOptions(debiased_estimation_loss=True)), 1 / s.sqrt())
    got = timestep_weights(t, scheduler, NoiseOptions(v_pred_like_loss=0.5))
    assert torch.allclose(got, 1 + 0.5 / (s / (s + 1)))
    assert torch.equal(timestep_weights(t, scheduler, NoiseOptions()), torch.ones(2))


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(0)
    got = make_noise(latents, NoiseOptions(noise_offset=0.1))
    torch.manual_seed(0)
    base = torch.randn_like(latents)
    offset = torch.randn(2, 4, 1, 1)
    assert torch.allclose(got, base + 0.1 * offset)


def test_multires_noise_is_normalised():
    torch.manual_seed(0)
    noise = make_noise(torch.zeros(2, 4, 32, 32), NoiseOptions(multires_noise_iterations=6))
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)


def test_targets(scheduler):
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    assert torch.equal(prediction_target(scheduler, latents, noise, t), noise)
    v_sched = make_training_scheduler(v_parameterization=True)
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(prediction_target(v_sched, latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents)


def test_ip_noise_gamma_perturbs_input_only(scheduler):
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    plain = noisy_latents(scheduler, latents, noise, t, NoiseOptions())
    assert torch.equal(plain, scheduler.add_noise(latents, noise, t))
    assert not torch.equal(noisy_latents(scheduler, latents, noise, t, NoiseOptions(ip_noise_gamma=0.1)), plain)


def test_losses(scheduler):
    pred, target, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 50, 500])
    l2 = per_sample_loss(pred, target, t, scheduler, NoiseOptions())
    assert torch.allclose(l2, F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)))
    l1 = per_sample_loss(pred, target, t, scheduler, NoiseOptions(loss_type="l1"))
    assert torch.allclose(l1, (pred - target).abs().mean((1, 2, 3)))
    c = 0.3
    huber = per_sample_loss(
        pred, target, t, scheduler, NoiseOptions(loss_type="huber", huber_schedule="constant", huber_c=c)
    )
    expected = (2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)).mean((1, 2, 3))
    assert torch.allclose(huber, expected)


def test_timesteps_respect_range():
    t = sample_timesteps(1000, NoiseOptions(min_timestep=100, max_timestep=200), torch.device("cpu"))
    assert t.min() >= 100 and t.max() < 200


def test_zero_terminal_snr():
    sched = make_training_scheduler(v_parameterization=True, zero_terminal_snr=True)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("v_parameterization", [False, True])
def test_diffusion_loss_is_the_weighted_mse_to_noise_or_velocity(v_parameterization):
    """Against the DDPM formulas written out: x_t = sqrt(a) x0 + sqrt(1-a) e; v = sqrt(a) e - sqrt(1-a) x0."""
    scheduler = make_training_scheduler(v_parameterization)
    options = NoiseOptions(min_snr_gamma=5.0)
    latents = torch.randn(3, 4, 8, 8)
    seen = {}

    def predict(noisy, t):
        seen["noisy"], seen["t"] = noisy, t
        return noisy * 0.5

    torch.manual_seed(7)
    result = diffusion_loss(predict, latents, scheduler, options, torch.tensor([1.0, 2.0, 0.5]))
    torch.manual_seed(7)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (3,))
    assert torch.equal(seen["t"], t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    torch.testing.assert_close(seen["noisy"], noisy)
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_parameterization else noise
    torch.testing.assert_close(result.target, target)
    snr_t = (a / (1 - a)).flatten()
    min_snr = snr_t.clamp(max=5.0) / (snr_t + 1 if v_parameterization else snr_t)
    per_image = ((noisy * 0.5 - target) ** 2).mean(dim=(1, 2, 3)) * torch.tensor([1.0, 2.0, 0.5]) * min_snr
    torch.testing.assert_close(result.loss, per_image.mean())


def test_diffusion_loss_at_fixed_timesteps_weighs_the_mask(scheduler):
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    mask = torch.zeros(2, 64, 64)
    mask[:, :32] = 1.0  # the top half of the image counts, the bottom half not
    result = diffusion_loss(lambda noisy, _: torch.zeros_like(noisy), latents, scheduler, NoiseOptions(),
                            torch.ones(2), mask=mask, timesteps=t)  # fmt: skip
    top_half = torch.zeros(2, 4, 8, 8)
    top_half[:, :, :4] = 1.0
    expected = (result.target**2 * top_half).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(result.loss, expected)


def test_validation_timesteps_spread_inside_the_range():
    assert validation_timesteps(NoiseOptions()) == [200, 400, 600, 800]
    assert validation_timesteps(NoiseOptions(min_timestep=100, max_timestep=600)) == [200, 300, 400, 500]
