"""The network exceptions live in networks/errors.py; their old homes still export the same classes."""

from networks import base, errors, lora_file, network_args


def test_old_homes_export_the_same_classes():
    assert network_args.NetworkError is errors.NetworkError
    assert network_args.NetworkArgsError is errors.NetworkArgsError
    assert base.NetworkWeightsError is errors.NetworkWeightsError
    assert base.NetworkStateError is errors.NetworkStateError
    assert lora_file.LoRAFileError is errors.LoRAFileError


def test_every_network_error_is_one_catchable_value_error():
    for kind in (errors.NetworkArgsError, errors.NetworkWeightsError, errors.NetworkStateError, errors.LoRAFileError):
        assert issubclass(kind, errors.NetworkError) and issubclass(kind, ValueError)
