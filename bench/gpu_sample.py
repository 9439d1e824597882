"""Full-size sampling speed on a GPU: the real 20B transformer and the real VAE, random weights.

Measures, in bf16 with cuDNN attention:
  * student: 2 steps (sigmas 1.0, 0.75, no CFG) for a batch of images at 2K (2048x2048) + VAE decode;
  * teacher: one true-CFG step (two branches batched) at 1328x1328, to extrapolate 50 steps.
Text states are random (B, 128, 3584) arrays: the text encoder is timed separately elsewhere.
Prints one JSON line. Run on a GPU machine: PYTHONPATH=. python bench/gpu_sample.py [--batch 4]
(`--tiny` runs the same code on small configs, to check the script on a CPU).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import flow
from qwen_jax.models import AutoencoderKLQwenImage, QwenImageTransformer, TransformerConfig, VAEConfig
from qwen_jax.models.latents import denormalize_latents, unpack_latents
from qwen_jax.sampling import sampler


def build(make):
    """A model with random parameters created directly on the device (no host copy)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(make(nnx.Rngs(0)))[1], out_shardings=None)()
    return graphdef, state


def seconds(fn, reps=3):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)), 3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.tiny:
        tcfg = TransformerConfig.tiny(in_channels=64, out_channels=16, joint_attention_dim=3584)
        vcfg, size, teacher_size = VAEConfig.tiny(z_dim=16, dim_mult=(1, 2, 2, 2), temperal_downsample=(False, True, True),
                                                  latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16), 256, 128
        attention = "xla"
    else:
        tcfg, vcfg, size, teacher_size, attention = TransformerConfig.qwen_image(), VAEConfig.qwen_image(), 2048, 1328, "cudnn"
    tcfg = tcfg.replace(param_dtype="bfloat16", dtype="bfloat16", attention=attention)
    vcfg = vcfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    result = {"bench": "gpu_sample", "device": str(jax.devices()[0]), "jax": jax.__version__, "batch": args.batch}

    start = time.perf_counter()
    graphdef, state = build(lambda r: QwenImageTransformer(tcfg, rngs=r))
    vae_graphdef, vae_state = build(lambda r: AutoencoderKLQwenImage(vcfg, rngs=r))
    jax.block_until_ready(state)
    result["init_s"] = round(time.perf_counter() - start, 1)
    decode = jax.jit(lambda s, z: nnx.merge(vae_graphdef, s).decode(z))

    def run(size, batch, sigmas, cfg):
        grid = (1, size // 16, size // 16)
        key = jax.random.key(0)
        latents = jax.random.normal(key, (batch, grid[1] * grid[2], 64), jnp.bfloat16)
        text = jax.random.normal(key, (batch, 128, 3584), jnp.bfloat16)
        mask = jnp.ones((batch, 128), jnp.int32)
        neg = (text, mask) if cfg else (None, None)
        times = jnp.asarray(flow.model_time(sigmas[:-1]))

        def call():
            out = sampler.sample(graphdef, state, latents, jnp.asarray(sigmas), times, text, mask, *neg,
                                 jnp.float32(4.0), img_shapes=(grid,))
            if cfg:
                return out
            z = denormalize_latents(unpack_latents(out, 2 * grid[1], 2 * grid[2]), vcfg.latents_mean, vcfg.latents_std)
            return decode(vae_state, z)

        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        return round(first, 1), seconds(call)

    compile_s, student_s = run(size, args.batch, sampler.student_sigmas(2), cfg=False)
    result.update({f"student_2step_{size}px_first_call_s": compile_s, f"student_2step_{size}px_s": student_s,
                   "student_s_per_image": round(student_s / args.batch, 3)})
    compile_s, step_s = run(teacher_size, 1, flow.sampling_sigmas(sigmas=[1.0], cfg=flow.SchedulerConfig.fixed_shift(1.0)), cfg=True)
    result.update({f"teacher_cfg_step_{teacher_size}px_s": step_s, "teacher_50_steps_estimate_s": round(50 * step_s, 1)})
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_gib"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
