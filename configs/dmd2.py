"""DMD2 + GAN, the 2-step student: `python -m qwen_jax.train --config=configs/dmd2.py[:VARIANT]`.

Variants:
  qwen_image  (default) the project's main job on Qwen-Image (20B): LoRA rank 64 student and
              fake score on one shared frozen base (attention, MLP, modulation), bf16 compute,
              full remat, FSDP over all devices; teacher CFG 4 with norm rescale; critic every
              iteration, generator every 5th; GAN heads on the fake score at 50/75/100 % depth.
              Warm-start from PCM with --config.distill.student_init=... (full-weight students).
  toy         the toy world: full weights from the committed toy teacher (`make demo` assembles
              it into runs/demo/teacher), CFG 2; add --config.distill.student_init=PCM_EXPORT/transformer.
"""

from qwen_jax.distillation.defaults import distill_config

VARIANTS = ("qwen_image", "toy")


def get_config(arg: str | None = None):
    variant = arg or "qwen_image"
    if variant not in VARIANTS:
        raise ValueError(f"configs/dmd2.py: unknown variant {variant!r}; choose from {VARIANTS}")
    c = distill_config("dmd2", variant)
    if variant == "qwen_image":
        c.total_steps = 10000  # iterations: 2000 generator updates at ratio 5
        c.optim.update(lr=5e-5, b1=0.0, grad_clip=1.0, weight_decay=0.01)
        c.critic_optim.update(lr=2e-5, b1=0.0, grad_clip=1.0)
        c.dmd2.dm_shift = 3.0
    else:
        c.total_steps = 2000
        c.data.batch_size = 32
        c.optim.update(lr=1e-4, warmup_steps=0)
        c.critic_optim.update(lr=1e-4)
    return c
