"""GPU check of the transformer in one run (under 8 minutes on one H100/H200): speed, MFU, kernels, DMD2.

One JSON line; a failing section (or sampling kernel) goes under "errors", one starting after
`--budget-s` under "skipped". All bf16, random weights made on the device, full width (24 x 128
heads, text 3584; 128 text tokens, 77 real) at two depths, `--blocks` and twice that, through which
time = fixed + per_block x blocks is fitted and extrapolated to the 60-block model (s, TFLOP/s, MFU
against the card's dense bf16 peak, `PEAK_BF16`; null for other cards). Sections:
  attention       `cudnn` vs `xla` on (2, 128 + 4096, 24, 128), padded holed text masks (error, ms)
  flops           the analytic FLOPs of a forward vs XLA's cost analysis of a 1-block model
  forward_1328    one forward, batch 1, 1328² (6,889 image tokens): compile s, median s, the fit
  sampling_2048   the 2-step student sampler (`sampler.sample`, no VAE), 4 images of 2048² (16,384
                  tokens each), per kernel (`xla`, `cudnn` on a GPU): the same, and their parity
  dmd2_lora_step  one DMD2 iteration (generator + critic turn: `dmd2.Trainer`'s jitted steps) of
                  configs/dmd2.py's qwen_image recipe (LoRA 64 student and fake score on a frozen
                  base, CFG teacher, GAN heads, full remat) at `--blocks` blocks, batch 2 at 1024²:
                  compile s per turn, step s, finite losses
  toy_family      the committed toy student (`models/toy/student`) resolved into a fresh cache
                  (its text encoder regenerated and digest-checked on this host) and sampled on
                  the default device: 2 steps, 4 images of 32²; the images' value range

Run on a GPU machine: PYTHONPATH=. python bench/gpu_check.py [--blocks 4] [--budget-s 420]
`--smoke` runs every section with tiny sizes (on a CPU: XLA attention only) to check the script.
"""

import argparse
import functools
import importlib.util
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import flow
from qwen_jax import sharding as sharding_lib
from qwen_jax.distillation import dmd2
from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.models.attention import attention
from qwen_jax.sampling import sampler
from qwen_jax.training import state as state_lib

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, matched as substrings of
# `device_kind`, first match wins (so "H100 PCIe" before "H100", "L40S"/"L40" before "L4").
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),  # H100: SXM
             ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12))
TEXT_TOKENS, TEXT_REAL, NEG_REAL = 128, 77, 8  # the negative prompt " " encodes to a few tokens
FULL_DEPTH = 60  # Qwen-Image's blocks: what the measured depths are extrapolated to
ROOT = Path(__file__).resolve().parent.parent


def peak_flops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16 if name in device_kind), None)


def forward_flops(cfg: TransformerConfig, batch: int, n_img: int, n_txt: int) -> float:
    """Matmul FLOPs of one transformer forward (2 per multiply-add; norms, softmax, RoPE ignored).

    Per block, with D = inner_dim, S = n_img + n_txt (padded text tokens are computed too):
      tokens     2 * 12 D^2 * S    each token passes its stream's q, k, v, out (4 D^2) and MLP
                                   (D -> 4D -> D: 8 D^2) weights; the two streams have their own
                                   weights but every token sees one set, so 12 D^2 per token
      attention  4 * S^2 * D       q k^T and probs v, each 2 S^2 Dh per head, H heads
      modulation 2 * 2 * 6 D^2     img_mod and txt_mod act on the time embedding (one row per
                                   sample), not per token: negligible next to the rest
    Outside the blocks: img_in, txt_in and proj_out per token, the time MLP and norm_out per sample.
    """
    d, s = cfg.inner_dim, n_img + n_txt
    block = 2 * 12 * d * d * s + 2 * 2 * 6 * d * d
    io = 2 * (n_img * cfg.in_channels * d + n_txt * cfg.joint_attention_dim * d + n_img * d * cfg.out_features)
    per_sample = 2 * (256 * d + d * d + 2 * d * d)  # timestep MLP, norm_out's modulation
    return float(batch * (cfg.num_layers * block + io + per_sample)) + attention_flops(cfg, batch, s)


def attention_flops(cfg: TransformerConfig, batch: int, seq: int) -> float:
    return float(batch * cfg.num_layers * 4 * seq * seq * cfg.inner_dim)


def cost_flops(stage) -> float | None:
    """XLA's FLOP count of a jax Lowered or Compiled stage, where the backend gives one."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict on older jax
    return float(cost["flops"]) if cost and "flops" in cost else None


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def describe(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:500]}"


def compiled(jitted, *args, **static):
    """(executable, seconds to lower and compile): compile time kept apart from run time."""
    start = time.perf_counter()
    exe = jitted.lower(*args, **static).compile()
    return exe, time.perf_counter() - start


def median_s(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one untimed call (first-run allocations, autotuning)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def rate(flop: float, s: float, peak: float | None) -> dict:
    """TFLOP/s and MFU to 4 significant digits (a tiny smoke model's rate rounds to 0 in decimals)."""
    achieved = flop / s
    mfu = None if peak is None else float(f"{achieved / peak:.4g}")
    return {"tflop_per_s": float(f"{achieved / 1e12:.4g}"), "mfu": mfu}


def depth_fit(times: dict[int, float], flop_full: float, peak: float | None) -> dict:
    """time = fixed + per_block * blocks through the two measured depths, and what it predicts for
    60 blocks: the blocks are identical and scanned, so only the work outside them (embeddings,
    output projection, the sampler's updates, launch overhead) does not scale with depth."""
    (d0, t0), (d1, t1) = sorted(times.items())
    per_block = (t1 - t0) / (d1 - d0)
    fixed = t0 - per_block * d0
    full = fixed + per_block * FULL_DEPTH
    return {"fixed_s": round(fixed, 5), "per_block_s": round(per_block, 5), "predicted_60_blocks_s": round(full, 4),
            "flop_60_blocks": flop_full, **{f"{k}_60_blocks": v for k, v in rate(flop_full, full, peak).items()}}


def text_inputs(key, batch: int, cfg: TransformerConfig, length: int, real: int):
    """Random text states and a padded mask: sample 0 has `real` tokens, others fewer, one with a hole."""
    text = jax.random.normal(key, (batch, length, cfg.joint_attention_dim), jnp.bfloat16)
    lengths = jnp.array([real] + [max(1, real // 2)] * (batch - 1))[:, None]
    mask = jnp.arange(length)[None, :] < lengths
    if batch > 1:
        mask = mask.at[1, 3].set(False)  # a hole, not only tail padding
    return text, mask.astype(jnp.int32)


@functools.cache  # one state per depth, shared by the forward and the sampling sections
def random_state(cfg: TransformerConfig):
    """Random parameters created on the device (no host copy)."""
    return jax.jit(lambda: nnx.split(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))[1])()


def graphdef_for(cfg: TransformerConfig, impl: str):
    """The model's structure with attention kernel `impl`; the state is shared by every kernel."""
    return nnx.graphdef(nnx.eval_shape(lambda: QwenImageTransformer(cfg.replace(attention=impl), rngs=nnx.Rngs(0))))


def check_attention(result, impls, shape, reps):
    b, s_txt, s_img, h, d = shape
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(keys[i], (b, s_txt + s_img, h, d), jnp.bfloat16) for i in range(3))
    txt_mask = jnp.arange(s_txt)[None, :] < jnp.array([[TEXT_REAL], [20]])[:b]
    txt_mask = txt_mask.at[-1, 5].set(False)
    kv_mask = jnp.concatenate([txt_mask, jnp.ones((b, s_img), bool)], axis=1)
    outs, ms = {}, {}
    for impl in impls:
        fn = jax.jit(lambda q, k, v, m, impl=impl: attention(q, k, v, m, impl))
        outs[impl] = fn(q, k, v, kv_mask).astype(jnp.float32)
        ms[impl] = round(1e3 * median_s(lambda fn=fn: fn(q, k, v, kv_mask), reps), 3)
    result["attention"] = {"shape_b_txt_img_h_d": list(shape), "ms": ms}
    if "cudnn" in outs:
        result["attention"]["rel_err_cudnn_vs_xla"] = rel(outs["cudnn"], outs["xla"])


def check_flops(result, cfg, n_img):
    """The analytic count against XLA's, on a 1-block model at `n_img` image tokens.

    XLA counts a loop body once whatever its trip count: the scan over blocks (hence one block)
    and the XLA attention's lax.map over heads (hence the attention term divided by the heads).
    The lowered (pre-optimization) count sees every dot; the compiled one may miss dots that
    the backend turned into library calls. Elementwise work (norms, softmax, GELU) adds a little.
    """
    one = cfg.replace(num_layers=1, attention="xla")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: QwenImageTransformer(one, rngs=nnx.Rngs(0))))
    side = round(n_img ** 0.5)
    args = (jax.ShapeDtypeStruct((1, n_img, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1, TEXT_TOKENS, cfg.joint_attention_dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, TEXT_TOKENS), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.float32))
    lowered = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, ((1, side, side),))).lower(abstract, *args)
    analytic = forward_flops(one, 1, n_img, TEXT_TOKENS)
    attn = attention_flops(one, 1, n_img + TEXT_TOKENS)
    as_counted = analytic - attn + attn / one.num_attention_heads
    xla = cost_flops(lowered)
    result["flops_1_block"] = {
        "image_tokens": n_img, "text_tokens": TEXT_TOKENS, "analytic": analytic, "analytic_attention": attn,
        "analytic_as_xla_counts": as_counted, "xla_lowered": xla, "xla_compiled": cost_flops(lowered.compile()),
        "xla_lowered_over_analytic_as_counted": None if xla is None else round(xla / as_counted, 4)}


@functools.partial(jax.jit, static_argnames=("graphdef", "img_shapes"))
def forward(graphdef, state, x, text, mask, t, *, img_shapes):
    """One transformer forward, called as `sampler.sample` is (graphdef and grid static)."""
    return nnx.merge(graphdef, state)(x, text, mask, t, img_shapes)


def measure_depths(fn, cfg, depths, impl, args, grid, flop_at, peak, reps):
    """`fn(graphdef, state, *args, img_shapes=grid)` with kernel `impl` at each depth: compile
    seconds, median seconds, TFLOP/s and MFU (`flop_at(depth)`), the fit to 60 blocks.
    Returns (row, the first depth's output)."""
    row, times, out = {"depths": {}}, {}, None
    for depth in depths:
        deep = cfg.replace(num_layers=depth)
        state = random_state(deep)
        exe, compile_s = compiled(fn, graphdef_for(deep, impl), state, *args, img_shapes=grid)
        times[depth] = median_s(lambda: exe(state, *args), reps)
        out = exe(state, *args).astype(jnp.float32) if out is None else out
        row["depths"][str(depth)] = {"compile_s": round(compile_s, 2), "s": round(times[depth], 5),
                                     "flop": flop_at(depth), **rate(flop_at(depth), times[depth], peak)}
    return {**row, **depth_fit(times, flop_at(FULL_DEPTH), peak)}, out


def check_forward(result, cfg, depths, size, impl, peak, reps):
    """One bf16 forward, batch 1, at each depth; the fit to 60 blocks."""
    side = size // 16  # 8x VAE, 2x2 patches
    x = jax.random.normal(jax.random.key(5), (1, side * side, cfg.in_channels), jnp.bfloat16)
    text, mask = text_inputs(jax.random.key(6), 1, cfg, TEXT_TOKENS, TEXT_REAL)
    args = (x, text, mask, jnp.array([0.7]))

    def flop_at(depth):
        return forward_flops(cfg.replace(num_layers=depth), 1, side * side, TEXT_TOKENS)

    row, _ = measure_depths(forward, cfg, depths, impl, args, ((1, side, side),), flop_at, peak, reps)
    result["forward_1328"] = {"resolution": size, "image_tokens": side * side, "text_tokens": TEXT_TOKENS,
                              "batch": 1, "attention": impl, **row}


def check_sampling(result, cfg, depths, size, batch, impls, peak, reps):
    """Each kernel apart: one running out of memory (xla's per-head scores at 16k tokens) is
    recorded under errors["sampling_2048/<kernel>"] and the other still runs."""
    side = size // 16
    sigmas = jnp.asarray(sampler.student_sigmas(2))
    times = jnp.asarray(flow.model_time(np.asarray(sigmas)[:-1]))
    text, mask = text_inputs(jax.random.key(1), batch, cfg, TEXT_TOKENS, TEXT_REAL)
    latents = jax.random.normal(jax.random.key(2), (batch, side * side, cfg.in_channels), jnp.float32)
    args, steps = (latents, sigmas, times, text, mask), len(sigmas) - 1

    def flop_at(depth):  # the Euler updates are negligible
        return steps * forward_flops(cfg.replace(num_layers=depth), batch, side * side, TEXT_TOKENS)

    row = result["sampling_2048"] = {"resolution": size, "batch": batch, "image_tokens": side * side,
                                     "text_tokens": TEXT_TOKENS, "steps": steps}
    images = {}
    for impl in impls:
        try:
            row[impl], images[impl] = measure_depths(sampler.sample, cfg, depths, impl, args, ((1, side, side),),
                                                     flop_at, peak, reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the other kernel's numbers
            result["errors"][f"sampling_2048/{impl}"] = describe(e)
    if "cudnn" in images and "xla" in images:
        row["rel_err_cudnn_vs_xla"] = rel(images["cudnn"], images["xla"])


def dmd2_config():
    """configs/dmd2.py's qwen_image recipe with both turns in every iteration."""
    spec = importlib.util.spec_from_file_location("dmd2_config", ROOT / "configs" / "dmd2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("qwen_image")
    config.dmd2.dfake_gen_update_ratio = 1  # an iteration = generator turn + critic turn
    return config


def lora_model(cfg, config, depth, impl):
    """(graphdef, LoRA tree, frozen base) of a random model as the config builds it, made on the device."""
    m = config.model
    cfg = cfg.replace(num_layers=depth, attention=impl, remat=m.remat, lora_rank=m.lora_rank,
                      lora_alpha=m.lora_alpha or None, param_dtype=m.param_dtype, dtype=m.dtype)
    graphdef, _, _ = state_lib.split_trainable(nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0))),
                                               lora=True)
    trainable, frozen = jax.jit(lambda: state_lib.split_trainable(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)),
                                                                  lora=True)[1:])()
    return graphdef, trainable, frozen


def dmd2_batch(cfg, mesh, batch: int, size: int, dtype) -> dict:
    """Random latents, prompts (padded, one with a hole) and negative prompts, placed as train.py places them."""
    text, mask = text_inputs(jax.random.key(7), batch, cfg, TEXT_TOKENS, TEXT_REAL)
    neg = jax.random.normal(jax.random.key(8), text.shape, jnp.bfloat16)
    out = {"latents": jax.random.normal(jax.random.key(9), (batch, size // 8, size // 8, cfg.in_channels // 4)),
           "prompt_embeds": text.astype(dtype), "prompt_mask": mask, "negative_embeds": neg.astype(dtype),
           "negative_mask": jnp.broadcast_to(jnp.arange(TEXT_TOKENS) < NEG_REAL, mask.shape).astype(jnp.int32)}
    return {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim)) for k, v in out.items()}


def run_turns(exes: dict, state, args, iterations: int):
    """`iterations` DMD2 iterations (each turn in order, as `Trainer.step` at ratio 1), timed per
    turn; returns (seconds per turn per iteration, metrics per turn in call order)."""
    times, metrics = {turn: [] for turn in exes}, []
    for _ in range(iterations):
        for turn, exe in exes.items():
            start = time.perf_counter()
            state, m = jax.block_until_ready(exe(state, *args))  # the state is donated: rebind it
            times[turn].append(time.perf_counter() - start)
            metrics.append(jax.device_get(m))
    return times, metrics


def check_dmd2(result, cfg, depth, size, batch_size, impl, reps):
    config = dmd2_config()
    mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, trainable, frozen = lora_model(cfg, config, depth, impl)
    trainer = dmd2.Trainer(config, graphdef, trainable, frozen, mesh)
    state, batch = trainer.init_state(), dmd2_batch(cfg, mesh, batch_size, size, config.model.encoder_dtype)
    args = (trainer.teacher, frozen, batch)
    with jax.set_mesh(mesh):  # as train.py runs the steps
        steps = trainer.jitted_steps()
        exes, compile_s = {}, {}
        for turn in ("generator", "critic"):
            exes[turn], compile_s[turn] = compiled(steps[turn], state, *args)
        times, metrics = run_turns(exes, state, args, 1 + reps)  # the first iteration untimed
    losses = {f"{turn}/{k}": float(v) for turn, m in zip(exes, metrics) for k, v in m.items() if "loss" in k}
    finite = all(np.isfinite(np.asarray(v, np.float64)).all() for m in metrics for v in m.values())
    result["dmd2_lora_step"] = {
        "resolution": size, "batch": batch_size, "image_tokens": (size // 16) ** 2, "text_tokens": TEXT_TOKENS,
        "blocks": depth, "lora_rank": config.model.lora_rank, "attention": impl, "remat": config.model.remat,
        "gan_blocks": list(trainer.blocks), "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "turn_s": {k: round(float(np.median(v[1:])), 4) for k, v in times.items()},
        "step_s": round(float(np.median(np.add(times["generator"][1:], times["critic"][1:]))), 4),
        "exit_steps": [int(m["exit_step"]) for m in metrics[::2]], "first_losses": losses, "finite": bool(finite)}


def settings(smoke: bool, blocks: int) -> dict:
    """Sizes for a real check, or a tiny smoke run (its depths far apart: a per-block time that
    stands out of a loaded CPU's noise)."""
    if smoke:
        return dict(cfg=TransformerConfig.tiny(in_channels=64, out_channels=16), attention=(2, 32, 64, 2, 32),
                    depths=(1, 8), forward_px=128, sample_px=128, dmd2_px=64, reps=3, smoke=True)
    return dict(cfg=TransformerConfig.qwen_image(), attention=(2, TEXT_TOKENS, 4096, 24, 128),
                depths=(blocks, 2 * blocks), forward_px=1328, sample_px=2048, dmd2_px=1024, reps=5, smoke=False)


def sections(result, s: dict, impls, peak) -> dict:
    cfg, depths, reps, fast = s["cfg"], s["depths"], s["reps"], impls[-1]  # cudnn where there is one

    def dmd2_step():
        random_state.cache_clear()  # the full-width bf16 states are no longer needed
        check_dmd2(result, cfg, depths[0], s["dmd2_px"], 2, fast, reps)

    return {
        "attention": lambda: check_attention(result, impls, s["attention"], reps),
        "flops": lambda: check_flops(result, cfg, (s["forward_px"] // 16) ** 2),
        "forward_1328": lambda: check_forward(result, cfg, depths, s["forward_px"], fast, peak, reps),
        "sampling_2048": lambda: check_sampling(result, cfg, depths, s["sample_px"], 4, impls, peak, reps),
        "dmd2_lora_step": dmd2_step,
        "toy_family": lambda: check_toy_family(result, fresh_cache=not s["smoke"]),
    }


def check_toy_family(result, fresh_cache: bool):
    """The committed toy models must load on this host as they are (their family's seeded text
    encoder regenerated bit for bit, `toy/build.py`) and sample on its default device. `--smoke`
    takes the usual cache (the CPU test's run has built the family already)."""
    import contextlib
    import tempfile

    from qwen_jax.pipeline import Pipeline
    from qwen_jax.toy.folders import STUDENT

    with tempfile.TemporaryDirectory() if fresh_cache else contextlib.nullcontext() as cache:
        begin = time.perf_counter()
        pipe = Pipeline.from_pretrained(STUDENT, cache_dir=cache)  # the folder's own fixed-shift scheduler
        images = np.asarray(pipe(["a red circle on a blue background"] * 4, height=32, width=32, num_steps=2,
                                 guidance=1.0, seed=0).array)
    result["toy_family"] = {"load_and_sample_s": round(time.perf_counter() - begin, 1),
                            "image_min": float(images.min()), "image_max": float(images.max()),
                            "finite": bool(np.isfinite(images).all())}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any backend: checks the script runs")
    p.add_argument("--blocks", type=int, default=4, help="the shallower measured depth (the other is twice it)")
    p.add_argument("--budget-s", type=float, default=420, help="skip sections that would start after this")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    impls = ("xla", "cudnn") if device.platform == "gpu" else ("xla",)
    s = settings(args.smoke, args.blocks)
    s["cfg"] = s["cfg"].replace(param_dtype="bfloat16", dtype="bfloat16")
    result = {"bench": "gpu_check", "device_kind": device.device_kind, "platform": device.platform,
              "jax": jax.__version__, "peak_bf16_tflop_per_s": None if peak is None else peak / 1e12,
              "model": {"depths": list(s["depths"]), "extrapolated_to": FULL_DEPTH, "width": s["cfg"].inner_dim,
                        "heads": s["cfg"].num_attention_heads},
              "errors": {}, "skipped": [], "section_s": {}}
    for name, run in sections(result, s, impls, peak).items():
        if time.perf_counter() - start > args.budget_s:
            result["skipped"].append(name)
            continue
        begin = time.perf_counter()
        try:
            run()
        except Exception as e:  # noqa: BLE001 - one JSON line whatever fails; the error is reported
            result["errors"][name] = describe(e)
        result["section_s"][name] = round(time.perf_counter() - begin, 1)
    result["peak_gib"] = round((device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
