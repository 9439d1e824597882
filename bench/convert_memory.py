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

from common import write_synthetic_checkpoint

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
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        ckpt = write_synthetic_checkpoint(src, args.layers, args.heads, 1024)
        checkpoint_mb = ckpt["file_bytes"] / 2**20
        baseline_mb, _ = child_peak_mb(["-c", "import qwen_jax.conversion.transformer"])
        peak_mb, seconds = child_peak_mb([str(REPO / "tools" / "convert_weights.py"), str(src), str(dst), "--quiet"])
    largest_mb = ckpt["largest_mib"]
    print(json.dumps({
        "bench": "convert_memory", "layers": args.layers, "width": 64 * args.heads,
        "checkpoint_mb": round(checkpoint_mb), "largest_stacked_param_mb": round(largest_mb),
        "import_baseline_mb": round(baseline_mb), "convert_peak_rss_mb": round(peak_mb),
        "peak_above_baseline_mb": round(peak_mb - baseline_mb),
        "peak_above_baseline_in_largest_params": round((peak_mb - baseline_mb) / largest_mb, 2),
        "convert_s": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
