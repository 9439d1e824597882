"""Few-step distillation (DMD2 + PCM warm start + GAN) of a flow-matching teacher.

`losses` holds the objectives as pure functions over arrays and denoiser callables
(x_t, sigma) -> v, independent of the MMDiT; trainers close the model, text and CFG over them.
"""
