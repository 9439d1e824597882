#!/usr/bin/env python
"""Convert Qwen-Image transformer weights between diffusers/ComfyUI safetensors and qwen_jax.

  python tools/convert_weights.py SRC DST                      # PyTorch (diffusers/ComfyUI) -> Flax
  python tools/convert_weights.py --to diffusers SRC DST       # Flax transformer -> diffusers folder

SRC for the default direction: a whole Qwen-Image folder (transformer, vae and text_encoder are
converted, tokenizer and scheduler copied), a transformer/ folder (sharded or not), or one
.safetensors transformer file (ComfyUI prefixes are stripped). DST must not exist or be empty;
it appears only when the conversion has fully succeeded. Pickle files are refused.
"""

from __future__ import annotations

import argparse
import sys

from qwen_jax.conversion.errors import ConversionError
from qwen_jax.conversion.pipeline import convert_pipeline, is_pipeline_folder
from qwen_jax.conversion.transformer import diffusers_to_flax, flax_to_diffusers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source checkpoint (file or folder)")
    parser.add_argument("dst", help="destination folder (created)")
    parser.add_argument("--to", choices=("flax", "diffusers"), default="flax", help="target format (default flax)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="cast parameters to this dtype (default: keep the stored dtype)")
    parser.add_argument("--config", help="diffusers transformer config.json to use (for single files without one)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size for --to diffusers (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.to == "flax" and is_pipeline_folder(args.src):
            if args.config:
                parser.error("--config applies to single transformer checkpoints only")
            for line in convert_pipeline(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                         progress=not args.quiet):
                print(line)
        elif args.to == "flax":
            diffusers_to_flax(args.src, args.dst, dtype=args.dtype, config=args.config,
                              overwrite=args.overwrite, progress=not args.quiet)
        else:
            if args.config:
                parser.error("--config applies to the flax direction only")
            flax_to_diffusers(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                              overwrite=args.overwrite, progress=not args.quiet)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
