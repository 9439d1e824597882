"""PCM warm start of the 2-step student: `python -m qwen_jax.train --config=configs/pcm.py[:VARIANT]`.

Variants:
  qwen_image  (default) Qwen-Image, LoRA rank 64 (attention, MLP, modulation), bf16 compute, full
              remat, FSDP over all devices; teacher CFG 4; 2 phases at shift 3 (edge sigma 0.75).
  toy         the toy world: full weights from the committed toy teacher (models/toy/teacher,
              loaded as it is), CFG 2 as the teacher is sampled.
The export (<workdir>/export) is the warm start of configs/dmd2.py (`--config.distill.student_init`).
"""

from qwen_jax.distillation.defaults import distill_config

VARIANTS = ("qwen_image", "toy")


def get_config(arg: str | None = None):
    variant = arg or "qwen_image"
    if variant not in VARIANTS:
        raise ValueError(f"configs/pcm.py: unknown variant {variant!r}; choose from {VARIANTS}")
    c = distill_config("pcm", variant)
    if variant == "qwen_image":
        c.total_steps = 10000
        c.optim.update(lr=5e-6, warmup_steps=100)
    else:
        c.total_steps = 1000
        c.data.batch_size = 64
        c.optim.update(lr=1e-4, warmup_steps=100)
    return c
