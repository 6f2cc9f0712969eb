"""The LoRA toolbox beside resize: merging LoRAs (into a checkpoint or into one LoRA), SVD-merging, extracting a
LoRA from two checkpoints, and inspecting files. kohya's scripts' flags; exact factored arithmetic where kohya
builds dense matrices."""
