"""GPU checks for the transformer: cuDNN attention against the XLA path, and full-width timings.

Prints one JSON line. Checks, all in bf16:
  * attention: `cudnn` vs `xla` on (2, 64 + 4096, 24, 128) with a padded, holed text mask;
  * model: a 2-block full-width Qwen-Image (24 x 128 heads, text dim 3584) at 1024x1024
    (4096 image tokens + 77 padded text tokens), cudnn vs xla output, forward ms and compile s;
  * training step: value_and_grad through the scan with remat "save_attn_out" and cuDNN attention.
Run on a GPU machine: PYTHONPATH=. python bench/gpu_check.py
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.models.attention import attention


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def timed(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times)), 3)


def main():
    result = {"bench": "gpu_check", "device": str(jax.devices()[0]), "jax": jax.__version__}
    keys = jax.random.split(jax.random.key(0), 8)

    # Attention kernel parity.
    b, s_txt, s_img, h, d = 2, 64, 4096, 24, 128
    q, k, v = (jax.random.normal(keys[i], (b, s_txt + s_img, h, d), jnp.bfloat16) for i in range(3))
    txt_mask = jnp.arange(s_txt)[None, :] < jnp.array([[64], [20]])
    txt_mask = txt_mask.at[1, 5].set(False)  # a hole, not only tail padding
    kv_mask = jnp.concatenate([txt_mask, jnp.ones((b, s_img), bool)], axis=1)
    outs = {impl: jax.jit(lambda q, k, v, m, impl=impl: attention(q, k, v, m, impl))(q, k, v, kv_mask)
            for impl in ("xla", "cudnn")}
    result["attention_rel_err_cudnn_vs_xla"] = rel(outs["cudnn"].astype(jnp.float32), outs["xla"].astype(jnp.float32))
    result["attention_ms"] = {impl: timed(jax.jit(lambda q, k, v, m, impl=impl: attention(q, k, v, m, impl)),
                                          q, k, v, kv_mask) for impl in ("xla", "cudnn")}

    # Full-width model, 2 blocks.
    base = TransformerConfig.qwen_image(num_layers=2, param_dtype="bfloat16", dtype="bfloat16")
    img_shapes = ((1, 64, 64),)
    x = jax.random.normal(keys[3], (1, 4096, 64), jnp.bfloat16)
    txt = jax.random.normal(keys[4], (1, 77, 3584), jnp.bfloat16)
    mask = jnp.arange(77)[None] < 50
    t = jnp.array([0.7])
    model = QwenImageTransformer(base, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    forward, outputs = {}, {}
    for impl in ("xla", "cudnn"):
        graphdef = nnx.graphdef(QwenImageTransformer(base.replace(attention=impl), rngs=nnx.Rngs(0)))
        fn = jax.jit(lambda s, *a, g=graphdef: nnx.merge(g, s)(*a, img_shapes))
        start = time.perf_counter()
        compiled = fn.lower(state, x, txt, mask, t).compile()
        result[f"model_compile_s_{impl}"] = round(time.perf_counter() - start, 2)
        outputs[impl] = compiled(state, x, txt, mask, t)
        forward[impl] = timed(compiled, state, x, txt, mask, t)
    result["model_forward_ms"] = forward
    result["model_rel_err_cudnn_vs_xla"] = rel(outputs["cudnn"].astype(jnp.float32), outputs["xla"].astype(jnp.float32))

    print(json.dumps(result), flush=True)  # the forward results survive a failing training check

    # A gradient step through remat + cuDNN.
    cfg = base.replace(attention="cudnn", remat="save_attn_out")
    graphdef, params = nnx.split(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p):
        out = nnx.merge(graphdef, p)(x, txt, mask, t, img_shapes)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(params)
    result["grad_finite"] = bool(all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in jax.tree.leaves(grads)))
    result["grad_step_ms"] = timed(step, params, reps=5)
    result["peak_gib"] = round((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
