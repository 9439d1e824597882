"""GPU checks for the transformer: cuDNN attention against XLA's, sampling speed and MFU, a gradient step.

Prints one JSON line (a failing section is recorded under "errors"; sections past the time budget
under "skipped"). Checks, all in bf16:
  * attention: `cudnn` vs `xla` on (2, 128 + 4096, 24, 128) with padded, holed text masks
    (relative error, ms);
  * flops: the analytic FLOP count of one forward against XLA's cost analysis of a 1-block model
    (XLA counts a scanned body once, so a deeper model would be undercounted);
  * sampling: 2-step student sampling (`qwen_jax.sampling.sampler.sample`: 2 transformer forwards
    and 2 Euler updates, no VAE) with a full-width model of reduced depth (24 x 128 heads, text dim
    3584, `--blocks` blocks, random weights) at 1024x1024 (4096 image tokens) and 2048x2048
    (16384 tokens) with 128 text tokens of which 77 are real, for `xla` and `cudnn`: median seconds,
    first-call seconds, achieved TFLOP/s, MFU (against the card's dense bf16 peak; null for
    cards not in `PEAK_BF16`), and cudnn-vs-xla output error;
  * grad: value_and_grad through the scan with remat "save_attn_out" and cuDNN attention at 1024².

Run on a GPU machine: PYTHONPATH=. python bench/gpu_check.py   (sections starting after `--budget-s`, 7 min, are skipped)
`--smoke` runs every section with tiny sizes (on a CPU: XLA attention only) to check the script.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import flow
from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.models.attention import attention
from qwen_jax.sampling import sampler

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, matched as substrings of
# `device_kind`, first match wins (so "H100 PCIe" before "H100", "L40S"/"L40" before "L4").
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)
TEXT_TOKENS, TEXT_REAL = 128, 77


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


def seconds(fn, reps: int) -> tuple[float, float]:
    """(first call incl. compile, median of `reps` later calls) in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def text_inputs(key, batch: int, cfg: TransformerConfig, length: int, real: int):
    """Random text states and a padded mask: sample 0 has `real` tokens, others fewer, one with a hole."""
    text = jax.random.normal(key, (batch, length, cfg.joint_attention_dim), jnp.bfloat16)
    lengths = jnp.array([real] + [max(1, real // 2)] * (batch - 1))[:, None]
    mask = jnp.arange(length)[None, :] < lengths
    if batch > 1:
        mask = mask.at[1, 3].set(False)  # a hole, not only tail padding
    return text, mask.astype(jnp.int32)


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
        ms[impl] = round(1e3 * seconds(lambda fn=fn: fn(q, k, v, kv_mask), reps)[1], 3)
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


def check_sampling(result, cfg, state, impls, sizes, peak, reps):
    out = result.setdefault("sampling", {})
    sigmas = jnp.asarray(sampler.student_sigmas(2))
    times = jnp.asarray(flow.model_time(np.asarray(sigmas)[:-1]))
    text, mask = text_inputs(jax.random.key(1), 1, cfg, TEXT_TOKENS, TEXT_REAL)
    for size in sizes:
        side = size // 16  # 8x VAE, 2x2 patches
        n_img = side * side
        latents = jax.random.normal(jax.random.key(2), (1, n_img, cfg.in_channels), jnp.float32)
        flops = 2 * forward_flops(cfg, 1, n_img, TEXT_TOKENS)  # the Euler updates are negligible
        row, samples = {"image_tokens": n_img, "text_tokens": TEXT_TOKENS, "flop": flops}, {}
        out[f"{size}px"] = row  # filled in place: a failing kernel keeps the other's numbers
        for impl in impls:
            graphdef = graphdef_for(cfg, impl)

            def call(graphdef=graphdef, latents=latents, grid=((1, side, side),)):
                return sampler.sample(graphdef, state, latents, sigmas, times, text, mask, img_shapes=grid)

            first, median = seconds(call, reps)
            samples[impl] = call().astype(jnp.float32)
            achieved = flops / median
            row[impl] = {"s": round(median, 4), "first_call_s": round(first, 2), "tflop_per_s": round(achieved / 1e12, 2),
                         "mfu": None if peak is None else round(achieved / peak, 4)}
        if "cudnn" in samples:
            row["rel_err_cudnn_vs_xla"] = rel(samples["cudnn"], samples["xla"])


def check_grad(result, cfg, state, impl, size, reps):
    side = size // 16
    x = jax.random.normal(jax.random.key(3), (1, side * side, cfg.in_channels), jnp.bfloat16)
    text, mask = text_inputs(jax.random.key(4), 1, cfg, TEXT_TOKENS, TEXT_REAL)
    t = jnp.array([0.7])
    model = nnx.merge(graphdef_for(cfg.replace(remat="save_attn_out"), impl), state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        y = nnx.merge(graphdef, p, rest)(x, text, mask, t, ((1, side, side),))
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss))
    first, median = seconds(lambda: step(params), reps)
    _, grads = step(params)
    finite = bool(jax.jit(lambda g: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(g)])))(grads))
    result["grad"] = {"attention": impl, "remat": "save_attn_out", "image_tokens": side * side, "finite": finite,
                      "step_ms": round(1e3 * median, 2), "first_call_s": round(first, 2)}


def settings(smoke: bool, blocks: int):
    """(model config, attention shape, image sizes in px, reps) for a real check or a tiny smoke run."""
    if smoke:
        cfg = TransformerConfig.tiny(in_channels=64, out_channels=16, num_layers=2)
        return cfg, (2, 32, 64, 2, 32), (128,), 1
    cfg = TransformerConfig.qwen_image(num_layers=blocks)
    return cfg, (2, TEXT_TOKENS, 4096, 24, 128), (1024, 2048), 5


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any backend: checks the script runs")
    p.add_argument("--blocks", type=int, default=8, help="depth of the full-width model")
    p.add_argument("--budget-s", type=float, default=420, help="skip sections that would start after this")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    impls = ("xla", "cudnn") if device.platform == "gpu" else ("xla",)
    cfg, attn_shape, sizes, reps = settings(args.smoke, args.blocks)
    cfg = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    result = {"bench": "gpu_check", "device_kind": device.device_kind, "platform": device.platform,
              "jax": jax.__version__, "peak_bf16_tflop_per_s": None if peak is None else peak / 1e12,
              "model": {"blocks": cfg.num_layers, "width": cfg.inner_dim, "heads": cfg.num_attention_heads},
              "errors": {}, "skipped": [], "section_s": {}}
    state = random_state(cfg)
    result["section_s"]["init"] = round(time.perf_counter() - start, 1)
    sections = {
        "attention": lambda: check_attention(result, impls, attn_shape, reps),
        "flops": lambda: check_flops(result, cfg, (sizes[0] // 16) ** 2),
        **{f"sampling_{size}px": lambda size=size: check_sampling(result, cfg, state, impls, (size,), peak, reps)
           for size in sizes},
        "grad": lambda: check_grad(result, cfg, state, impls[-1], sizes[0], reps),
    }
    for name, run in sections.items():
        if time.perf_counter() - start > args.budget_s:
            result["skipped"].append(name)
            continue
        begin = time.perf_counter()
        try:
            run()
        except Exception as e:  # noqa: BLE001 - one JSON line whatever fails; the error is reported
            result["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
        result["section_s"][name] = round(time.perf_counter() - begin, 1)
    result["peak_gib"] = round((device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
