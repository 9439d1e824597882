"""DMD2 + GAN, the 2-step student: `python -m qwen_jax.train --config=configs/dmd2.py[:VARIANT]`.

Variants:
  qwen_image  (default) the project's main job on Qwen-Image (20B): LoRA rank 64 student and
              fake score on one shared frozen base (attention, MLP, modulation), bf16 compute,
              full remat, FSDP over all devices; teacher CFG 4 with norm rescale; critic every
              iteration, generator every 5th; GAN heads on the fake score at 50/75/100 % depth.
              Warm-start from PCM with --config.distill.student_init=... (full-weight students).
  toy         the toy world: full weights from the committed toy teacher (models/toy/teacher,
              loaded as it is), CFG 2 below sigma 0.5, GAN 0.05 / 0.1, 1000 iterations;
              add --config.distill.student_init=PCM_EXPORT/transformer (and, as
              `python -m qwen_jax.toy.distill` does, --config.total_steps=1750
              --config.dmd2.regression_weight=1 --config.dmd2.regression_pairs=PAIRS.npz
              --config.dmd2.regression_until=1000: the regression, then DMD2 + GAN alone).

Mesh presets (`python -m qwen_jax.plan --config=configs/dmd2.py:<preset> --devices N` compiles
them for N simulated devices; docs/scaling.md has the numbers):
  lora_h100x8   qwen_image on 8 x H100 80 GB: FSDP 8, batch 16 at 1328^2.
  full_v5e64    full-weight student and fake score on 64 x TPU v5e 16 GB: FSDP 64, bf16 storage
                (the frozen teacher, both trees and Adam's moments), no EMA, batch 64 at 1024^2,
                GAN heads on the frozen teacher.
  full_v5p32    full-weight student and fake score on 32 x TPU v5p 95 GB: FSDP 32, fp32
                storage, EMA, batch 32 at 1328^2.
  sample_2k     the 2-step student sampling four 2048^2 images on 8 x H100: mesh FSDP 4 x
                sequence 2, each image's 16,384 tokens split over 2 devices, the bf16 weights
                over all 8.
"""

from qwen_jax.distillation.defaults import distill_config

VARIANTS = ("qwen_image", "toy", "lora_h100x8", "full_v5e64", "full_v5p32", "sample_2k")


def get_config(arg: str | None = None):
    variant = arg or "qwen_image"
    if variant not in VARIANTS:
        raise ValueError(f"configs/dmd2.py: unknown variant {variant!r}; choose from {VARIANTS}")
    c = distill_config("dmd2", "toy" if variant == "toy" else "qwen_image")
    if variant != "toy":
        c.total_steps = 10000  # iterations: 2000 generator updates at ratio 5
        c.optim.update(lr=5e-5, b1=0.0, grad_clip=1.0, weight_decay=0.01)
        c.critic_optim.update(lr=2e-5, b1=0.0, grad_clip=1.0)
        c.dmd2.dm_shift = 3.0
    else:
        # The toy recipe (docs/distillation.md, "Toy results"): 1000 iterations; a GAN ten times
        # DMD2's weights; the real score guided only below sigma 0.5, where shapes are drawn, not
        # placed. `python -m qwen_jax.toy.distill` adds the regression on teacher pairs for 1000
        # iterations, then 750 without it.
        c.total_steps = 1000
        c.data.batch_size = 32
        c.optim.update(lr=1e-4, warmup_steps=0)
        c.critic_optim.update(lr=1e-4)
        c.gan.update(gen_weight=0.05, disc_weight=0.1)
        c.distill.guidance_interval = (0.0, 0.5)
    if variant == "lora_h100x8":  # two 1328^2 images per device: 37 GiB planned of the 80 (docs/scaling.md)
        c.mesh.update(data=1, fsdp=8, tensor=1)
        c.data.batch_size = 16
        c.plan.hbm_gib = 80.0
    elif variant in ("full_v5e64", "full_v5p32"):
        c.model.update(lora_rank=0, lora_alpha=0.0)
        devices = 64 if variant == "full_v5e64" else 32
        c.mesh.update(data=1, fsdp=devices, tensor=1)
        c.data.batch_size = devices
        if variant == "full_v5e64":  # 16 GB per chip: every lever that keeps the recipe intact
            c.model.param_dtype = "bfloat16"
            c.data.resolution = 1024
            # the critic then differentiates one pass, not three (on the fake score: 9 % to spare)
            c.gan.backbone = "teacher"
            c.ema.decay = 0.0
            c.plan.hbm_gib = 16.0
        else:
            c.ema.decay = 0.999
            c.plan.hbm_gib = 95.0
    elif variant == "sample_2k":
        c.model.update(lora_rank=0, lora_alpha=0.0, param_dtype="bfloat16")
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.plan.update(jobs=("sample",), sequence=2, hbm_gib=80.0)
    return c
