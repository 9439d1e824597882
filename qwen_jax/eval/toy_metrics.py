"""Analytic evaluator for the toy world (`qwen_jax.toy`): decode each image, score it against its caption.

Decoding one image (float RGB in [0, 1], (H, W, 3); uint8 is accepted and divided by 255):
  snapped   every pixel's nearest PALETTE colour (Euclidean in RGB);
  bg        the most frequent snapped colour among the border pixels (ties: PALETTE order);
  fg        the most frequent other snapped colour in the image, None when every pixel snaps to bg;
  mask      the largest 4-connected component of the pixels snapped to fg, so a few stray
            fg-coloured pixels elsewhere do not move the centroid or stretch the bounding box;
  clean     fraction of all pixels within 0.1 (L-infinity, on [0, 1]) of the bg or fg palette colour;
  cx, cy    the mask's centroid in pixels (pixel (i, j) has centre (j + 0.5, i + 0.5), as in the renderer);
  fill      mask area / area of its bounding box (in whole pixels);
  shape     square if fill >= 0.95 (a rendered square is a full rectangle of pixels); otherwise
            triangle if  (v - 1/2) / (1/6) + (pi/4 - fill) / (pi/4 - 1/2) > 0.75,  else circle,
            where v is the centroid's height within the bounding box from its top, as a fraction
            (1/2 for a circle, 2/3 for an upright triangle) and the second term is 0 at a disc's
            fill, 1 at a triangle's. Neither term separates the two alone at radius 5 (fills overlap
            around 0.67); the sum does, with margin: on real scenes a circle scores at most ~0.48 and
            a triangle at least ~1.0, so 0.75 sits in the gap;
  size      from the mask area A and the shape's formula: circle radius sqrt(A/pi), square half-side
            sqrt(A)/2, triangle circumradius sqrt(4A / (3 sqrt 3)).
  No foreground: shape None, centroid = image centre, size 0, fill 0, fg RGB = bg RGB (fallbacks
  that keep every metric defined; such an image never counts as accurate).

Features for toy-FD, 10 per image, in this order:
  [cx, cy, size, fill, fg_r, fg_g, fg_b, bg_r, bg_g, bg_b]
  positions and size in pixels; fill in [0, 1]; colours in [0, 1] = the mean raw colour of the mask
  (fg) and of the pixels snapped to bg (bg).

Metrics (`evaluate(images, captions, reference)`, reference = `reference_stats(real, real_captions)`):
  accuracy   fraction of images whose (bg, fg, shape) all match the caption;
  clean      mean clean-pixel fraction;
  diversity  per prompt, the centroid spread of the generated images divided by the real one,
             averaged over the prompts with >= 2 generated images and a real spread > 0. Spread =
             sqrt((var(cx) + var(cy)) / 2) with ddof=1 (sample variance, so sets of different
             sizes compare without the 1/n bias);
  toy_fd     Frechet distance between Gaussians fitted to the generated and the real features.
             Positions are in pixels, so the centroid (variance ~28 px^2 per axis) dominates, and
             finite samples leave a floor: 1344 real images (8 per prompt) against an independent
             2688-image reference scored 0.02-0.23 (median ~0.1) over 20 seeds, not 0. A collapsed
             set (one image per prompt, repeated) keeps the right marginals with only 168 distinct
             points, so it shows mainly as that floor times ~5 (0.18-2.0, median ~0.5, same seeds);
             `diversity` is the metric that sees collapse directly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from os import PathLike

import numpy as np

from qwen_jax.toy.world import PALETTE, SHAPES, parse_prompt

PALETTE_NAMES = tuple(PALETTE)
PALETTE_UNIT = np.asarray(list(PALETTE.values()), np.float32) / 255.0   # (8, 3) in [0, 1]
FEATURES = ("cx", "cy", "size", "fill", "fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b")
CLEAN_TOLERANCE = 0.1
SQUARE_FILL = 0.95
TRIANGLE_SCORE = 0.75
HEADLINE = ("accuracy", "clean", "diversity", "toy_fd")

_CHUNK = 512   # images decoded at once: bounds the (chunk, H, W) temporaries to a few MB each


def _as_unit(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(images.astype(np.float32), 0.0, 1.0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> the largest 4-connected component of each image (ties: the first found)."""
    n, h, w = mask.shape
    none = n * h * w
    ids = np.arange(none, dtype=np.int64).reshape(n, h, w)
    labels = np.where(mask, ids, none)
    # Min-label propagation, one step to each 4-neighbour per sweep, all images at once: every
    # pixel ends with the smallest id in its component after (component's longest path) sweeps,
    # ~40 for the shapes here. Labels never cross images: the image edges are not wrapped.
    while True:
        new = labels.copy()
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], labels[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], labels[:, :, 1:], out=new[:, :, :-1])
        new[~mask] = none
        if np.array_equal(new, labels):
            break
        labels = new
    sizes = np.bincount(labels[mask], minlength=none).reshape(n, h * w)
    winner = sizes.argmax(axis=1) + np.arange(n) * h * w
    return mask & (labels == winner[:, None, None])


def _counts(indices: np.ndarray) -> np.ndarray:
    """(n, m) palette indices -> (n, 8) how often each colour occurs in each row."""
    k = len(PALETTE_UNIT)
    offsets = np.arange(len(indices))[:, None] * k
    return np.bincount((indices + offsets).ravel(), minlength=len(indices) * k).reshape(-1, k)


def _decode_chunk(x: np.ndarray) -> dict[str, np.ndarray]:
    n, h, w, _ = x.shape
    # Nearest colour: argmin |x - c|^2 = argmin |c|^2 - 2 x.c, one matmul for all 8 colours.
    distance = (PALETTE_UNIT ** 2).sum(-1) - 2 * (x @ PALETTE_UNIT.T)
    snapped = distance.argmin(-1)                                                # (n, h, w)
    border = np.concatenate([snapped[:, 0], snapped[:, -1], snapped[:, 1:-1, 0], snapped[:, 1:-1, -1]], axis=1)
    bg = _counts(border).argmax(1)
    counts = _counts(snapped.reshape(n, -1))
    counts[np.arange(n), bg] = 0
    fg = counts.argmax(1)
    has_fg = counts.max(1) > 0

    def near(index):   # (n, h, w): within CLEAN_TOLERANCE of palette colour index[k] in image k
        return np.abs(x - PALETTE_UNIT[index][:, None, None]).max(-1) <= CLEAN_TOLERANCE
    clean = (near(bg) | (near(fg) & has_fg[:, None, None])).mean((1, 2))

    mask = _largest_component((snapped == fg[:, None, None]) & has_fg[:, None, None])
    area = mask.sum((1, 2)).astype(np.float64)
    safe = np.maximum(area, 1.0)
    centres_y = np.arange(h) + 0.5
    centres_x = np.arange(w) + 0.5
    cy = (mask.sum(2) * centres_y).sum(1) / safe
    cx = (mask.sum(1) * centres_x).sum(1) / safe
    rows, cols = mask.any(2), mask.any(1)
    top = rows.argmax(1)
    height = h - rows[:, ::-1].argmax(1) - top
    width = w - cols[:, ::-1].argmax(1) - cols.argmax(1)
    fill = area / np.maximum(height * width, 1)
    v = (cy - top) / np.maximum(height, 1)
    triangle_score = (v - 0.5) * 6.0 + (math.pi / 4 - fill) / (math.pi / 4 - 0.5)
    shape = np.where(fill >= SQUARE_FILL, 1, np.where(triangle_score > TRIANGLE_SCORE, 2, 0))   # SHAPES order
    size = np.choose(shape, [np.sqrt(area / math.pi), np.sqrt(area) / 2,
                             np.sqrt(4 * area / (3 * math.sqrt(3)))])

    fg_rgb = (x * mask[..., None]).sum((1, 2)) / safe[:, None]
    bg_pixels = snapped == bg[:, None, None]
    bg_rgb = (x * bg_pixels[..., None]).sum((1, 2)) / bg_pixels.sum((1, 2))[:, None]
    found = has_fg & (area > 0)
    cx, cy = np.where(found, cx, w / 2), np.where(found, cy, h / 2)
    size, fill = np.where(found, size, 0.0), np.where(found, fill, 0.0)
    fg_rgb = np.where(found[:, None], fg_rgb, bg_rgb)
    return {"bg": bg, "fg": np.where(found, fg, -1), "shape": np.where(found, shape, -1), "clean": clean,
            "features": np.column_stack([cx, cy, size, fill, fg_rgb, bg_rgb]).astype(np.float64)}


def decode_batch(images) -> dict[str, np.ndarray]:
    """Decode (N, H, W, 3) images at once: {"bg", "fg", "shape"} int arrays (palette / SHAPES
    indices, -1 for no foreground), "clean" (N,), "features" (N, 10) in FEATURES order."""
    x = _as_unit(images)
    parts = [_decode_chunk(x[k:k + _CHUNK]) for k in range(0, len(x), _CHUNK)]
    if not parts:
        return {"bg": np.zeros(0, int), "fg": np.zeros(0, int), "shape": np.zeros(0, int),
                "clean": np.zeros(0), "features": np.zeros((0, len(FEATURES)))}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def decode_names(images) -> list[tuple[str, str | None, str | None]]:
    """(background, foreground, shape) names per image; foreground and shape None when not found."""
    return _names(decode_batch(images))


def _names(decoded: dict) -> list[tuple[str, str | None, str | None]]:
    return [(PALETTE_NAMES[b], PALETTE_NAMES[f] if f >= 0 else None, SHAPES[s] if s >= 0 else None)
            for b, f, s in zip(decoded["bg"], decoded["fg"], decoded["shape"])]


def decode_image(img) -> dict:
    """One image (H, W, 3) in [0, 1] -> {"bg", "fg", "shape", "cx", "cy", "size", "fill", "clean"}
    (names as strings, fg and shape None when no foreground is found; see the module docstring)."""
    decoded = decode_batch(np.asarray(img)[None])
    bg, fg, shape = _names(decoded)[0]
    cx, cy, size, fill = (float(v) for v in decoded["features"][0, :4])
    return {"bg": bg, "fg": fg, "shape": shape, "cx": cx, "cy": cy, "size": size, "fill": fill,
            "clean": float(decoded["clean"][0])}


def _spread(centroids: np.ndarray) -> float:
    """sqrt((var(cx) + var(cy)) / 2), sample variances; nan below 2 points."""
    if len(centroids) < 2:
        return float("nan")
    # Shifting by the first point leaves the variance unchanged but makes identical points give
    # exactly 0 (a mean of equal floats can round away from them).
    return float(np.sqrt((centroids - centroids[0]).var(axis=0, ddof=1).mean()))


def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(0)
    cov = np.cov(features, rowvar=False) if len(features) > 1 else np.zeros((features.shape[1],) * 2)
    return mean, cov


def _by_caption(captions) -> dict[str, np.ndarray]:
    groups = defaultdict(list)
    for k, c in enumerate(captions):
        groups[c].append(k)
    return {c: np.asarray(ks) for c, ks in groups.items()}


def reference_stats(real_images, real_captions) -> dict:
    """Statistics of real data for `evaluate`: {"spread": {caption: centroid spread}, "mean": (10,),
    "cov": (10, 10), "count": N}."""
    if len(real_images) != len(real_captions):
        raise ValueError(f"{len(real_images)} images but {len(real_captions)} captions")
    features = decode_batch(real_images)["features"]
    mean, cov = _gaussian(features)
    spread = {c: _spread(features[ks, :2]) for c, ks in _by_caption(real_captions).items()}
    return {"spread": spread, "mean": mean, "cov": cov, "count": len(features)}


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition; the tiny
    negative eigenvalues that rounding leaves on singular covariances are clipped to 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    tr (cov1 cov2)^(1/2) is computed as the sum of square roots of the eigenvalues of
    cov1^(1/2) cov2 cov1^(1/2), which is similar to cov1 cov2 but symmetric PSD, so no complex
    parts or general sqrtm (and no scipy) are needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root = _sqrt_psd(cov1)
    middle = root @ cov2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean, 0.0))


def evaluate(images, captions, reference: dict) -> dict:
    """Score generated images against their captions and real statistics (module docstring).

    Returns {"accuracy", "clean", "diversity", "toy_fd", "bg_accuracy", "fg_accuracy",
    "shape_accuracy", "no_foreground", "count", "features" (`feature_breakdown`), "per_prompt":
    {caption: {"count", "accuracy", "clean", "spread", "diversity"}}}. Captions must be toy-world
    captions.
    """
    captions = list(captions)
    if len(images) != len(captions) or not captions:
        raise ValueError(f"need one caption per image and at least one image; got {len(images)} images, "
                         f"{len(captions)} captions")
    decoded = decode_batch(images)
    got = _names(decoded)
    want = [parse_prompt(c) for c in captions]
    bg_ok = np.array([g[0] == w[2] for g, w in zip(got, want)])
    fg_ok = np.array([g[1] == w[0] for g, w in zip(got, want)])
    shape_ok = np.array([g[2] == w[1] for g, w in zip(got, want)])
    correct = bg_ok & fg_ok & shape_ok
    features = decoded["features"]

    per_prompt, ratios = {}, []
    for c, ks in _by_caption(captions).items():
        spread = _spread(features[ks, :2])
        real = reference["spread"].get(c, float("nan"))
        ratio = spread / real if np.isfinite(spread) and np.isfinite(real) and real > 0 else float("nan")
        if np.isfinite(ratio):
            ratios.append(ratio)
        per_prompt[c] = {"count": len(ks), "accuracy": float(correct[ks].mean()),
                         "clean": float(decoded["clean"][ks].mean()), "spread": spread, "diversity": ratio}

    mean, cov = _gaussian(features)
    return {
        "accuracy": float(correct.mean()),
        "clean": float(decoded["clean"].mean()),
        "diversity": float(np.mean(ratios)) if ratios else float("nan"),
        "toy_fd": frechet_distance(mean, cov, reference["mean"], reference["cov"]),
        "bg_accuracy": float(bg_ok.mean()), "fg_accuracy": float(fg_ok.mean()),
        "shape_accuracy": float(shape_ok.mean()), "no_foreground": float((decoded["fg"] < 0).mean()),
        "count": len(captions), "features": feature_breakdown(mean, cov, reference), "per_prompt": per_prompt,
    }


def feature_breakdown(mean: np.ndarray, cov: np.ndarray, reference: dict) -> dict:
    """Where the toy-FD comes from, one entry per feature: {name: {"mean", "std", "real_mean",
    "real_std", "fd_without"}}, `fd_without` being the toy-FD with that feature left out (so
    toy_fd - fd_without is what the feature costs, its correlations with the others included)."""
    real_mean, real_cov = reference["mean"], reference["cov"]
    out = {}
    for i, name in enumerate(FEATURES):
        keep = np.array([j for j in range(len(FEATURES)) if j != i])
        out[name] = {"mean": float(mean[i]), "std": float(np.sqrt(max(cov[i, i], 0.0))),
                     "real_mean": float(real_mean[i]), "real_std": float(np.sqrt(max(real_cov[i, i], 0.0))),
                     "fd_without": frechet_distance(mean[keep], cov[np.ix_(keep, keep)], real_mean[keep],
                                                    real_cov[np.ix_(keep, keep)])}
    return out


def format_table(metrics: dict) -> str:
    """The four headline metrics as a small aligned two-column text table."""
    width = max(len(k) for k in HEADLINE)
    lines = [f"{'metric':<{width}}  {'value':>8}", f"{'-' * width}  {'-' * 8}"]
    lines += [f"{k:<{width}}  {metrics[k]:>8.4f}" for k in HEADLINE]
    return "\n".join(lines)


def format_features(metrics: dict) -> str:
    """The toy-FD feature by feature (`feature_breakdown`): generated and real mean and standard
    deviation, and the toy-FD without the feature."""
    lines = [f"{'feature':<8} {'mean':>7} {'real':>7} {'std':>7} {'real':>7}  {'toy-FD without':>14}",
             "-" * 56]
    for name, f in metrics["features"].items():
        lines.append(f"{name:<8} {f['mean']:>7.3f} {f['real_mean']:>7.3f} {f['std']:>7.3f} {f['real_std']:>7.3f}"
                     f"  {f['fd_without']:>14.3f}")
    return "\n".join(lines + [f"(toy-FD with every feature: {metrics['toy_fd']:.3f})"])


def format_comparison(rows: dict[str, dict]) -> str:
    """One line per model (label -> metrics), the four headline metrics as columns."""
    width = max(len(label) for label in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{k:>9}" for k in HEADLINE), "-" * (width + 11 * len(HEADLINE))]
    lines += [f"{label:<{width}}  " + "  ".join(f"{m[k]:>9.4f}" for k in HEADLINE) for label, m in rows.items()]
    return "\n".join(lines)


def save_comparison(panels: dict[str, np.ndarray], path: str | PathLike, cols: int, scale: int = 3) -> None:
    """Side-by-side grids (label -> images of the same prompts and seeds, `cols` per row), each
    under its label, so a reader sees at once what each sampler does to the same noise."""
    from PIL import Image, ImageDraw

    from qwen_jax.sampling.grid import image_grid

    grids = [np.round(image_grid(_as_unit(images), cols=cols) * 255).astype(np.uint8) for images in panels.values()]
    grids = [g.repeat(scale, axis=0).repeat(scale, axis=1) for g in grids]
    gap, header = 12, 16
    height = header + max(g.shape[0] for g in grids)
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, x = ImageDraw.Draw(canvas), 0
    for label, grid in zip(panels, grids):
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(grid), (x, header))
        x += grid.shape[1] + gap
    canvas.save(path, format="PNG")


def save_grid(images, path: str | PathLike, cols: int | None = None, scale: int = 4) -> None:
    """Write images (uint8, or float in [0, 1]) as one PNG grid, each pixel `scale` x `scale`
    (nearest neighbour, so hard edges stay hard and 32-pixel images stay visible)."""
    from PIL import Image

    from qwen_jax.sampling.grid import image_grid

    grid = image_grid(_as_unit(images), cols=cols)
    pixels = np.round(grid * 255).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(pixels).save(path, format="PNG")
