"""2-step sampling benchmark: qwen_jax's Pipeline vs diffusers' QwenImagePipeline, same components, CPU fp32.

A mid-size random Qwen-Image (transformer 4 blocks x 12 heads x 64; 3-layer Qwen2.5-VL text encoder of
width 256, real 151,936 vocab and real Qwen tokenizer built offline; 8x VAE, base_dim 32, z_dim 16) is
saved by diffusers, converted as tools/convert_weights.py does and loaded by `Pipeline.from_pretrained`.
Both run the few-step student setting (fixed shift 3, sigmas [1.0, 0.5] -> 1.0, 0.75; 2 steps; guidance
1, no CFG) from the same packed initial latents. Measured:
  * max_abs_diff: largest pixel difference of the two image batches (in [0, 1]; must be <= 1e-3);
  * qwen_jax_ms / diffusers_ms: median whole pipeline call (text encoding, 2 transformer steps, VAE
    decode, images to numpy), compile excluded, interleaved runs; speedup = diffusers_ms / qwen_jax_ms;
    *_min_ms are the fastest runs (torch's OpenMP suffers more than XLA from a loaded machine);
  * qwen_jax_compile_s: first call minus the steady median (tracing + XLA compilation);
  * stages_ms: medians of the same work split into text encoding, sampling and decoding.
Prints one JSON line on stdout; progress goes to stderr. Takes a few minutes at the defaults.

Run: .venv/bin/python bench/sample.py [--reps 5] [--size 512] [--batch 1]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline  # noqa: E402

from qwen_jax import flow  # noqa: E402
from qwen_jax.conversion.pipeline import convert_pipeline  # noqa: E402
from qwen_jax.models.text_encoder import TextEncoderConfig  # noqa: E402
from qwen_jax.models.vae import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD  # noqa: E402
from qwen_jax.pipeline import Pipeline  # noqa: E402
from qwen_jax.sampling import sampler  # noqa: E402
from qwen_tokenizer import build_qwen_tokenizer  # noqa: E402
from reference import torch_transformer  # noqa: E402
from test_text_encoder import torch_text_encoder  # noqa: E402

TRANSFORMER = dict(in_channels=64, out_channels=16, num_layers=4, attention_head_dim=64, num_attention_heads=12,
                   joint_attention_dim=256, axes_dims_rope=(16, 24, 24))
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
VAE = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
PROMPTS = ["A red fox in the snow at dawn, watercolor, soft light, pine trees in the background.",
           "A cup of coffee on a wooden table, photograph."]
SIGMAS = [1.0, 0.5]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def torch_vae(seed=0):
    """Random VAE: gammas around 1, small biases, convs scaled by 1/sqrt(2-D fan-in)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**VAE, latents_mean=list(QWEN_LATENTS_MEAN), latents_std=list(QWEN_LATENTS_STD))
    with torch.no_grad():
        for key, p in vae.named_parameters():
            if key.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                gain = 0.5 if key.startswith("decoder.conv_out") else 1.0  # keep most pixels inside the clamp
                p.copy_(gain * torch.randn_like(p) / (p.shape[1] * p.shape[-1] * p.shape[-2]) ** 0.5)
    return vae.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs per pipeline (interleaved)")
    parser.add_argument("--size", type=int, default=512, help="image height and width (multiple of 16)")
    parser.add_argument("--batch", type=int, default=1, choices=(1, 2), help="number of prompts")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())  # use every core, as XLA's CPU backend does
    size, prompts = args.size, PROMPTS[: args.batch]
    grid, n_img = (1, size // 16, size // 16), (size // 16) ** 2

    log("building the random diffusers pipeline")
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=3.0, shift_terminal=None),
        vae=torch_vae(), text_encoder=torch_text_encoder(TextEncoderConfig.tiny(**TEXT), seed=1),
        tokenizer=build_qwen_tokenizer(), transformer=torch_transformer(**TRANSFORMER))
    pipe.set_progress_bar_config(disable=True)
    diffusers.utils.logging.set_verbosity_error()  # batch-1 masks are None: silence the per-call warning
    with tempfile.TemporaryDirectory() as tmp:
        log("saving and converting it for qwen_jax")
        pipe.save_pretrained(Path(tmp) / "diffusers")
        convert_pipeline(Path(tmp) / "diffusers", Path(tmp) / "jax", progress=False)
        ours = Pipeline.from_pretrained(Path(tmp) / "jax", scheduler=flow.SchedulerConfig.fixed_shift(3.0))
    latents = torch.randn(len(prompts), n_img, 64, generator=torch.Generator().manual_seed(0))
    lat_np, lat_j, common = latents.numpy(), jnp.asarray(latents.numpy()), dict(height=size, width=size)

    def run_jax():
        return ours(prompts, **common, num_steps=2, guidance=1.0, sigmas=SIGMAS, latents=lat_np).array

    def run_torch():
        with torch.inference_mode():
            return pipe(prompt=prompts, **common, sigmas=SIGMAS, true_cfg_scale=1.0, num_inference_steps=2,
                        latents=latents, output_type="np").images

    def stages_jax():  # the body of Pipeline.__call__, synchronised after each stage
        t, (text, mask) = [time.perf_counter()], ours.encode_prompt(prompts)
        text, mask = jax.block_until_ready(sampler.pad_text(text, mask, sampler.bucket_length(text.shape[1])))
        t.append(time.perf_counter())
        sig = ours.sigmas(2, n_img, SIGMAS)
        out = sampler.sample(ours.graphdef, ours.state, lat_j, jnp.asarray(sig), jnp.asarray(flow.model_time(sig[:-1])),
                             text, mask, None, None, jnp.float32(1.0), jax.random.key(0), img_shapes=(grid,))
        out.block_until_ready()
        t.append(time.perf_counter())
        np.asarray(ours.decode_latents(out, size, size))
        t.append(time.perf_counter())
        return np.diff(t) * 1e3

    def stages_torch():  # the same stages through diffusers' own pieces
        with torch.inference_mode():
            t = [time.perf_counter()]
            emb, mask = pipe.encode_prompt(prompts, max_sequence_length=512)
            t.append(time.perf_counter())
            lat = pipe(prompt_embeds=emb, prompt_embeds_mask=mask, **common, sigmas=SIGMAS, true_cfg_scale=1.0,
                       num_inference_steps=2, latents=latents, output_type="latent").images
            t.append(time.perf_counter())
            z, cfg = pipe._unpack_latents(lat, size, size, pipe.vae_scale_factor), pipe.vae.config
            std, mean = (torch.tensor(v)[:, None, None, None] for v in (cfg.latents_std, cfg.latents_mean))
            z = z * std + mean  # diffusers' denormalisation
            pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0][:, :, 0], output_type="np")
            t.append(time.perf_counter())
        return np.diff(t) * 1e3

    log("first qwen_jax call (compiles)")
    start = time.perf_counter()
    img_j, first_s = run_jax(), time.perf_counter() - start
    img_t = run_torch()
    stages_jax(), stages_torch()  # warm the per-stage path too
    max_abs = float(np.abs(img_j.astype(np.float64) - img_t).max())
    log(f"max_abs_diff {max_abs:.2e}, image std {img_t.std():.3f}, first qwen_jax call {first_s:.1f} s")

    times, stages = {"qwen_jax": [], "diffusers": []}, {"qwen_jax": [], "diffusers": []}
    for i in range(args.reps):
        # Alternate which side goes first so slow drifts in machine load do not favour one.
        order = [("qwen_jax", run_jax, stages_jax), ("diffusers", run_torch, stages_torch)]
        for name, fn, staged in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
            stages[name].append(staged())
        log(f"rep {i}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()))
    med = {k: float(np.median(v)) for k, v in times.items()}
    stage_ms = {k: dict(zip(("text_encode", "sample_2_steps", "vae_decode"),
                            np.round(np.median(np.array(v), axis=0), 1).tolist())) for k, v in stages.items()}

    print(json.dumps({
        "bench": "sample", "device": {"platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(),
                   "loadavg_1m": round(os.getloadavg()[0], 2)},  # >cpu_count means the timings are contended
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": {"transformer": {**TRANSFORMER, "axes_dims_rope": list(TRANSFORMER["axes_dims_rope"])},
                   "text_encoder": {**TEXT, "vocab_size": 151936}, "vae": VAE, "dtype": "float32",
                   "batch": len(prompts), "height": size, "width": size, "image_tokens": n_img,
                   "steps": 2, "sigmas": SIGMAS, "shift": 3.0, "guidance": 1.0},
        "reps": args.reps, "max_abs_diff": max_abs,
        "qwen_jax_ms": round(med["qwen_jax"], 1), "diffusers_ms": round(med["diffusers"], 1),
        "speedup": round(med["diffusers"] / med["qwen_jax"], 3),
        "qwen_jax_min_ms": round(min(times["qwen_jax"]), 1), "diffusers_min_ms": round(min(times["diffusers"]), 1),
        "speedup_min": round(min(times["diffusers"]) / min(times["qwen_jax"]), 3),
        "goal_speedup": 2.0,
        "qwen_jax_first_call_s": round(first_s, 2),
        "qwen_jax_compile_s": round(first_s - med["qwen_jax"] / 1e3, 2),
        "stages_ms": stage_ms,
    }))


if __name__ == "__main__":
    main()
