"""The GAN's real pool: real images with their captions, a share of them replaced by teacher samples.

DMD2's discriminator sees real photos; the Wuli team also mixed in teacher samples, which match
the student's prompts and style. `gan.real_share` is the expected fraction of real rows;
the other rows of each batch are drawn from `gan.teacher_pool`, any image + caption dataset,
typically the manifest the sampler writes:

    python -m qwen_jax.sample --model TEACHER --prompt-file prompts.txt --num-images 8 \\
        --steps 50 --guidance 4 --out pool/          # -> pool/manifest.jsonl (file, prompt)
    ... --config.gan.real_share=0.5 --config.gan.teacher_pool=pool/manifest.jsonl

Which rows are swapped, and for which pool images, is drawn from (seed, step) for the whole
global batch, so it does not depend on the number of hosts and a resumed run draws the same.
Each swapped row carries its own caption, so the fake samples of that row follow it too.
"""

from __future__ import annotations

import numpy as np

from qwen_jax import data as data_lib
from qwen_jax.data.images import load_image


def check_mix(real_share: float, pool: str) -> None:
    """The one check of the mix settings: by DMD2's config check (before anything loads) and here."""
    if not 0.0 <= real_share <= 1.0:
        raise ValueError(f"config.gan.real_share={real_share} must be in [0, 1]")
    if real_share < 1 and not pool:
        raise ValueError("config.gan.real_share < 1 needs config.gan.teacher_pool (images + captions)")


class TeacherPoolMixer:
    def __init__(self, pool: str, real_share: float, seed: int):
        check_mix(real_share, pool)
        self.source = data_lib.ImageCaptionSource(pool)
        self.real_share, self.seed = real_share, seed

    def __call__(self, raw: dict, step: int, offset: int, global_batch: int) -> dict:
        """raw {"images": (b, H, W, 3) in [-1, 1], "captions"} -> the same with the drawn rows swapped."""
        if "images" not in raw:
            raise ValueError("config.gan.teacher_pool mixes images: train from images or the toy world, not a cache")
        rng = np.random.default_rng([self.seed, step, 7])
        swap = rng.random(global_batch) >= self.real_share
        picks = rng.integers(0, len(self.source), global_batch)
        images, captions = np.array(raw["images"], copy=True), list(raw["captions"])
        height, width = images.shape[1:3]
        for row in range(len(captions)):
            if swap[offset + row]:
                index = int(picks[offset + row])
                if tuple(self.source.sizes[index]) != (width, height):
                    raise ValueError(f"teacher pool image {self.source.paths[index]} is {self.source.sizes[index]}, "
                                     f"the batch is {width}x{height}: sample the pool at the training size")
                images[row] = load_image(self.source.paths[index], (width, height))
                captions[row] = self.source.captions[index]
        return {**raw, "images": images, "captions": captions, "teacher_rows": swap[offset:offset + len(captions)]}


def mixer_from_config(config) -> TeacherPoolMixer | None:
    gan = config.get("gan")
    if gan is None or gan.real_share >= 1.0 or gan.disc_weight <= 0:
        return None
    return TeacherPoolMixer(gan.teacher_pool, gan.real_share, config.seed)
