"""Flow-matching fine-tuning: `python -m qwen_jax.train --config=configs/flow_matching.py[:VARIANT]`.

Variants:
  qwen_image   (default) LoRA rank 64 on Qwen-Image (attention, MLP, modulation), bf16 compute,
               fp32 master weights, full remat, FSDP over all devices; 1328^2 buckets.
  qwen_image_full  the same with every weight trained (needs FSDP over >= 16 80 GB chips).
  tiny         a CPU-sized run for tests and smoke checks: set --config.model.pretrained to a
               tiny pipeline folder and --config.data.images to a folder.
"""

from qwen_jax.training.defaults import base_config

VARIANTS = ("qwen_image", "qwen_image_full", "tiny")


def get_config(arg: str | None = None):
    variant = arg or "qwen_image"
    if variant not in VARIANTS:
        raise ValueError(f"configs/flow_matching.py: unknown variant {variant!r}; choose from {VARIANTS}")
    c = base_config()
    c.objective = "flow_matching"
    c.flow_matching = dict(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=0.0)

    if variant.startswith("qwen_image"):
        c.total_steps = 2000
        c.model.lora_rank = 0 if variant == "qwen_image_full" else 64
        c.model.lora_alpha = 64.0
        c.optim.lr = 1e-5 if variant == "qwen_image_full" else 1e-4
        c.optim.warmup_steps = 100
        c.data.batch_size = 16
        c.eval.every = 250
        c.eval.prompts = ("A red fox in the snow, watercolor.", "A neon sign that says 'qwen_jax', photo at night.")
    elif variant == "tiny":
        c.total_steps = 20
        c.model.update(pretrained="", dtype="float32", remat="none", encoder_dtype="float32")
        c.data.update(batch_size=8, resolution=64, num_threads=0, prefetch=0)
        c.optim.update(lr=1e-3, warmup_steps=2, schedule="cosine")
        c.checkpoint.update(every=5, keep=2)
        c.log.update(every=1, progress=False)
        c.eval.update(every=10, prompts=("a red circle", "a blue square"), width=32, height=32, num_steps=4)
    return c
