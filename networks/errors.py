"""The errors network modules raise about their inputs, in one place.

Each is a ``ValueError`` with a one-line message naming the key, file or module at fault; callers (our
scripts, or kohya's) catch :class:`NetworkError` for all of them. The old homes
(``networks.network_args``, ``networks.base``, ``networks.lora_file``) still export each name.

Imports nothing: kohya users copy ``networks/`` files into their checkout.
"""


class NetworkError(ValueError):
    """Base of the errors a network reports about its inputs."""


class NetworkArgsError(NetworkError):
    """A ``--network_args`` key or value is wrong (message names it)."""


class NetworkWeightsError(NetworkError):
    """A weights file does not fit the network or the model (message names the key)."""


class NetworkStateError(NetworkError):
    """A call that does not fit the network's state, such as merging while applied."""


class LoRAFileError(NetworkError):
    """A LoRA file is missing, unreadable, or not what the caller expected (message names it)."""
