"""Peak memory of the streaming converter against the checkpoint size and its largest tensor.

Writes a synthetic diffusers-layout transformer checkpoint (random fp32, default 24 blocks of
width 1024: ~3.6 GB in 2 GB shards), converts it with tools/convert_weights.py in a child
process, and reports the child's peak resident memory (`ru_maxrss`) next to the checkpoint size,
the largest stacked Flax parameter and the memory of a bare `import qwen_jax` (the baseline).
Prints one JSON line. Run: .venv/bin/python bench/convert_memory.py [--layers 24 --heads 16]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qwen_jax.conversion import transformer_keys as keymap
from qwen_jax.conversion.safetensors_io import write_safetensors
from qwen_jax.models import TransformerConfig
from qwen_jax.models.transformer import abstract_params

REPO = Path(__file__).resolve().parents[1]


def child_peak_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a child Python process running `args`."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    args = p.parse_args()
    cfg = TransformerConfig(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=64,
                            joint_attention_dim=1024, axes_dims_rope=(16, 24, 24))
    flax_shapes = {path: tuple(s.shape) for path, s in abstract_params(cfg).items()}
    decls = []
    for path, shape in flax_shapes.items():
        for layer, key, transpose in keymap.torch_keys_for(path, shape):
            sl = shape[1:] if layer is not None else shape
            decls.append((key, tuple(reversed(sl)) if transpose else sl, np.dtype(np.float32)))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
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
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(src / name, shard, lambda k: rng.standard_normal(dict((d[0], d[1]) for d in shard)[k],
                                                                             dtype=np.float32))
            weight_map.update({d[0]: name for d in shard})
        (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        checkpoint_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
        baseline_mb, _ = child_peak_mb(["-c", "import qwen_jax.conversion.transformer"])
        peak_mb, seconds = child_peak_mb([str(REPO / "tools" / "convert_weights.py"), str(src), str(dst), "--quiet"])
    largest_mb = max(int(np.prod(s)) for s in flax_shapes.values()) * 4 / 2**20
    print(json.dumps({
        "bench": "convert_memory", "layers": args.layers, "width": cfg.inner_dim,
        "checkpoint_mb": round(checkpoint_mb), "largest_stacked_param_mb": round(largest_mb),
        "import_baseline_mb": round(baseline_mb), "convert_peak_rss_mb": round(peak_mb),
        "peak_above_baseline_mb": round(peak_mb - baseline_mb),
        "peak_above_baseline_in_largest_params": round((peak_mb - baseline_mb) / largest_mb, 2),
        "convert_s": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
