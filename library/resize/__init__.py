"""Resizing LoRA files exactly: key pairs, rank selection, the resize itself, reports and files.

``lora_pairs`` finds the modules of a LoRA file in the formats kohya reads; ``rank_reduction``
truncates each module's update exactly from its factors (``networks.svd``) with kohya's rank rules;
``report`` renders the verbose table, summary and sweep; ``files`` is ``resize_lora.py``'s work on
files. A feature package: core never imports it.
"""
