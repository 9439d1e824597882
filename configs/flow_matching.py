"""Flow-matching fine-tuning: `python -m qwen_jax.train --config=configs/flow_matching.py[:VARIANT]`.

Variants:
  qwen_image   (default) LoRA rank 64 on Qwen-Image (attention, MLP, modulation), bf16 compute,
               fp32 master weights, full remat, FSDP over all devices; 1328^2 buckets.
  qwen_image_full  the same with every weight trained (needs FSDP over >= 16 80 GB chips).
  tiny         a CPU-sized run for tests and smoke checks: set --config.model.pretrained to a
               tiny pipeline folder and --config.data.images to a folder.
  toy          the toy world's teacher (qwen_jax.toy): 32x32 procedural shapes, from the toy family's
               random transformer (models/toy/init, built on first use), CFG dropout.
  toy_px2      the same recipe with 2x2-pixel tokens (models/toy/init_px2): 256 image tokens, about
               3.7x the compute per image (docs/toy_world.md, "Toward the v2 teacher").
"""

from qwen_jax.toy.folders import INIT, INIT_PX2
from qwen_jax.training.defaults import base_config

VARIANTS = ("qwen_image", "qwen_image_full", "tiny", "toy", "toy_px2")


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
    elif variant.startswith("toy"):
        # The committed teacher's recipe (models/toy/teacher): 6284 steps of 128 (5 min on one H100,
        # about 2 h on a 2-core CPU); the learning rate is constant after warm-up. That teacher
        # started from the family's v1 random transformer; models/toy/init is v2 (adaLN-zero), so
        # this command now trains the same recipe from a different start (docs/toy_world.md).
        c.total_steps = 6284
        # scan_unroll 4: the toy's 4 blocks unrolled train ~15 % faster on CPU (models/config.py).
        c.model.update(pretrained=str(INIT_PX2 if variant == "toy_px2" else INIT), dtype="float32", remat="none",
                       scan_unroll=4, encoder_dtype="float32")
        c.data.update(toy=True, batch_size=128, caption_dropout=0.1, num_threads=2, prefetch=4,
                      text_bucket=16)  # captions are ~10 tokens: pad to 16, not 64
        c.flow_matching.shift = 3.0  # train where the shift-3 sampling grid spends its steps
        c.optim.update(lr=5e-4, warmup_steps=500, weight_decay=0.0)
        c.ema.decay = 0.999
        c.checkpoint.update(every=1000, keep=3)
        c.log.update(every=50)
        c.eval.update(every=2000, width=32, height=32, num_steps=50, guidance=2.0, prompts=(
            "a red circle on a blue background", "a green square on a black background",
            "a white triangle on a magenta background", "a cyan square on a yellow background"))
    return c
