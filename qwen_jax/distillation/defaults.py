"""The fields distillation configs add to `training.defaults.base_config()` (configs/pcm.py, dmd2.py)."""

from __future__ import annotations

import ml_collections

from qwen_jax.toy.folders import TEACHER
from qwen_jax.training.defaults import base_config


QWEN_IMAGE_PROMPTS = ("A red fox in the snow, watercolor.", "A neon sign that says 'qwen_jax'.")
TOY_PROMPTS = ("a red circle on a blue background", "a green square on a black background",
               "a white triangle on a magenta background", "a cyan square on a yellow background")


def distill_config(objective: str, variant: str = "qwen_image") -> ml_collections.ConfigDict:
    """The fields every distillation config shares, for `variant` "qwen_image" (LoRA 64 on the
    real model, teacher CFG 4) or "toy" (full weights from the committed toy teacher, CFG 2)."""
    c = base_config()
    c.objective = objective
    c.data.caption_dropout = 0.0  # the student is CFG-free: it always sees its caption
    c.eval.update(num_steps=2, guidance=1.0)  # grids show the student as it will be used
    # The student: a K-step generator on the fixed-shift grid (2 steps at shift 3: 1.0 -> 0.75 -> 0),
    # initialised from the teacher or from `student_init` (a transformer folder, e.g. a PCM export).
    # The teacher (real score) is the pretrained transformer with CFG `guidance` at the sigmas
    # inside `guidance_interval` (lo, hi), scale 1 elsewhere (`roles.real_score`, PCM and DMD2).
    c.distill = ml_collections.ConfigDict(dict(
        student_steps=2, student_shift=3.0, renoise="ode", student_init="", guidance=4.0,
        guidance_interval=(0.0, 1.0)))
    if objective == "pcm":
        # Phased consistency: `phases` phases of a `points`-point grid at `shift`; pseudo-Huber c.
        c.pcm = ml_collections.ConfigDict(dict(phases=2, points=100, shift=3.0, huber_c=1e-3))
    if objective == "dmd2":
        # DMD2: the critic (fake score + GAN heads) steps every iteration, the generator every
        # `dfake_gen_update_ratio`-th; DM timesteps U[t_min, t_max] (optionally shifted).
        # `regression_weight` > 0 adds DMD1's regression on teacher ODE pairs (`regression_pairs`, a
        # .npz from `python -m qwen_jax.distillation.ode_pairs`): it pins the noise -> image map,
        # for the iterations before `regression_until` (0: all of them); DMD2 + GAN alone after it.
        c.dmd2 = ml_collections.ConfigDict(dict(dfake_gen_update_ratio=5, t_min=0.02, t_max=0.98, dm_shift=0.0,
                                                regression_weight=0.0, regression_pairs="", regression_until=0))
        c.critic_optim = ml_collections.ConfigDict(dict(
            lr=1e-5, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, schedule="constant",
            final_lr_fraction=0.0, grad_clip=10.0))
        # GAN: heads on the image tokens of blocks at these depth fractions of `backbone` ("fake":
        # the fake score, trained by the D loss too, as DMD2; "teacher": frozen, heads only).
        # weight 0 disables it. `real_share`: the expected fraction of real rows in the GAN's real
        # pool; the others come from `teacher_pool`, teacher samples (`distillation/real_pool.py`).
        # `t_max` > 0: the GAN noises real and fake to its own t' ~ U[dmd2.t_min, t_max] rather than
        # the DM loss's t (0: the same t, as DMD2). `head_lr_scale`: the heads' learning rate over
        # critic_optim.lr (Adam ignores the loss weight, so this sets how fast they learn).
        # `projection`: the heads also judge each image against its caption (`heads.py`).
        c.gan = ml_collections.ConfigDict(dict(
            gen_weight=5e-3, disc_weight=1e-2, backbone="fake", blocks=(0.5, 0.75, 1.0), kind="softplus",
            real_share=1.0, teacher_pool="", t_max=0.0, head_lr_scale=1.0, projection=False))
        c.optim.update(b1=0.0, grad_clip=10.0)
    # `python -m qwen_jax.plan`: the jobs it compiles, the device memory they must fit (GiB, 0:
    # unknown), the sampling job's size (2-step student, no CFG) and its "sequence" mesh axis
    # (image tokens split over that many devices; the mesh's fsdp -1 fills the rest). `layers` > 0
    # compiles the first blocks only (quick checks; the numbers are then not the real model's).
    c.plan = ml_collections.ConfigDict(dict(
        jobs=("generator", "critic") if objective == "dmd2" else (), hbm_gib=0.0, sample_batch=4,
        sample_resolution=2048, sequence=1, layers=0))
    if variant == "qwen_image":
        c.model.update(lora_rank=64, lora_alpha=64.0)
        c.data.batch_size = 16
        c.distill.guidance = 4.0
        c.eval.update(every=500, prompts=QWEN_IMAGE_PROMPTS)
    elif variant == "toy":  # the committed teacher, loaded as it is (qwen_jax/toy/folders.py)
        c.model.update(pretrained=str(TEACHER), dtype="float32", remat="none", scan_unroll=4,  # 4 blocks: unrolled
                       encoder_dtype="float32")
        c.data.update(toy=True, num_threads=2, prefetch=4, text_bucket=16)
        c.ema.decay = 0.99
        c.distill.guidance = 2.0
        c.checkpoint.update(every=250, keep=2)
        c.log.update(every=25)
        c.eval.update(every=500, width=32, height=32, prompts=TOY_PROMPTS)
    else:
        raise ValueError(f"unknown distillation variant {variant!r}")
    return c
