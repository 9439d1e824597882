"""The fields distillation configs add to `training.defaults.base_config()` (configs/pcm.py, dmd2.py)."""

from __future__ import annotations

import ml_collections

from qwen_jax.training.defaults import base_config


def distill_config(objective: str) -> ml_collections.ConfigDict:
    c = base_config()
    c.objective = objective
    c.data.caption_dropout = 0.0  # the student is CFG-free: it always sees its caption
    c.eval.update(num_steps=2, guidance=1.0)  # grids show the student as it will be used
    # The student: a K-step generator on the fixed-shift grid (2 steps at shift 3: 1.0 -> 0.75 -> 0),
    # initialised from the teacher or from `student_init` (a transformer folder, e.g. a PCM export).
    # The teacher (real score) is the pretrained transformer with CFG `guidance`.
    c.distill = ml_collections.ConfigDict(dict(
        student_steps=2, student_shift=3.0, renoise="ode", student_init="", guidance=4.0))
    if objective == "pcm":
        # Phased consistency: `phases` phases of a `points`-point grid at `shift`; pseudo-Huber c.
        c.pcm = ml_collections.ConfigDict(dict(phases=2, points=100, shift=3.0, huber_c=1e-3))
    if objective == "dmd2":
        # DMD2: the critic (fake score + GAN heads) steps every iteration, the generator every
        # `dfake_gen_update_ratio`-th; DM timesteps U[t_min, t_max] (optionally shifted).
        c.dmd2 = ml_collections.ConfigDict(dict(dfake_gen_update_ratio=5, t_min=0.02, t_max=0.98, dm_shift=0.0))
        c.critic_optim = ml_collections.ConfigDict(dict(
            lr=1e-5, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, schedule="constant",
            final_lr_fraction=0.0, grad_clip=10.0))
        # GAN: heads on the image tokens of blocks at these depth fractions of `backbone` ("fake":
        # the fake score, trained by the D loss too, as DMD2; "teacher": frozen, heads only).
        # weight 0 disables it. `real_share`: the expected fraction of real rows in the GAN's real
        # pool; the others come from `teacher_pool`, teacher samples (`distillation/real_pool.py`).
        c.gan = ml_collections.ConfigDict(dict(
            gen_weight=5e-3, disc_weight=1e-2, backbone="fake", blocks=(0.5, 0.75, 1.0), kind="softplus",
            real_share=1.0, teacher_pool=""))
        c.optim.update(b1=0.0, grad_clip=10.0)
    return c
