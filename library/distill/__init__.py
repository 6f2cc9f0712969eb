"""Block-removal knowledge distillation of SD1.x/SD2.x UNets (BK-SDM / Segmind students) and Theseus.

students    student configs (bk_base, bk_small, bk_tiny, custom json) and building them from a teacher
block_map   which teacher block each student block is copied from
features    matched block outputs and the hooks that record them
teacher     the frozen teacher and its KD targets
loss        task + output-KD + feature-KD objective
hybrid      teacher/student stage-pair hybrid UNet for Theseus replacement (with library.training.theseus)
cost        parameter and MAC counts (meta device, torch.utils.flop_counter)

args        distill_unet.py's flags and their checks
trainer     distill_unet.py: models, student or network, data, optimizer, then the shared loop
task        one distillation step for library.training.loop, and saving, sampling, validation
ema         float32 EMA of the trained weights (diffusers' EMAModel)
export      the student as a diffusers folder and an optional single file
"""
