"""Model families: loading and saving checkpoints (diffusers folders and single LDM files), offline.

This package owns everything that knows a checkpoint's layout: one object per model family
(``families``: SD1, SD2) with what differs between them, the SD1.x/SD2.x loader and writer
(``stable_diffusion``), the registry through which feature packages add UNet variants
(``unet_variants``), what a single LDM file is (``ldm_architecture``) and the key conversion between LDM
single files and diffusers models (``ldm_conversion``), the released architectures' configs
(``sd_configs``) and prompt tokenising and encoding (``text_encoding``). Training, data and feature
packages ask it for models; it imports none of them (tests/test_import_rules.py).
"""
