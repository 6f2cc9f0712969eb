"""Foreign networks get kohya's calls: the --text_encoder_lr they expect, and metadata of their args."""

import argparse
import json

import torch

from library.training.network_protocol import as_trainable_network
from library.training.networks import create_network


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
