"""Memory plan: compile the real 20B jobs for a simulated mesh and read XLA's own accounting.

    python -m qwen_jax.plan --config=configs/dmd2.py:lora_h100x8 --devices 8
    python -m qwen_jax.plan --config=configs/dmd2.py:full_v5e64 --devices 64
    python -m qwen_jax.plan --config=configs/dmd2.py:sample_2k --devices 8 --only sample

Nothing is allocated: the transformer is built abstractly (`jax.ShapeDtypeStruct` leaves carrying
their NamedShardings), the objective's train state is derived with `eval_shape`, and each job is
lowered and compiled for `--devices` fake CPU devices, with XLA:CPU's loop-invariant code motion
off (`ACCELERATOR_LIKE`: on CPU it hoists fp32 copies of whole bf16 weight stacks that GPU and
TPU compilers never make; `--cpu_hoisting` keeps it). For every job it prints, per device:

  compiled   XLA's memory analysis: arguments, outputs, temporaries, and the peak they imply
             (arguments + outputs - aliased (donated) + temporaries);
  floor      the analytic floor: every argument's bytes divided by the device count (what a
             perfect FSDP split would hold), plus the activations we estimate (`activation_bytes`),
             plus one block's weights as FSDP gathers them and, for what a job trains, that
             block's weight gradient before its reduce-scatter (`gathered_block_bytes`);
  ratio      compiled peak / floor (goal <= 1.3), and the fit against the hardware's memory
             (`--hbm-gib`, from the config's `plan.hbm_gib`; goal: 10 % or more to spare);
  flops      XLA's cost analysis of the per-device program beside our analytic count.

Jobs: "generator" and "critic" (the two jitted DMD2 steps, `distillation/dmd2.py`) and "sample"
(the 2-step student sampler on `plan.sample_batch` images of `plan.sample_resolution`,
`sampling/sampler.py`). CPU compilation stands in for the accelerator's: the partitioning and
the buffer sizes are the same program's, but fusion and layout choices of the GPU/TPU compilers
differ, so treat the temporaries as an estimate within tens of percent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qwen_jax.pytree import flatten_params
from qwen_jax.xla_memory import ACCELERATOR_LIKE, compiled_memory, cpu_upcast_bytes

GIB = 1024 ** 3
JOBS = ("generator", "critic", "sample")

_CONFIG = config_flags.DEFINE_config_file("config", None, "a training config (configs/dmd2.py[:variant])")
_DEVICES = flags.DEFINE_integer("devices", 8, "simulated devices (fake CPU devices; nothing is allocated)")
_ONLY = flags.DEFINE_list("only", [], f"jobs to compile, from {JOBS} (default: those the config names)")
_TEXT = flags.DEFINE_integer("text_tokens", 0, "text length to plan for (default: data.max_sequence_length)")
_JSON = flags.DEFINE_string("json", "", "also write the results as JSON lines to this file")
_CPU_HOISTING = flags.DEFINE_bool(
    "cpu_hoisting", False, "compile with XLA:CPU's loop-invariant code motion on (its default), which hoists"
    " fp32 copies of whole bf16 weight stacks out of the layer loops (see ACCELERATOR_LIKE)")


def _set_device_count(n: int) -> None:
    """Fake CPU devices; must run before jax creates its backend (the first device query)."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def _sizeof(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _per_device(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs/arrays, by their shardings."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class Workload:
    """The activation-relevant sizes of one job on one device."""

    batch: int          # images per device (per model replica's share)
    image_tokens: int
    text_tokens: int
    forwards: int       # transformer forwards without gradient (held one at a time)
    grad_passes: int    # forwards differentiated through the scanned blocks (their carries coexist)
    key_tokens: int = 0  # tokens attended to, when not the same (sequence parallelism: all of them)


def activation_bytes(cfg, w: Workload) -> int:
    """Our estimate of the activations one device holds at the peak of a job.

    With `remat="full"` the backward keeps each block's input carry (image + text streams) and
    recomputes one block at a time: layers x B x L x D x bytes, plus one block's working set.
    A block's working set: the streams, q/k/v and attention output (4 D), the MLP hidden (4 D) and
    its activation, the modulated inputs (2 D): ~12 D per token in the compute dtype, plus one
    head's fp32 attention logits and probabilities (B x L^2 x 2 x 4 bytes; `attention.py` runs the
    heads one at a time). A forward without gradient holds only the working set. Each pass that is
    differentiated keeps its own carries until the backward; the backward doubles the working set
    (cotangents of the same shapes). Gradients of the trainable tree are counted by the caller.
    """
    item = np.dtype(cfg.dtype).itemsize
    tokens = w.image_tokens + w.text_tokens
    d = cfg.inner_dim
    working = w.batch * tokens * d * 12 * item + w.batch * tokens * (w.key_tokens or tokens) * 2 * 4
    if not w.grad_passes:
        return working
    per_pass = cfg.num_layers * (w.batch * tokens * d * item if cfg.remat != "none" else working)
    return w.grad_passes * per_pass + 2 * working


def gathered_block_bytes(cfg, mesh, *trees) -> int:
    """Bytes of one block's weights in the compute dtype, as a device holds them while it runs it.

    Weights split over "fsdp" (and "sequence") are all-gathered one block at a time inside the
    layer scan, so every FSDP program holds one whole block (split only over "tensor") beside its
    own shard; a backward holds the whole block's weight gradient too, before the reduce-scatter
    (callers pass the trainable tree for that). Nothing is gathered where weights are not split.
    """
    tensor = dict(mesh.shape).get("tensor", 1)
    if mesh.size // tensor <= 1:
        return 0
    per_layer = sum(math.prod(x.shape[1:]) for tree in trees for path, x in flatten_params(tree).items()
                    if "transformer_blocks" in path and x.shape and x.shape[0] == cfg.num_layers)
    return per_layer * np.dtype(cfg.dtype).itemsize // tensor


def transformer_flops(cfg, w: Workload) -> float:
    """Matmul FLOPs of one forward over the batch: 2 x (block matmul parameters) x tokens per block,
    plus attention 4 x L^2 x D; a backward costs twice the forward (three times in all), and full
    remat recomputes the forward once more."""
    d, tokens = cfg.inner_dim, w.image_tokens + w.text_tokens
    # q, k, v, out projections and MLP in + out (4x wide) of the token's own stream (text and image
    # tokens each pass through one stream's weights); the per-sample modulation is negligible
    per_token = 2 * (4 * d * d + 2 * 4 * d * d)
    block = w.batch * (tokens * per_token + 4 * tokens * tokens * d)
    return cfg.num_layers * block


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def compile_job(name: str, fn, args: tuple, floor_activations: int, hbm_gib: float, analytic_flops: float,
                devices: int, num_layers: int, compiler_options: dict | None = None, floor_gathered: int = 0) -> dict:
    """Lowers and compiles `fn(*args)` (abstract args), returns the row printed for the job."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options=compiler_options)
    seconds = time.perf_counter() - start
    mem = compiled_memory(compiled)
    args_total = _sizeof(args)
    floor = args_total / devices + floor_activations + floor_gathered
    row = {"job": name, "devices": devices, "compile_s": round(seconds, 1),
           "compiled_gib": {k: round(v / GIB, 3) for k, v in mem.items()},
           "arguments_per_device_gib": round(_per_device(args) / GIB, 3),
           "floor_gib": round(floor / GIB, 3), "floor_arguments_gib": round(args_total / devices / GIB, 3),
           "floor_activations_gib": round(floor_activations / GIB, 3),
           "floor_gathered_gib": round(floor_gathered / GIB, 3), "compiler_options": compiler_options or {}}
    if mem:
        # Judged on the CPU compile's peak: an upper bound, since XLA:CPU also holds fp32 copies
        # of bf16 weights inside the layer loops, and of whole stacks where code motion is on
        # (those are reported apart, but not subtracted: not all of them are live at once).
        row["cpu_upcast_gib"] = round(cpu_upcast_bytes(compiled, num_layers) / GIB, 3)
        row["ratio_to_floor"] = round(mem["peak"] / floor, 3)
        if hbm_gib:
            row["hbm_gib"] = hbm_gib
            row["margin"] = round(1 - mem["peak"] / (hbm_gib * GIB), 3)
    flops = _flops(compiled)
    row["flops_xla"] = flops
    row["flops_analytic_per_device"] = analytic_flops / devices
    return row


def _abstract_split(config, mesh):
    """(graphdef, trainable, frozen) of the configured real transformer, abstract and sharded."""
    import jax

    from qwen_jax.models import TransformerConfig
    from qwen_jax.models.transformer import abstract_model
    from qwen_jax.training import state as state_lib

    m = config.model
    depth = {"num_layers": config.plan.layers} if config.plan.layers else {}  # a slice, for quick checks
    cfg = TransformerConfig.qwen_image(param_dtype=m.param_dtype, dtype=m.dtype, attention=m.attention,
                                       remat=m.remat, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha or None, **depth)
    graphdef, trainable, frozen = state_lib.split_trainable(abstract_model(cfg), m.lora_rank > 0)

    def place(tree):
        shardings = state_lib.tree_shardings(tree, mesh)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    return cfg, graphdef, place(trainable), place(frozen)


def _batch(config, mesh, text_tokens: int, negative: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from qwen_jax import sharding as sharding_lib

    b, res = config.data.batch_size, config.data.resolution
    latent = res // 8 // 2 * 2  # the VAE's 8x downsampling, even for the 2x2 packing
    spec = {"latents": ((b, latent, latent, 16), jnp.float32),
            "prompt_embeds": ((b, text_tokens, 3584), jnp.dtype(config.model.encoder_dtype)),
            "prompt_mask": ((b, text_tokens), jnp.int32)}
    if negative:
        spec["negative_embeds"], spec["negative_mask"] = spec["prompt_embeds"], spec["prompt_mask"]
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in spec.items()}


def plan_dmd2(config, mesh, text_tokens: int, jobs, compiler_options: dict | None = None) -> list[dict]:
    import jax

    from qwen_jax.distillation import dmd2

    cfg, graphdef, params, frozen = _abstract_split(config, mesh)
    trainer = dmd2.Trainer(config, graphdef, params, frozen, mesh)
    state = trainer.abstract_state()
    batch = _batch(config, mesh, text_tokens, negative=True)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    local = max(1, config.data.batch_size // replicas)
    n_img = (config.data.resolution // 16) ** 2
    rows = []
    steps = trainer.jitted_steps()
    gan = {"generator": config.gan.gen_weight > 0, "critic": config.gan.disc_weight > 0}
    trainable = {"generator": state["params"]["generator"],
                 "critic": {"fake": state["params"]["fake"], "heads": state["params"]["heads"]}}
    for name in ("generator", "critic"):
        if name not in jobs:
            continue
        # generator: the student's last step and (GAN) the backbone on its sample are differentiated;
        #   the earlier student step, the teacher's CFG pair and the fake score run without gradient.
        # critic: the fake score's flow-matching pass and (GAN, fake backbone) its real and fake
        #   passes are differentiated; the student's sample runs without gradient.
        if name == "generator":
            passes, forwards = 1 + gan[name], 4
        else:
            passes, forwards = 1 + (2 if gan[name] and config.gan.backbone == "fake" else 0), 2
        work = Workload(local, n_img, text_tokens, forwards=forwards, grad_passes=passes)
        fwd = transformer_flops(cfg, dataclasses.replace(work, batch=config.data.batch_size))
        flops = fwd * (forwards + passes * (4 if cfg.remat != "none" else 3))
        grads = _sizeof(trainable[name]) // mesh.size  # the gradient tree, split like its parameters
        # one block of the weights the job runs, gathered, and of what it trains, its gradient
        gathered = gathered_block_bytes(cfg, mesh, params, frozen) + gathered_block_bytes(cfg, mesh, trainable[name])
        with jax.set_mesh(mesh):  # as train.py runs the steps: activations follow the mesh's rules
            rows.append(compile_job(name, steps[name], (state, trainer.teacher, frozen, batch),
                                    activation_bytes(cfg, work) + grads, config.plan.hbm_gib, flops, mesh.size,
                                    cfg.num_layers, compiler_options, gathered))
    return rows


def plan_sample(config, mesh, text_tokens: int, compiler_options: dict | None = None) -> dict:
    """The 2-step student sampler (no CFG) on `plan.sample_batch` images of `plan.sample_resolution`,
    image tokens split over the mesh's "sequence" axis when it has one (`sampling/sampler.py`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwen_jax.sampling import sampler
    from qwen_jax.training import state as state_lib

    cfg, graphdef, params, frozen = _abstract_split(config, mesh)
    model_state = nnx.State(state_lib.merge_trees(params, frozen))
    b, res = config.plan.sample_batch, config.plan.sample_resolution
    tokens = (res // 16) ** 2
    grid = ((1, res // 16, res // 16),)
    steps = config.distill.student_steps
    shape, text_shape = (b, tokens, 64), (b, text_tokens, 3584)
    latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sampler.latents_sharding(mesh, shape))
    text = jax.ShapeDtypeStruct(text_shape, jnp.dtype(config.model.encoder_dtype),
                                sharding=sampler.text_sharding(mesh, text_shape))
    mask = jax.ShapeDtypeStruct(text_shape[:2], jnp.int32, sharding=sampler.text_sharding(mesh, text_shape[:2]))
    sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32)
    times = jax.ShapeDtypeStruct((steps,), jnp.float32)
    fn = jax.jit(functools.partial(sampler.sample, graphdef, img_shapes=grid))
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    shards = dict(mesh.shape).get("sequence", 1)
    # each device holds its share of the image tokens, but its queries attend to all keys
    work = Workload(max(1, b // replicas), tokens // shards, text_tokens, forwards=1, grad_passes=0,
                    key_tokens=tokens + text_tokens)
    flops = steps * transformer_flops(cfg, Workload(b, tokens, text_tokens, 1, 0))
    act = activation_bytes(cfg, work)
    with jax.set_mesh(mesh):
        return compile_job("sample", fn, (model_state, latents, sigmas, times, text, mask), act,
                           config.plan.hbm_gib, flops, mesh.size, cfg.num_layers, compiler_options,
                           gathered_block_bytes(cfg, mesh, params, frozen))


def format_rows(rows: list[dict]) -> str:
    head = (f"{'job':<10}{'compile s':>10}{'args':>9}{'temps':>9}{'peak':>9}{'upcast':>8}"
            f"{'floor':>9}{'ratio':>7}{'HBM':>7}{'margin':>8}{'TFLOP':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["compiled_gib"]
        lines.append(f"{r['job']:<10}{r['compile_s']:>10.1f}{c.get('arguments', 0):>9.2f}{c.get('temporaries', 0):>9.2f}"
                     f"{c.get('peak', 0):>9.2f}{r.get('cpu_upcast_gib', 0):>8.2f}"
                     f"{r['floor_gib']:>9.2f}{r.get('ratio_to_floor', float('nan')):>7.2f}"
                     f"{r.get('hbm_gib', 0):>7.0f}{r.get('margin', float('nan')):>8.1%}"
                     f"{(r['flops_xla'] or 0) / 1e12:>9.1f}")
    return "\n".join(lines) + ("\n(GiB per device. peak = args + outputs - donated + temps, judged against the floor and"
                               " the HBM; upcast: at most this much of it is fp32 copies of weight stacks that only"
                               " XLA:CPU makes. TFLOP: XLA's count for one device's program, loop bodies counted once)")


def main(argv) -> int:
    del argv
    _set_device_count(_DEVICES.value)
    import jax

    from qwen_jax import sharding as sharding_lib

    config = _CONFIG.value
    if config is None:
        print("error: --config is required (e.g. --config=configs/dmd2.py:lora_h100x8)", file=sys.stderr)
        return 2
    jobs = _ONLY.value or list(config.plan.jobs)
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        print(f"error: --only {unknown}: choose from {JOBS}", file=sys.stderr)
        return 2
    text_tokens = _TEXT.value or config.data.max_sequence_length
    try:
        mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                      sequence=config.plan.sequence)
    except ValueError as e:
        print(f"error: --devices {_DEVICES.value}: {e}", file=sys.stderr)
        return 2
    print(f"mesh {dict(mesh.shape)} of {len(jax.devices())} simulated devices; text {text_tokens} tokens", flush=True)
    options = None if _CPU_HOISTING.value else ACCELERATOR_LIKE
    rows = []
    if {"generator", "critic"} & set(jobs):
        rows += plan_dmd2(config, mesh, text_tokens, jobs, options)
    if "sample" in jobs:
        rows.append(plan_sample(config, mesh, text_tokens, options))
    print(format_rows(rows))
    for r in rows:
        print(json.dumps(r))
    if _JSON.value:  # written whole or not at all
        tmp = f"{_JSON.value}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, _JSON.value)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
