"""Narrow feed-forward compression of SD1.x/2.x UNets (``networks/lowrank_ffn.py``): calibration,
initialisation, block-wise and Theseus training, and compressed UNet folders. See docs/lowrank_ffn.md."""
