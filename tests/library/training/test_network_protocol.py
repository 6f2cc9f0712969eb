"""The adapter for kohya-protocol networks that lack our optional hooks, and its one-line errors."""

import argparse
import json

import pytest
import torch

from library.errors import ConfigError
from library.training.network_protocol import TrainableNetwork, as_trainable_network
from library.training.networks import create_network

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


# --- kohya's --text_encoder_lr and ss_network_args for foreign networks ---------------------------------


class RecordingNetwork(torch.nn.Module):
    """A minimal kohya-protocol network (like lycoris.kohya's) that records what it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, learning_rate):
        self.calls.append((text_encoder_lr, unet_lr, learning_rate))
        return [{"params": [self.weight], "lr": text_encoder_lr}], ["textencoder"]


class MultipleLrNetwork(RecordingNetwork):
    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, learning_rate):
        self.calls.append(("multiple", text_encoder_lr))
        return [{"params": [self.weight]}], ["textencoder"]


class TwoArgumentNetwork(RecordingNetwork):
    def prepare_optimizer_params(self, text_encoder_lr, unet_lr):
        self.calls.append((text_encoder_lr, unet_lr))
        return [{"params": [self.weight]}]


def test_foreign_networks_get_the_first_text_encoder_lr():
    inner = RecordingNetwork()
    groups, names = as_trainable_network(inner, "lycoris.kohya", {}).prepare_optimizer_params([5e-5, 1e-5], 1e-4, 1e-3)
    assert inner.calls == [(5e-5, 1e-4, 1e-3)] and groups[0]["lr"] == 5e-5 and names == ["textencoder"]
    as_trainable_network(inner, "lycoris.kohya", {}).prepare_optimizer_params(None, None, 1e-3)
    assert inner.calls[-1] == (None, None, 1e-3)


def test_networks_with_several_text_encoder_lrs_get_the_list():
    inner = MultipleLrNetwork()
    as_trainable_network(inner, "x", {}).prepare_optimizer_params([5e-5, 1e-5], 1e-4, 1e-3)
    assert inner.calls == [("multiple", [5e-5, 1e-5])]


def test_old_two_argument_networks_get_no_default_lr():
    inner = TwoArgumentNetwork()
    groups, names = as_trainable_network(inner, "x", {}).prepare_optimizer_params([5e-5], 1e-4, 1e-3)
    assert inner.calls == [(5e-5, 1e-4)] and names == ["group0"]


def test_foreign_network_files_carry_the_network_args():
    model = argparse.Namespace(vae=None, text_encoder=None, unet=None)
    module = argparse.Namespace(create_network=lambda *args, **kwargs: RecordingNetwork())
    args = argparse.Namespace(
        network_module="lycoris.kohya", network_dim=8, network_alpha=1.0, network_dropout=None,
        network_args=["algo=locon", "preset=full", "conv_dim=4"], dim_from_weights=False, network_weights=None,
    )  # fmt: skip
    metadata = create_network(args, module, model).network_metadata()
    assert json.loads(metadata["ss_network_args"]) == {"algo": "locon", "preset": "full", "conv_dim": "4"}
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_network_dim"] == "8"
