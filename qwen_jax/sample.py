"""Sample images from a converted Qwen-Image folder.

  python -m qwen_jax.sample --model DIR --prompt "a fox in the snow" --out samples/
  python -m qwen_jax.sample --model DIR --prompt-file prompts.txt --steps 2 --guidance 1 \\
      --fixed-shift 3 --num-images 4 --seed 7 --out samples/          # a 2-step student
  python -m qwen_jax.sample --model DIR --prompt "..." --height 2048 --width 2048 \\
      --sequence-shards 8 --out samples/      # one 2048x2048 image split over 8 devices

Writes one PNG per image and `manifest.jsonl` (file, prompt, seed, steps, guidance, size,
seconds per image). Prompts are processed in batches of --batch-size; each batch is one
compiled sampling call (the first batch of a shape includes compilation).

With --sequence-shards N, the transformer runs on all local devices as a mesh of
data = devices / N and sequence = N: each image's tokens are split N ways, and a batch is split
over the data axis (use a --batch-size it divides; otherwise every data replica runs the whole
batch). The image token count, (height / 16) * (width / 16), must divide by N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwen_jax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="converted folder, diffusers folder or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (default ' ')")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0, help="true CFG scale; 1 disables CFG")
    p.add_argument("--fixed-shift", type=float, help="use a fixed-shift schedule (3 for distilled students)")
    p.add_argument("--height", type=int, default=1328)
    p.add_argument("--width", type=int, default=1328)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter/compute dtype (default: stored)")
    p.add_argument("--sequence-shards", type=int, default=1,
                   help="split each image's tokens over this many devices (sequence parallelism)")
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompt_file)
    if not path.is_file():
        raise SystemExit(f"error: --prompt-file {path}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: --prompt-file {path}: no prompts in it")
    return prompts


def sequence_mesh(shards: int, num_image_tokens: int):
    """None for 1 shard; else a (data = devices / shards, sequence = shards) mesh of the local devices."""
    if shards == 1:
        return None
    import jax

    from qwen_jax.models.sequence_parallel import check_divisible
    from qwen_jax.sharding import make_mesh

    check_divisible(num_image_tokens, shards)
    return make_mesh(data=-1, fsdp=1, sequence=shards, devices=jax.local_devices())


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args)
    if args.steps < 1 or args.num_images < 1 or args.batch_size < 1 or args.sequence_shards < 1:
        raise SystemExit("error: --steps, --num-images, --batch-size and --sequence-shards must be >= 1")
    from qwen_jax import flow
    from qwen_jax.conversion.errors import ConversionError
    from qwen_jax.pipeline import PIXELS_PER_TOKEN, Pipeline

    scheduler = flow.SchedulerConfig.fixed_shift(args.fixed_shift) if args.fixed_shift else None
    try:  # before loading: a mesh that cannot hold the image is reported at once
        mesh = sequence_mesh(args.sequence_shards, (args.height // PIXELS_PER_TOKEN) * (args.width // PIXELS_PER_TOKEN))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype, scheduler=scheduler, mesh=mesh)
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # (index, prompt, seed): image i of the run uses seed + i, whatever the batching.
    jobs = [(i, p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_images))]
    negative = args.negative_prompt if args.guidance > 1 else None
    with open(out / "manifest.jsonl", "a") as manifest, tqdm(total=len(jobs), unit="img") as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start:start + args.batch_size]
            t0 = time.perf_counter()
            result = pipe([p for _, p, _ in batch], negative, height=args.height, width=args.width,
                          num_steps=args.steps, guidance=args.guidance, seed=[s for _, _, s in batch])
            seconds = (time.perf_counter() - t0) / len(batch)
            for (index, prompt, seed), image in zip(batch, result.images):
                name = f"{index:05d}_seed{seed}.png"
                image.save(out / name)
                manifest.write(json.dumps(dict(file=name, prompt=prompt, seed=seed, steps=args.steps,
                                               guidance=args.guidance, height=args.height, width=args.width,
                                               seconds=round(seconds, 3))) + "\n")
            bar.set_postfix(s_per_img=f"{seconds:.2f}")
            bar.update(len(batch))
    print(f"wrote {len(jobs)} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
