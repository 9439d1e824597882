"""Aspect-ratio buckets and image decoding for training.

Buckets are (width, height) pairs in pixels, multiples of `step` (16 = 8x VAE downsampling times
2x2 latent packing, so every bucket packs into whole transformer tokens). An image goes to the
bucket whose aspect ratio is closest to its own (in log space, so 2:1 and 1:2 are equally far
from 1:1), is scaled to cover it and centre-cropped: nothing is padded or stretched.

Decoded images are float32 (H, W, 3) arrays in [-1, 1], channel last: the VAE encoder's input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike

import numpy as np
from PIL import Image, ImageOps

Bucket = tuple[int, int]  # (width, height) in pixels

# Qwen-Image's 7 official sizes at its native 1328 resolution (the same table as
# `qwen_jax.pipeline.ASPECT_RATIOS`; repeated here so that data loading never imports the models).
OFFICIAL_RESOLUTION = 1328
OFFICIAL_SIZES: dict[str, Bucket] = {
    "1:1": (1328, 1328), "16:9": (1664, 928), "9:16": (928, 1664), "4:3": (1472, 1104),
    "3:4": (1104, 1472), "3:2": (1584, 1056), "2:3": (1056, 1584),
}
OFFICIAL_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (16, 9), (9, 16), (4, 3), (3, 4), (3, 2), (2, 3))

# EXIF orientations 5-8 rotate by 90 degrees: the stored width is the displayed height.
_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)


def _round_to(x: float, step: int) -> int:
    return max(step, step * round(x / step))


def _unique(sizes) -> tuple[Bucket, ...]:
    return tuple(dict.fromkeys(sizes))  # drops duplicates (small resolutions), keeps the order


def official_buckets(resolution: int = OFFICIAL_RESOLUTION, step: int = 16) -> tuple[Bucket, ...]:
    """The 7 official sizes scaled by `resolution / 1328`, rounded to multiples of `step`.

    1328 gives the official sizes exactly, 2048 the pipeline's `ASPECT_RATIOS_2K`. Sizes that
    coincide after rounding (tiny resolutions) appear once. Order: 1:1, 16:9, 9:16, 4:3, 3:4,
    3:2, 2:3.
    """
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}")
    scale = resolution / OFFICIAL_RESOLUTION
    return _unique((_round_to(w * scale, step), _round_to(h * scale, step))
                   for w, h in OFFICIAL_SIZES.values())


def area_buckets(area: int, ratios: Sequence[tuple[int, int] | float] = OFFICIAL_RATIOS,
                 step: int = 16) -> tuple[Bucket, ...]:
    """One bucket per aspect ratio (w:h pairs or floats w/h), each of about `area` pixels.

    Unlike `official_buckets`, every bucket keeps the area (so the token count) of the square
    one: width = sqrt(area * r), height = sqrt(area / r), rounded to multiples of `step`.
    """
    if area < step * step:
        raise ValueError(f"area {area} is smaller than one {step}x{step} patch")
    out = []
    for ratio in ratios:
        r = ratio[0] / ratio[1] if isinstance(ratio, tuple) else float(ratio)
        if not r > 0:
            raise ValueError(f"aspect ratio must be positive, got {ratio}")
        out.append((_round_to(math.sqrt(area * r), step), _round_to(math.sqrt(area / r), step)))
    return _unique(out)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index into `buckets` of the one whose aspect ratio is closest to width / height.

    Ties go to the earlier bucket, so the choice depends only on the sizes and the bucket order.
    """
    if not buckets:
        raise ValueError("no buckets given")
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def image_size(path: str | PathLike, *, decode: bool = False) -> Bucket:
    """(width, height) as displayed (EXIF rotation applied), from the header alone.

    decode=True also decodes every pixel, which finds truncated files that a header read misses.
    Raises (OSError, PIL.UnidentifiedImageError, ...) when the file is not a readable image.
    """
    with Image.open(path) as im:
        if decode:
            im.load()
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in _ROTATED:
            w, h = h, w
    if w < 1 or h < 1:
        raise ValueError(f"image has no pixels ({w}x{h})")
    return w, h


def _to_rgb(im: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colour; flatten onto white, as a viewer would show them.
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | PathLike, bucket: Bucket) -> np.ndarray:
    """Decode, scale to cover `bucket` = (W, H), centre-crop: float32 (H, W, 3) in [-1, 1].

    Raises whatever PIL raises for a corrupt file (e.g. OSError "image file is truncated");
    the loader catches it and skips the file.
    """
    bw, bh = bucket
    with Image.open(path) as im:
        sw, sh = im.size
        rotated = im.getexif().get(_EXIF_ORIENTATION) in _ROTATED
        ow, oh = (sh, sw) if rotated else (sw, sh)
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for no less than the cover size.
        scale = max(bw / ow, bh / oh)
        im.draft(None, (math.ceil(sw * scale), math.ceil(sh * scale)))
        im = ImageOps.exif_transpose(im)  # decodes all pixels: a truncated file raises here
        im = _to_rgb(im)
    im = ImageOps.fit(im, (bw, bh), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0
