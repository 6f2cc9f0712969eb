"""The feature packages, imported once by the scripts so that each registers what it adds to core.

Core (``library.models``, ``data``, ``training``) never imports a feature; a feature adds to it
through registries such as ``library.models.unet_variants``. Importing this module makes every
feature's additions available (e.g. train_network.py then loads a compressed UNet folder).
"""

import library.ffn_compression  # noqa: F401  (compressed-UNet folders)
