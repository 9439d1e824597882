"""Teacher ODE pairs for DMD2's optional regression loss: (initial noise, teacher sample, caption).

DMD1 (Yin et al. 2024) adds to the distribution-matching loss a regression on precomputed teacher
ODE pairs: from the same initial noise z and caption, the student's sample should be the
teacher's many-step CFG sample. DMD2 dropped it for a GAN; we keep it as an option
(`dmd2.regression_weight`, `dmd2.regression_pairs`) because it anchors what the DM loss alone
lets drift: where the student puts things. The DM loss matches distributions through two
imperfect scores, and any bias between them moves every sample the same way; a pair pins the
noise -> image map itself. (DMD1 used LPIPS on decoded images; we use MSE on latents, which for
the toy world's pixel codec is MSE on pixels.)

    python -m qwen_jax.distillation.ode_pairs --model runs/demo/teacher --toy-prompts \\
        --per-prompt 8 --steps 50 --guidance 2 --out runs/pairs.npz

File: one .npz with `noise` and `latents` (N, L_img, C) float32, packed as the sampler packs
them; `captions` (N,) str; `height`, `width`. The noise comes from seeds `seed + i`, far from
the evaluator's (1000 k + s), so that the student is not trained on the noise it is scored on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen_jax.distillation.losses import should_update_generator

PAIR_KEYS = ("noise", "latents", "captions", "height", "width")
DEFAULT_SEED = 1_000_000


def make_pairs(pipe, prompts, per_prompt: int, *, steps: int, guidance: float, negative: str | None,
               height: int, width: int, seed: int = DEFAULT_SEED, batch_size: int = 64,
               progress: bool = True) -> dict:
    """`per_prompt` teacher samples of each prompt: {"noise", "latents", "captions", "height", "width"}."""
    from qwen_jax.models.latents import pack_latents
    from qwen_jax.sampling import sampler

    jobs = [p for p in prompts for _ in range(per_prompt)]
    px, channels = pipe.pixels_per_token, pipe.transformer.config.in_channels
    noise_shape = (2 * (height // px), 2 * (width // px), channels // 4)
    noises, latents = [], []
    for start in tqdm(range(0, len(jobs), batch_size), desc="teacher pairs", disable=not progress):
        chunk = jobs[start:start + batch_size]
        pad = batch_size - len(chunk)  # one compiled shape: pad the last batch with repeats
        seeds = [seed + start + i for i in range(len(chunk))] + [seed + start + len(chunk) - 1] * pad
        z = np.asarray(pack_latents(sampler.initial_noise(seeds, noise_shape)), np.float32)
        out = pipe(chunk + [chunk[-1]] * pad, negative if guidance > 1 else None, height=height, width=width,
                   num_steps=steps, guidance=guidance, latents=z)
        noises.append(z[:len(chunk)])
        latents.append(out.latents[:len(chunk)])
    return {"noise": np.concatenate(noises), "latents": np.concatenate(latents),
            "captions": np.asarray(jobs, dtype=str), "height": np.int64(height), "width": np.int64(width)}


def save_pairs(path: str | os.PathLike, pairs: dict) -> None:
    """Writes the .npz through a temporary sibling, so a failed run leaves nothing half-written."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: regression pairs are one .npz file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **{k: pairs[k] for k in PAIR_KEYS})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_pairs(path: str | os.PathLike) -> dict:
    """Reads and checks a pairs file (never unpickles); errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config.dmd2.regression_pairs: {path} does not exist "
                                "(make it with python -m qwen_jax.distillation.ode_pairs)")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in PAIR_KEYS if k not in f]
        if missing:
            raise ValueError(f"{path}: not a regression-pairs file, missing {', '.join(missing)}")
        pairs = {k: f[k] for k in PAIR_KEYS}
    n = len(pairs["captions"])
    for key in ("noise", "latents"):
        if pairs[key].ndim != 3 or len(pairs[key]) != n:
            raise ValueError(f"{path}: {key} has shape {pairs[key].shape}, want ({n}, L_img, C)")
    if pairs["noise"].shape != pairs["latents"].shape:
        raise ValueError(f"{path}: noise {pairs['noise'].shape} and latents {pairs['latents'].shape} differ")
    return pairs


class PairSampler:
    """Draws each generator turn's pair rows from (seed, step) for the whole global batch, so a
    resumed run or another process count draws the same rows; returns this process's slice.
    `wanted(step)`: whether iteration `step` is a generator turn (the only turns that use pairs)
    before `until` (0: no end)."""

    def __init__(self, path: str | os.PathLike, seed: int, ratio: int = 1, until: int = 0):
        self.pairs = load_pairs(path)
        self.seed, self.ratio, self.until = seed, ratio, until

    def wanted(self, step: int) -> bool:
        return bool(should_update_generator(step, self.ratio)) and (not self.until or step < self.until)

    def __call__(self, step: int, offset: int, local_batch: int, global_batch: int) -> dict:
        rows = np.random.default_rng([self.seed, step, 11]).integers(0, len(self.pairs["captions"]), global_batch)
        rows = rows[offset:offset + local_batch]
        return {"noise": self.pairs["noise"][rows], "latents": self.pairs["latents"][rows],
                "captions": [str(c) for c in self.pairs["captions"][rows]]}


def sampler_from_config(config) -> PairSampler | None:
    """The pair sampler a DMD2 config asks for (dmd2.regression_weight > 0), else None."""
    dmd2 = config.get("dmd2")
    if dmd2 is None or not dmd2.get("regression_weight", 0.0):
        return None
    return PairSampler(dmd2.regression_pairs, config.seed, dmd2.dfake_gen_update_ratio, dmd2.regression_until)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.distillation.ode_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the teacher: a pipeline folder")
    p.add_argument("--out", required=True, help="the .npz to write")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt-file", help="one prompt per line")
    prompts.add_argument("--toy-prompts", action="store_true", help="the toy world's 168 prompts")
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--negative", default=" ")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    try:
        if args.toy_prompts:
            from qwen_jax.toy import all_prompts
            prompt_list = list(all_prompts())
        else:
            lines = Path(args.prompt_file).read_text().splitlines()
            prompt_list = [line.strip() for line in lines if line.strip()]
            if not prompt_list:
                raise ValueError(f"{args.prompt_file}: no prompts")
        if args.per_prompt < 1:
            raise ValueError(f"--per-prompt={args.per_prompt}: must be >= 1")
        from qwen_jax.pipeline import Pipeline
        pipe = Pipeline.from_pretrained(args.model)
        pairs = make_pairs(pipe, prompt_list, args.per_prompt, steps=args.steps, guidance=args.guidance,
                           negative=args.negative, height=args.height, width=args.width, seed=args.seed,
                           batch_size=args.batch_size)
        save_pairs(args.out, pairs)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(pairs['captions'])} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
