"""Converter throughput: tools/convert_weights.py on a synthetic diffusers checkpoint vs raw safetensors reading.

Writes a synthetic diffusers-layout transformer checkpoint as bench/convert_memory.py does (random
fp32, default 24 blocks of width 1024: ~3.5 GB in ~2 GB shards; --quick: 4 blocks of width 256),
then runs, interleaved, each in a fresh child Python process:
  convert  tools/convert_weights.py SRC DST --quiet (its `main`, loaded from the file): every tensor
           read, stacked per parameter into qwen_jax's layout and written as an orbax checkpoint;
  raw      safetensors.safe_open(file, framework="np") and get_tensor for every tensor of every
           shard (each tensor read into a numpy array), nothing written.
Each child times its own work (imports excluded: wall, user and system CPU seconds) and reports
its peak RSS (VmHWM; a safetensors mmap's touched pages count) and the peak after its imports.
MiB/s = checkpoint bytes (MiB) / those seconds; ratio = convert / raw.
Two page-cache states: "warm" (the checkpoint already cached, as right after it was written or
read) and "cold" (the checkpoint files evicted from the guest page cache with
posix_fadvise(DONTNEED) before each run; the VM host may still cache the disk). The converter's
output is deleted and synced to disk after each run, outside the timings. Prints one JSON line.

Run: .venv/bin/python bench/convert_throughput.py [--layers 24 --heads 16] [--repeats 3] [--quick]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, write_synthetic_checkpoint

# ---- children -------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM): unlike ru_maxrss, not inherited from the
    parent at fork/exec (the parent holds jax and the checkpoint writer)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _finish(start: float, cpu0: tuple[float, float], import_mb: float, **extra) -> dict:
    seconds, (u1, s1) = time.perf_counter() - start, _cpu_s()
    return {"seconds": seconds, "user_s": u1 - cpu0[0], "sys_s": s1 - cpu0[1], "import_rss_mb": import_mb,
            "peak_rss_mb": _rss_mb(), **extra}


def child_convert(src: str, dst: str) -> dict:
    import contextlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_weights", REPO / "tools" / "convert_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # imports qwen_jax.conversion (and through it jax, orbax)
    import_mb, cpu0, start = _rss_mb(), _cpu_s(), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the tool prints "wrote DST"; stdout carries our JSON
        rc = tool.main([src, dst, "--quiet"])
    if rc != 0:
        raise SystemExit(f"convert_weights.py exited with {rc}")
    return _finish(start, cpu0, import_mb)


def child_raw(src: str) -> dict:
    from safetensors import safe_open

    import_mb, cpu0, start = _rss_mb(), _cpu_s(), time.perf_counter()
    nbytes, checksum = 0, 0.0
    for path in sorted(Path(src).glob("*.safetensors")):
        with safe_open(path, framework="np") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                arr = f.get_tensor(key)
                nbytes += arr.nbytes
                checksum += float(arr.flat[0])  # touch it
    return _finish(start, cpu0, import_mb, bytes=nbytes)


# ---- parent ---------------------------------------------------------------------------------------


def evict(folder: Path) -> None:
    """Drop the folder's files from the guest page cache (they are clean after os.sync)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(*args: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start  # interpreter start and imports included
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16, help="attention heads of 64 (width = 64 x heads)")
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="runs per tool and cache state (interleaved)")
    p.add_argument("--quick", action="store_true", help="4 blocks of width 256, 2 repeats: a smoke run")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *paths = args.child
        print(json.dumps(child_convert(*paths) if kind == "convert" else child_raw(*paths)))
        return
    if args.quick:
        args.layers, args.heads, args.text_dim, args.repeats = 4, 4, 256, 2

    with tempfile.TemporaryDirectory(prefix="convert_throughput_") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        log(f"writing a synthetic checkpoint ({args.layers} blocks, width {64 * args.heads}) to {src}")
        start = time.perf_counter()
        ckpt = write_synthetic_checkpoint(src, args.layers, args.heads, args.text_dim)
        mb = ckpt["file_bytes"] / 2**20
        log(f"{mb:.0f} MiB in {time.perf_counter() - start:.1f} s")

        results = {cache: {"convert": [], "raw": []} for cache in ("warm", "cold")}

        def convert(cache):
            if cache == "cold":
                evict(src)
            r = run_child("convert", str(src), str(dst))
            shutil.rmtree(dst)
            os.sync()
            return r

        def raw(cache):
            if cache == "cold":
                evict(src)
            r = run_child("raw", str(src))
            if r["bytes"] != ckpt["tensor_bytes"]:
                raise SystemExit(f"raw read {r['bytes']} bytes of tensors, expected the checkpoint's")
            return r

        raw("warm")  # page the checkpoint in (and warm the interpreter's own files) before the first warm run
        for i in range(args.repeats):
            for cache in ("warm", "cold"):
                order = [("convert", convert), ("raw", raw)]
                for name, fn in order if i % 2 == 0 else order[::-1]:
                    results[cache][name].append(fn(cache))
                    r = results[cache][name][-1]
                    log(f"rep {i + 1}/{args.repeats} {cache} {name}: {r['seconds']:.2f} s "
                        f"({mb / r['seconds']:.0f} MiB/s), peak RSS {r['peak_rss_mb']:.0f} MiB")

    def stats(rs: list[dict]) -> dict:
        secs = [r["seconds"] for r in rs]
        return {"s_median": round(statistics.median(secs), 2), "s_min": round(min(secs), 2),
                "mib_per_s": round(mb / statistics.median(secs), 1), "mib_per_s_max": round(mb / min(secs), 1),
                "process_s_median": round(statistics.median(r["process_s"] for r in rs), 2),
                # CPU seconds of the child's work (user, system): what a loaded machine does not inflate
                "user_s_median": round(statistics.median(r["user_s"] for r in rs), 2),
                "sys_s_median": round(statistics.median(r["sys_s"] for r in rs), 2),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)),
                "import_rss_mb": round(statistics.median(r["import_rss_mb"] for r in rs))}

    out = {cache: {name: stats(rs) for name, rs in per.items()} for cache, per in results.items()}
    for per in out.values():
        per["convert_over_raw"] = round(per["convert"]["mib_per_s"] / per["raw"]["mib_per_s"], 3)
    conv = [r for per in results.values() for r in per["convert"]]
    print(json.dumps({
        "bench": "convert_throughput",
        "device": {"cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "config": {"size": "quick" if args.quick else "convert_memory.py's", "layers": args.layers,
                   "width": 64 * args.heads, "text_dim": args.text_dim, "dtype": "float32",
                   "shards": ckpt["shards"], "tensors": ckpt["tensors"]},
        "repeats": args.repeats,
        "checkpoint_mib": round(mb),
        "largest_stacked_param_mib": round(ckpt["largest_mib"]),
        "warm": out["warm"],
        "cold": out["cold"],
        "convert_peak_rss_mb": round(max(r["peak_rss_mb"] for r in conv)),
        "convert_peak_above_import_mb": round(max(r["peak_rss_mb"] - r["import_rss_mb"] for r in conv)),
    }))


if __name__ == "__main__":
    main()
