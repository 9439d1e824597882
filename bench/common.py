"""Helpers shared by the CPU benchmarks (dmd2_step.py, compile_depth.py, convert_throughput.py).

Conventions (as in forward.py / train_step.py): progress goes to stderr, the result is one JSON
line on stdout; every timing comparison runs both sides in the same process, interleaved
(a, b, b, a, ...) so drifts in machine load hit both alike, and reports medians, minima and ratios
together with the 1-minute load average (above the core count the timings are contended).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def device_info(torch_threads: int | None = None) -> dict:
    """The machine fields every benchmark line carries; call it at the end of the run."""
    import jax

    info = {"platform": jax.devices()[0].platform, "cpu_count": os.cpu_count()}
    if torch_threads is not None:
        info["torch_threads"] = torch_threads
    info["loadavg_1m"] = round(os.getloadavg()[0], 2)  # > cpu_count: the timings are contended
    info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")  # malloc settings change XLA's step times
    return info


def versions(*, torch: bool = True) -> dict:
    import jax

    out = {"jax": jax.__version__}
    if torch:
        import diffusers
        import torch as _torch

        out.update(torch=_torch.__version__, diffusers=diffusers.__version__)
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, label: str = "repeat") -> dict[str, list[float]]:
    """Wall seconds of `repeats` calls of each function, alternating which goes first."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        log(f"{label} {i + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
    return times


def summary(times: list[float], scale: float = 1e3, digits: int = 1) -> dict:
    """{"median", "min"} of a list of seconds, scaled (default: milliseconds)."""
    return {"median": round(statistics.median(times) * scale, digits), "min": round(min(times) * scale, digits)}


def ratio(a: float, b: float, digits: int = 3) -> float:
    return round(a / b, digits)


def update_rel_err(old: dict, new_jax: dict, new_torch: dict) -> float:
    """|Δθ_jax - Δθ_torch| / |Δθ_torch| over every parameter, both in qwen_jax's layout."""
    import numpy as np

    num = den = 0.0
    for path, p0 in old.items():
        d_j = np.asarray(new_jax[path], np.float64) - p0
        d_t = np.asarray(new_torch[path], np.float64) - p0
        num += float(np.sum((d_j - d_t) ** 2))
        den += float(np.sum(d_t ** 2))
    return (num / den) ** 0.5


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b| to 3 significant digits."""
    return float(f"{abs(a - b) / abs(b):.3g}")


def write_synthetic_checkpoint(src: Path, layers: int, heads: int, text_dim: int) -> dict:
    """A random fp32 diffusers transformer folder (config.json, ~2 GB shards, index), described."""
    import json

    import numpy as np

    from qwen_jax.conversion import transformer_keys as keymap
    from qwen_jax.conversion.safetensors_io import write_safetensors
    from qwen_jax.models import TransformerConfig
    from qwen_jax.models.transformer import abstract_params

    cfg = TransformerConfig(num_layers=layers, num_attention_heads=heads, attention_head_dim=64,
                            joint_attention_dim=text_dim, axes_dims_rope=(16, 24, 24))
    flax_shapes = {path: tuple(s.shape) for path, s in abstract_params(cfg).items()}
    decls = []
    for path, shape in flax_shapes.items():
        for layer, key, transpose in keymap.torch_keys_for(path, shape):
            sl = shape[1:] if layer is not None else shape
            decls.append((key, tuple(reversed(sl)) if transpose else sl, np.dtype(np.float32)))
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(cfg.to_diffusers_config()))
    shards, current, size = [], [], 0
    for d in decls:  # ~2 GB shards, like the hub's
        nbytes = int(np.prod(d[1])) * 4
        if current and size + nbytes > 2e9:
            shards.append(current)
            current, size = [], 0
        current.append(d)
        size += nbytes
    shards.append(current)
    rng, weight_map = np.random.default_rng(0), {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shapes = {d[0]: d[1] for d in shard}
        write_safetensors(src / name, shard, lambda k, shapes=shapes: rng.standard_normal(shapes[k], dtype=np.float32))
        weight_map.update({d[0]: name for d in shard})
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    os.sync()  # written back, so that eviction from the page cache can work
    return {"file_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
            "tensor_bytes": sum(int(np.prod(d[1])) * 4 for d in decls), "tensors": len(decls), "shards": len(shards),
            "largest_mib": max(int(np.prod(s)) for s in flax_shapes.values()) * 4 / 2**20}


def jax_twin(torch_model, arch: dict):
    """qwen_jax's fp32 copy of a diffusers transformer on a 1-device mesh, split for training.

    Returns (cfg, graphdef, trainable, frozen, flat fp64 copy of the initial params, mesh).
    """
    import jax
    import numpy as np
    from flax import nnx

    from qwen_jax import sharding as sharding_lib
    from qwen_jax.conversion.transformer import state_dict_to_params
    from qwen_jax.models import QwenImageTransformer, TransformerConfig
    from qwen_jax.pytree import flatten_params
    from qwen_jax.training import state as state_lib

    cfg = TransformerConfig(**arch, dtype="float32", param_dtype="float32", remat="none")
    params0 = state_dict_to_params(cfg, {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()})
    old_flat = {p: np.asarray(v, np.float64) for p, v in flatten_params(params0).items()}
    model = QwenImageTransformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, params0)
    graphdef, params, frozen = state_lib.split_trainable(model, lora=False)
    mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return cfg, graphdef, params, frozen, old_flat, mesh
