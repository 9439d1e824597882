#!/usr/bin/env python
"""Precompute VAE latents and text embeddings of an image + caption dataset for training.

  python tools/cache_dataset.py --pipeline PIPELINE_DIR --images FOLDER_OR_JSONL --out CACHE_DIR
         [--resolution 1328 | --buckets 64x64,96x64] [--batch-size 8] [--uncond-prompt " "]
         [--max-sequence-length 512] [--overwrite] [--quiet]

Every readable image is resized and centre-cropped to its nearest bucket (the official sizes
scaled to --resolution, or the --buckets WxH list), encoded with its caption by the pipeline's
frozen VAE and text encoder, and stored in CACHE_DIR (layout: `qwen_jax/data/cache.py`).
Unreadable images are skipped and listed. CACHE_DIR appears only when complete; an existing
non-empty one is refused unless --overwrite. Train on it with `Loader(CachedSource(CACHE_DIR))`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """'64x64,96x64' -> [(64, 64), (96, 64)]; ValueError naming --buckets otherwise."""
    out = []
    for item in text.split(","):
        w, sep, h = item.strip().lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise ValueError(f"--buckets: {item.strip()!r} is not WIDTHxHEIGHT (e.g. 64x64,96x64)")
        if int(w) % 16 or int(h) % 16 or int(w) < 16 or int(h) < 16:
            raise ValueError(f"--buckets: {item.strip()} is not a positive multiple of 16 on both sides")
        out.append((int(w), int(h)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="converted (or diffusers) Qwen-Image pipeline folder")
    parser.add_argument("--images", required=True, help="image folder (with .txt captions) or .jsonl manifest")
    parser.add_argument("--out", required=True, help="cache folder to create")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--resolution", type=int, default=1328, help="official buckets at this resolution (1328)")
    sizes.add_argument("--buckets", help="explicit buckets, WIDTHxHEIGHT,... (multiples of 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder call (default 8)")
    parser.add_argument("--uncond-prompt", default=" ", help="unconditional prompt for CFG dropout (default ' ')")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="prompt token limit (default 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from qwen_jax.conversion.errors import ConversionError
    from qwen_jax.data import DataError, ImageCaptionSource, official_buckets, write_cache

    out = Path(args.out).expanduser()
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_sequence_length < 1:
            raise ValueError(f"--max-sequence-length must be >= 1, got {args.max_sequence_length}")
        buckets = parse_buckets(args.buckets) if args.buckets else official_buckets(args.resolution)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise DataError(f"--out {out}: exists and is not empty (choose a new path or pass --overwrite)")
        if not Path(args.pipeline).expanduser().is_dir():
            raise DataError(f"--pipeline {args.pipeline}: no such folder")
        source = ImageCaptionSource(args.images)

        from qwen_jax.training.conditioning import Conditioner

        conditioner = Conditioner.from_pretrained(Path(args.pipeline).expanduser(),
                                                  max_sequence_length=args.max_sequence_length)
        meta = write_cache(out, source, conditioner, buckets=buckets, batch_size=args.batch_size,
                           uncond_prompt=args.uncond_prompt, overwrite=args.overwrite, progress=not args.quiet,
                           pipeline=Path(args.pipeline).expanduser().resolve())
    except (DataError, ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130

    print(f"wrote {out}: {meta['count']} examples in {meta['num_shards']} shard(s)")
    for bucket, n in meta["bucket_counts"].items():
        if n:
            print(f"  {bucket}: {n}")
    print(f"skipped {meta['num_skipped']} unreadable image(s)")
    for path, reason in meta["skipped"]:
        print(f"  {path} ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
