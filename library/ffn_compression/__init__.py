"""Narrow feed-forward compression of SD1.x/2.x UNets (``networks/lowrank_ffn.py``): calibration,
initialisation, block-wise and Theseus training, and compressed UNet folders. See docs/lowrank_ffn.md.

Importing the package registers the compressed-UNet folder loader with ``library.models.unet_variants``.
"""

from library.ffn_compression import unet as _unet  # noqa: F401  (registers the compressed-UNet variant)
