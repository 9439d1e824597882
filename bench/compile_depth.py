"""Compile time against depth: the jitted forward and the jitted flow-matching train step at 2, 8 and 32
blocks (and 60, the real depth, with --full) for a fixed width, CPU.

The blocks are stacked and run by one `jax.lax.scan` (qwen_jax/models/stack.py), so the traced
program holds one block whatever the depth and compile time should stay flat. Width: forward.py's
model (12 heads x 64, text dim 3584; --quick: 4 x 32, text 256). Inputs are abstract
(`jax.ShapeDtypeStruct`), so nothing is allocated and deep models cost nothing but compile time.

  forward     jax.jit(merge(graphdef, state)(x, txt, mask, t, img_shapes)), batch 1, 1024 image +
              64 text tokens (forward.py's jitted function);
  train_step  qwen_jax.training.flow_matching.train_step (value_and_grad + clip + AdamW, the
              configs/flow_matching.py "tiny" optimizer) jitted as flow_matching.Trainer jits it
              (state shardings, donated state, 1-device mesh), lowered under jax.set_mesh; batch 2,
              for remat "none" (train_step.py's setting) and "full" (the real jobs').

Each time is lower + compile wall seconds with a fresh jit object after jax.clear_caches(), the
median of --repeats measurements taken round-robin over the depths (so load drifts hit every
depth alike), with the process's CPU seconds over the same span (which a busy machine does not
inflate). ratio_* = time at the deepest / time at depth 2. Prints one JSON line on stdout.

Run: .venv/bin/python bench/compile_depth.py [--full] [--repeats 3] [--quick]
"""

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, log, versions

from qwen_jax import sharding as sharding_lib
from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.training import state as state_lib
from qwen_jax.training.flow_matching import train_step
from qwen_jax.training.optim import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
WIDTH = dict(in_channels=64, out_channels=16, attention_head_dim=64, num_attention_heads=12,
             joint_attention_dim=3584, axes_dims_rope=(16, 24, 24))
LATENT_HW, N_TXT = 64, 64
QUICK_WIDTH = dict(in_channels=64, out_channels=16, attention_head_dim=32, num_attention_heads=4,
                   joint_attention_dim=256, axes_dims_rope=(8, 12, 12))
QUICK_LATENT_HW, QUICK_N_TXT = 32, 16


def load_config():
    spec = importlib.util.spec_from_file_location("flow_matching_config", ROOT / "configs" / "flow_matching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.ema.decay = 0.0
    return config


def abstract_params(cfg: TransformerConfig):
    """(graphdef, trainable tree of ShapeDtypeStructs): the model's structure, nothing allocated."""
    model = nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = state_lib.split_trainable(model, lora=False)
    return graphdef, params, frozen


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(); CPU time is what the load does not inflate."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def forward_seconds(cfg: TransformerConfig, hw: int, n_txt: int) -> tuple[float, float]:
    graphdef, params, frozen = abstract_params(cfg)
    n_img = (hw // 2) ** 2
    img_shapes = ((1, hw // 2, hw // 2),)
    x = jax.ShapeDtypeStruct((1, n_img, cfg.in_channels), jnp.float32)
    txt = jax.ShapeDtypeStruct((1, n_txt, cfg.joint_attention_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, n_txt), jnp.int32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    fwd = jax.jit(lambda p, x, txt, mask, t: state_lib.merge_model(graphdef, p, frozen)(x, txt, mask, t, img_shapes))
    return timed(lambda: fwd.lower(params, x, txt, mask, t).compile())


def train_step_seconds(cfg: TransformerConfig, config, hw: int, n_txt: int, batch: int = 2) -> tuple[float, float]:
    graphdef, params, frozen = abstract_params(cfg)
    mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    shardings = state_lib.state_shardings(tx, params, mesh, ema=False)
    state = state_lib.abstract_train_state(tx, params, shardings)
    batch_spec = {"latents": jax.ShapeDtypeStruct((batch, hw, hw, cfg.in_channels // 4), jnp.float32),
                  "prompt_embeds": jax.ShapeDtypeStruct((batch, n_txt, cfg.joint_attention_dim), jnp.float32),
                  "prompt_mask": jax.ShapeDtypeStruct((batch, n_txt), jnp.int32)}
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, config=config),
        in_shardings=(shardings, state_lib.tree_shardings(frozen, mesh), None),
        out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
    def compile_():
        with jax.set_mesh(mesh):
            step_fn.lower(state, frozen, batch_spec).compile()

    return timed(compile_)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="add the real depth, 60 blocks")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per depth and program (median)")
    parser.add_argument("--quick", action="store_true", help="a tiny width and depths 2 and 8, for a smoke run")
    args = parser.parse_args()
    width, hw, n_txt = (QUICK_WIDTH, QUICK_LATENT_HW, QUICK_N_TXT) if args.quick else (WIDTH, LATENT_HW, N_TXT)
    depths = [2, 8] if args.quick else [2, 8, 32] + ([60] if args.full else [])
    config = load_config()
    programs = {
        "forward": lambda cfg: forward_seconds(cfg, hw, n_txt),
        "train_step_remat_none": lambda cfg: train_step_seconds(cfg, config, hw, n_txt),
        "train_step_remat_full": lambda cfg: train_step_seconds(cfg.replace(remat="full"), config, hw, n_txt),
    }
    times = {name: {d: [] for d in depths} for name in programs}
    cpu_times = {name: {d: [] for d in depths} for name in programs}
    for rep in range(args.repeats):
        for name, fn in programs.items():
            for d in depths if rep % 2 == 0 else depths[::-1]:
                jax.clear_caches()  # no reuse of an earlier trace or executable
                cfg = TransformerConfig(num_layers=d, **width, dtype="float32", param_dtype="float32", remat="none")
                wall, cpu = fn(cfg)
                times[name][d].append(wall)
                cpu_times[name][d].append(cpu)
                log(f"rep {rep + 1}/{args.repeats} {name} depth {d}: {wall:.2f} s wall, {cpu:.2f} s CPU")

    medians = {name: {str(d): round(statistics.median(v), 2) for d, v in per.items()} for name, per in times.items()}
    mins = {name: {str(d): round(min(v), 2) for d, v in per.items()} for name, per in times.items()}
    cpu = {name: {str(d): round(statistics.median(v), 2) for d, v in per.items()} for name, per in cpu_times.items()}
    deepest = str(depths[-1])
    print(json.dumps({
        "bench": "compile_depth",
        "device": device_info(),
        "versions": versions(torch=False),
        "config": {"size": "quick" if args.quick else "forward.py's width", **width,
                   "axes_dims_rope": list(width["axes_dims_rope"]), "dtype": "float32",
                   "image_tokens": (hw // 2) ** 2, "text_tokens": n_txt, "forward_batch": 1, "train_batch": 2,
                   "optimizer": "adamw + clip (configs/flow_matching.py tiny)"},
        "depths": depths,
        "repeats": args.repeats,
        "compile_s_median": medians,  # lower + compile, seconds
        "compile_s_min": mins,
        "compile_cpu_s_median": cpu,  # CPU seconds of the process (all threads): robust to a loaded machine
        "ratio_deepest_to_2": {name: round(medians[name][deepest] / medians[name]["2"], 2) for name in programs},
        "ratio_deepest_to_2_cpu": {name: round(cpu[name][deepest] / cpu[name]["2"], 2) for name in programs},
    }))


if __name__ == "__main__":
    main()
