"""Roofline of `forward.py` on this CPU: how fast could any fp32 implementation of that forward be?

`forward.py`'s goal is a JAX forward 1.5x faster than diffusers'. Both run the same matrix
products in fp32, so neither can beat the machine's fp32 matmul rate. This script measures:
  * gemm_gflops: the best fp32 matmul rate of torch (MKL/oneDNN) and of XLA (jit) on this CPU,
    at the model's largest products (1088 x 768 @ 768 x 3072 and its transpose) and at 2048^3;
  * forward_gflop: the forward's matmul FLOPs, counted by `qwen_jax.plan.transformer_flops` (the
    blocks' projections, MLP and attention; the embeddings and modulation are left out, so this is
    a lower bound and the rates below are too);
  * torch_forward_min_ms: diffusers' forward on `forward.py`'s model, fastest of the runs, and
    the rate it reaches, torch_forward_gflops;
  * max_speedup_over_torch = gemm peak / torch's forward rate: what a forward that ran every
    FLOP at the peak matmul rate (no attention softmax, norms or memory traffic at all) would
    gain over diffusers. If it is below `goal_speedup`, the goal is out of reach on this machine.
Prints one JSON line.

Run: .venv/bin/python bench/roofline.py [--reps 7]
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import device_info, log, versions

from diffusers import QwenImageTransformer2DModel
from forward import ARCH, IMG_SHAPES, N_IMG, N_TXT
from qwen_jax.models import TransformerConfig
from qwen_jax.plan import Workload, transformer_flops

GEMMS = {"tokens_x_mlp_in": (N_IMG + N_TXT, 768, 3072), "tokens_x_mlp_out": (N_IMG + N_TXT, 3072, 768),
         "square_2048": (2048, 2048, 2048)}


def best_seconds(fn, reps: int) -> float:
    fn()  # warm-up (compile, allocation)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rates(reps: int) -> dict:
    rng = np.random.default_rng(0)
    rates = {}
    for name, (m, k, n) in GEMMS.items():
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
        flop = 2 * m * k * n
        rates[name] = {
            "torch": round(flop / best_seconds(lambda: torch.mm(ta, tb), reps) / 1e9, 1),
            "jax": round(flop / best_seconds(lambda: dot(ja, jb).block_until_ready(), reps) / 1e9, 1),
        }
        log(name, rates[name])
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    rates = gemm_rates(args.reps)
    peak = max(max(r.values()) for r in rates.values())

    log("timing diffusers' forward (forward.py's model)")
    model = QwenImageTransformer2DModel(patch_size=2, **ARCH).eval()
    x = torch.randn(1, N_IMG, 64)
    txt = torch.randn(1, N_TXT, 3584)
    t = torch.tensor([0.5])

    def forward():
        with torch.inference_mode():
            model(x, txt, None, t, list(IMG_SHAPES))

    torch_s = best_seconds(forward, args.reps)
    cfg = TransformerConfig(**ARCH)
    flop = transformer_flops(cfg, Workload(batch=1, image_tokens=N_IMG, text_tokens=N_TXT, forwards=1, grad_passes=0))
    torch_rate = flop / torch_s / 1e9
    bound = peak / torch_rate
    print(json.dumps({
        "bench": "roofline", "device": device_info(torch.get_num_threads()), "versions": versions(),
        "gemm_gflops": rates, "gemm_peak_gflops": peak,
        "forward_gflop": round(flop / 1e9, 2),
        "torch_forward_min_ms": round(1e3 * torch_s, 1), "torch_forward_gflops": round(torch_rate, 1),
        "torch_forward_share_of_peak": round(torch_rate / peak, 3),
        "min_forward_ms_at_peak": round(1e3 * flop / (peak * 1e9), 1),
        "max_speedup_over_torch": round(bound, 3), "goal_speedup": 1.5, "goal_reachable": bool(bound >= 1.5),
    }))


if __name__ == "__main__":
    main()
