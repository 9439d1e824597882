"""The fields every training config has, with their defaults; `configs/<name>.py` start from here.

Override any field on the command line, e.g. `--config.optim.lr=3e-5 --config.mesh.fsdp=8`;
configs are locked, so a misspelled field is an error rather than a silently ignored flag.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "flow_matching"
    c.seed = 0
    c.total_steps = 1000

    # The pipeline folder (converted, diffusers, or hub id) providing the transformer to train and
    # the frozen VAE, text encoder and tokenizer. `transformer` overrides the transformer folder.
    c.model = ml_collections.ConfigDict(dict(
        pretrained="Qwen/Qwen-Image", transformer="", param_dtype="float32", dtype="bfloat16",
        attention="xla", remat="full", scan_unroll=1, lora_rank=0, lora_alpha=0.0, encoder_dtype="bfloat16"))  # alpha 0: = rank

    # Mesh axes sizes; one may be -1 (all remaining devices). Rules map logical axes to them.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    # Exactly one of images (folder or .jsonl of image + caption), cache (tools/cache_dataset.py)
    # and toy (the procedural toy world of qwen_jax.toy, drawn from toy_seed).
    c.data = ml_collections.ConfigDict(dict(
        images="", cache="", toy=False, toy_seed=0, batch_size=8, resolution=1328, buckets="", caption_dropout=0.1,
        uncond_prompt=" ", max_sequence_length=512, text_bucket=64, num_threads=4, prefetch=2))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, schedule="constant",
        final_lr_fraction=0.0, grad_clip=1.0))
    c.ema = ml_collections.ConfigDict(dict(decay=0.0))  # 0 disables the EMA copy

    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
    c.log = ml_collections.ConfigDict(dict(every=10, tensorboard=True, progress=True))
    # Sample grids written to TensorBoard and <workdir>/samples every `every` steps (0: never).
    c.eval = ml_collections.ConfigDict(dict(
        every=0, prompts=("a photo of a cat",), negative_prompt=" ", width=1024, height=1024, num_steps=30,
        guidance=4.0, seed=0, use_ema=True))
    # At the end of training: <workdir>/export/ as a pipeline folder (merged LoRA) and, under LoRA,
    # the adapters alone in diffusers/PEFT format.
    c.export = ml_collections.ConfigDict(dict(at_end=True, use_ema=True))
    # Multi-host: empty/-1 means "from the environment" (jax.distributed auto-detection).
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=-1, process_id=-1,
                                                   initialize=False))
    return c
