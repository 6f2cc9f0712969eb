"""The adapter for kohya-protocol networks that lack our optional hooks, and its one-line errors."""

import pytest
import torch

from library.errors import ConfigError
from library.training.network_protocol import TrainableNetwork, as_trainable_network

REQUESTED = {"ss_network_module": "foreign.net", "ss_network_dim": "4", "ss_network_alpha": "1"}


class MinimalNetwork(torch.nn.Module):
    """What kohya's train_network.py itself needs of a network, and nothing more."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        pass

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        return [{"params": [self.weight], "lr": unet_lr}]  # kohya's older modules return no descriptions

    def get_trainable_params(self):
        return [self.weight]

    def enable_gradient_checkpointing(self):
        pass

    def prepare_grad_etc(self, text_encoder, unet):
        pass

    def on_epoch_start(self, text_encoder, unet):
        pass

    def save_weights(self, file, dtype, metadata):
        pass

    def load_weights(self, file):
        pass


def test_a_minimal_network_gets_kohyas_defaults():
    network = as_trainable_network(MinimalNetwork(), "foreign.net", REQUESTED)
    assert isinstance(network, TrainableNetwork)
    params, descriptions = network.prepare_optimizer_params(None, 0.5, 1.0)
    assert descriptions == ["group0"] and params[0]["lr"] == 0.5
    assert network.network_metadata() == REQUESTED
    network.on_step_start(None, None)  # missing optional hooks do nothing
    network.set_multiplier(0.5)


def test_scale_weight_norms_on_a_network_without_it_names_the_flag_and_module():
    network = as_trainable_network(MinimalNetwork(), "foreign.net", REQUESTED)
    with pytest.raises(ConfigError, match="^--scale_weight_norms: network module 'foreign.net' does not support it$"):
        network.apply_max_norm_regularization(1.0, "cpu")


def test_a_module_that_returns_no_torch_module_is_a_config_error():
    with pytest.raises(ConfigError, match="^--network_module 'foreign.net' returned a dict, not an nn.Module"):
        as_trainable_network({}, "foreign.net", REQUESTED)
