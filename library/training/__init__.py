"""Training: kohya's flags, the accelerate loop and its tasks, and everything a run writes.

``args`` parses kohya's flags and ``--config_file``; ``loop`` is the one training loop, driven by a
task (``network_trainer`` for train_network.py, feature packages for theirs) through the contract in
``network_protocol``; ``parts`` holds the set-up steps every trainer shares; ``optimizers`` and
``noise`` build kohya's optimizers, schedulers, noise and losses; ``saving`` names and rotates outputs
and writes ``ss_*`` metadata; ``sampling`` renders sample images; ``theseus`` swaps modules
progressively. Feature packages (distill, ffn_compression, resize) build on this package, never the
reverse.
"""
