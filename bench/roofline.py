"""Roofline of the CPU benchmarks: this machine's fp32 matmul peak, and each benchmark's share of it.

Every CPU benchmark runs the same matrix products in JAX and in PyTorch, in fp32; neither side
can beat the machine's fp32 matmul rate. This script measures that rate and then runs the
benchmarks (each in its own process, as `python bench/X.py` would), so that every ratio and
every share of the peak in its one JSON line comes from one run on one machine:

  * gemm_gflops: the best fp32 matmul rate of torch (MKL/oneDNN) and of XLA (jit) at the model's
    largest products (1088 x 768 @ 768 x 3072 and its transpose) and at 2048^3; the peaks are the
    best of each side (`gemm_peak_gflops`: {"xla", "torch", "max"});
  * per benchmark (`benchmarks`): the qwen_jax and PyTorch times (fastest runs: the least
    load-dependent), the ratio torch / jax and its goal, the benchmark's matmul GFLOP (counted
    by `qwen_jax.plan.transformer_flops`: the blocks' projections, MLP and attention, a backward
    twice a forward; embeddings, modulation, text encoder and VAE not counted, so rates and
    shares are lower bounds), each side's rate and share of its own peak, and
    `max_ratio_at_xla_peak`: the ratio a JAX side running every counted FLOP at XLA's peak
    would reach (softmax, norms and memory traffic free). Where that is below the goal the goal
    is above this machine's physical limit (`goal_within_physical_limit`: false); the
    share-of-peak goal (`goal_share_of_xla_peak`) applies regardless.

Benchmarks: forward.py (goal 1.2x diffusers and 80 % of XLA's peak), train_step.py (1.1x),
dmd2_step.py (1.1x; an iteration is 10 + k_gen + k_critic transformer forwards at its batch, see
`dmd2_forwards`) and sample.py (2x; its share covers the two transformer steps only). About 8
minutes on an idle 2-core machine; `--only forward,train_step` runs a subset. Trust only runs
whose `loadavg_1m` stays near the core count: torch suffers far more than XLA on a busy machine.

Run: .venv/bin/python bench/roofline.py [--reps 7] [--only NAMES]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import device_info, log, versions

from forward import N_IMG, N_TXT
from qwen_jax.models import TransformerConfig
from qwen_jax.plan import Workload, transformer_flops

BENCH_DIR = Path(__file__).resolve().parent
GEMMS = {"tokens_x_mlp_in": (N_IMG + N_TXT, 768, 3072), "tokens_x_mlp_out": (N_IMG + N_TXT, 3072, 768),
         "square_2048": (2048, 2048, 2048)}
GOALS = {"forward": 1.2, "train_step": 1.1, "dmd2_step": 1.1, "sample": 2.0}
GOAL_SHARE = {"forward": 0.8}  # of XLA's fp32 GEMM peak


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
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    # Three passes over the shapes, each side's best kept: the first pass alone ran cold (clock
    # ramp-up, first-touch pages) and once put XLA's first shape at half its later rate.
    for _ in range(3):
        for name, (m, k, n) in GEMMS.items():
            a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            flop = 2 * m * k * n
            now = {"torch": round(flop / best_seconds(lambda: torch.mm(ta, tb), reps) / 1e9, 1),
                   "xla": round(flop / best_seconds(lambda: dot(ja, jb).block_until_ready(), reps) / 1e9, 1)}
            rates[name] = {side: max(rate, rates.get(name, {}).get(side, 0.0)) for side, rate in now.items()}
    for name, rate in rates.items():
        log(name, rate)
    return rates


def run_benchmark(name: str, args: list[str]) -> dict:
    """Runs bench/<name>.py in a child process; returns its JSON line."""
    log(f"running {name}.py {' '.join(args)}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py"), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench/{name}.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    log(f"  {name}.py took {time.perf_counter() - start:.0f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forward_flop(config: dict, batch: int, image_tokens: int, text_tokens: int) -> float:
    arch = {k: config[k] for k in ("in_channels", "out_channels", "num_layers", "attention_head_dim",
                                   "num_attention_heads", "joint_attention_dim")}
    cfg = TransformerConfig(**arch, axes_dims_rope=tuple(config["axes_dims_rope"]))
    work = Workload(batch=batch, image_tokens=image_tokens, text_tokens=text_tokens, forwards=1, grad_passes=0)
    return transformer_flops(cfg, work)


def dmd2_forwards(exit_steps: list[int]) -> int:
    """Transformer forwards (at the benchmark's batch) of one DMD2 iteration, a backward counted as two.

    Generator turn: k student steps without gradient, the student's x0 at step k with gradient
    (3), the CFG teacher on conditional + negative halves (2), the fake score (1). Critic turn:
    k student steps and one more for its sample (k + 1), the fake score's loss with gradient (3).
    """
    k_gen, k_critic = exit_steps
    return (k_gen + 3 + 2 + 1) + (k_critic + 1 + 3)


def summarise(name: str, line: dict, peaks: dict) -> dict:
    """Times, ratio, matmul GFLOP, rates and shares of one benchmark's JSON line."""
    cfg = line["config"]
    if name == "forward":
        jax_ms, torch_ms = line["jax_min_ms"], line["torch_min_ms"]
        flop = forward_flop(cfg, cfg["batch"], cfg["image_tokens"], cfg["text_tokens"])
        counted = "one forward"
    elif name == "train_step":
        jax_ms, torch_ms = line["jax_step_ms_min"], line["torch_step_ms_min"]
        flop = 3 * forward_flop(cfg, cfg["batch"], cfg["image_tokens"], cfg["text_tokens"])
        counted = "forward + backward"
    elif name == "dmd2_step":
        # Iteration i does the same work on both sides; its per-iteration ratio is the fairest.
        pairs = list(zip(line["jax_iter_ms"], line["torch_iter_ms"], line["exit_steps"]))
        jax_ms, torch_ms, exits = min(pairs, key=lambda p: p[0])
        unit = forward_flop(cfg, cfg["batch"], cfg["image_tokens"], cfg["text_tokens"])
        flop = dmd2_forwards(exits) * unit
        counted = f"{dmd2_forwards(exits)} forwards (exit steps {exits}) of the fastest JAX iteration"
    elif name == "sample":
        jax_ms, torch_ms = line["qwen_jax_min_ms"], line["diffusers_min_ms"]
        t = cfg["transformer"]
        arch = {**t, "out_channels": t.get("out_channels", 16)}
        flop = 2 * forward_flop(arch, cfg["batch"], cfg["image_tokens"], 0)
        stage = {side: line["stages_ms"][side]["sample_2_steps"] for side in ("qwen_jax", "diffusers")}
        counted = "the two transformer steps (text tokens, text encoder and VAE not counted)"
    else:
        raise ValueError(name)
    ratio = torch_ms / jax_ms
    # Rates over the whole benchmark time, except sampling: over its transformer stage.
    jax_s, torch_s = ((stage["qwen_jax"], stage["diffusers"]) if name == "sample" else (jax_ms, torch_ms))
    jax_rate, torch_rate = flop / (jax_s / 1e3) / 1e9, flop / (torch_s / 1e3) / 1e9
    max_ratio = (torch_s / 1e3) / (flop / (peaks["xla"] * 1e9))
    if name == "sample":  # the ceiling on the stage, applied to the whole pipeline's ratio
        max_ratio = torch_ms / (jax_ms - jax_s + 1e3 * flop / (peaks["xla"] * 1e9))
    row = {
        "jax_ms": round(jax_ms, 1), "torch_ms": round(torch_ms, 1), "ratio": round(ratio, 3),
        "goal_ratio": GOALS[name], "meets_goal_ratio": bool(ratio >= GOALS[name]),
        "gflop": round(flop / 1e9, 2), "gflop_counts": counted,
        "jax_gflops": round(jax_rate, 1), "torch_gflops": round(torch_rate, 1),
        "jax_share_of_xla_peak": round(jax_rate / peaks["xla"], 3),
        "torch_share_of_torch_peak": round(torch_rate / peaks["torch"], 3),
        "max_ratio_at_xla_peak": round(max_ratio, 3),
        "goal_within_physical_limit": bool(max_ratio >= GOALS[name]),
        "loadavg_1m": line["device"]["loadavg_1m"],
    }
    if name in GOAL_SHARE:
        row["goal_share_of_xla_peak"] = GOAL_SHARE[name]
        row["meets_goal_share"] = bool(jax_rate / peaks["xla"] >= GOAL_SHARE[name])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed GEMMs per framework and shape")
    parser.add_argument("--only", default=",".join(GOALS), help=f"comma-separated subset of {','.join(GOALS)}")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    if unknown := sorted(set(names) - set(GOALS)):
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {sorted(GOALS)}")
    torch.set_num_threads(os.cpu_count())

    rates = gemm_rates(args.reps)
    peaks = {side: max(r[side] for r in rates.values()) for side in ("xla", "torch")}
    peaks["max"] = max(peaks.values())
    rows = {name: summarise(name, run_benchmark(name, []), peaks) for name in names}
    print(json.dumps({
        "bench": "roofline", "device": device_info(torch.get_num_threads()), "versions": versions(),
        "gemm_gflops": rates, "gemm_peak_gflops": peaks, "benchmarks": rows,
        "all_goals_met": all(r["meets_goal_ratio"] and r.get("meets_goal_share", True) for r in rows.values()),
    }))


if __name__ == "__main__":
    main()
