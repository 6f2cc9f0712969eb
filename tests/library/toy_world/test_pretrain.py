"""Pretraining stages at a tiny budget: deterministic, and every module trains."""

import torch

from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer
from library.toy_world.pretrain import PretrainPlan, pretrain_diffusion, pretrain_vae, reconstruction_loss

PLAN = PretrainPlan(vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=4, images_per_combination=1, warmup_steps=1)


def trained(tmp_path, name):
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(tmp_path / name))
    model = build_toy_model(tokenizer, seed=0)
    initial = {k: v.clone() for part in ("vae", "unet", "text_encoder") for k, v in _state(model, part).items()}
    logs = (pretrain_vae(model.vae, PLAN, report=lambda _: None), pretrain_diffusion(model, PLAN, lambda _: None))
    return model, initial, logs


def _state(model, part):
    return {f"{part}.{k}": v for k, v in getattr(model, part).state_dict().items()}


def test_stages_are_deterministic_and_train_every_module(tmp_path):
    first, initial, logs = trained(tmp_path, "a")
    second, _, logs_again = trained(tmp_path, "b")
    assert [log.losses for log in logs] == [log.losses for log in logs_again]
    assert all(torch.isfinite(torch.tensor(log.losses)).all() for log in logs)
    for part in ("vae", "unet", "text_encoder"):
        state, again = _state(first, part), _state(second, part)
        assert all(torch.equal(state[k], again[k]) for k in state)
        assert [k for k in state if torch.equal(state[k], initial[k])] == []  # no module left frozen


def test_reconstruction_loss_weights_only_colour():
    generator = torch.Generator().manual_seed(0)
    decoded, pixels = torch.rand(2, 3, 8, 8, generator=generator), torch.rand(2, 3, 8, 8, generator=generator)
    plain = torch.nn.functional.mse_loss(decoded, pixels)
    torch.testing.assert_close(reconstruction_loss(decoded, pixels, 1.0), plain)
    grey_error = pixels + 0.1  # the same error in R, G and B: luminance only
    torch.testing.assert_close(reconstruction_loss(grey_error, pixels, 4.0), torch.tensor(0.01))
    red_green = pixels + torch.tensor([0.1, -0.1, 0.0]).view(1, 3, 1, 1)  # opponent only
    torch.testing.assert_close(reconstruction_loss(red_green, pixels, 4.0), torch.tensor(4 * 0.02 / 3))
