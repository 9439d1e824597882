"""The toy world: 32x32 RGB images of one solid shape on a solid background, with exact captions.

A scene is one foreground shape in one palette colour on a background of another palette colour:

    {"fg": "red", "shape": "circle", "bg": "blue", "cx": 14.2, "cy": 20.7, "size": 6.3,
     "caption": "a red circle on a blue background"}

Geometry (in pixels, continuous image coordinates: x to the right, y down, the image is [0, 32)^2):
  pixel (i, j) = row i, column j covers the unit square whose centre is (x, y) = (j + 0.5, i + 0.5);
  a pixel is foreground iff its centre lies inside the (closed) shape, so edges are hard: every
  rendered image holds exactly two colours, both exact palette values.
  circle    centre (cx, cy), radius `size`;
  square    axis-aligned, centre (cx, cy), half-side `size`;
  triangle  upright equilateral with circumcentre (cx, cy) and circumradius r = `size`: top vertex
            (cx, cy - r), base at y = cy + r/2 from x = cx - r*sqrt(3)/2 to cx + r*sqrt(3)/2.
  `size` ~ U[5, 10]; the centre is uniform over the positions where the whole shape lies inside
  the image (extents in `extent`). Size and position are not in the caption: they are the variety
  a generator has to keep.

Prompts: "a {fg} {shape} on a {bg} background", fg != bg, 8 * 3 * 7 = 168 of them. `all_prompts()`
orders them fg-major in PALETTE order, then shape in SHAPES order, then bg in PALETTE order
(skipping fg): index = (fg_index * 3 + shape_index) * 7 + rank of bg among the other 7 colours.

Data:
  ToySource(seed)[i] -> {"image": float32 (32, 32, 3) in [-1, 1], "caption", "fg", "shape", "bg",
                         "cx", "cy", "size"}; element i is drawn from np.random.default_rng([seed, i])
                         alone, so any index is reproducible without generating the earlier ones.
                         len() is 2**31 (effectively unlimited; a grain random-access source).
  real_set(prompts, k, seed) -> (uint8 (N, 32, 32, 3), captions), prompt-major: k scenes of the
                         first prompt, then k of the second, ...; scene s of prompt p is drawn from
                         default_rng([seed, all_prompts().index(p), s]), so a subset of prompts
                         gives the same images as the full set.
"""

from __future__ import annotations

import math

import numpy as np

IMAGE_SIZE = 32
MIN_SIZE, MAX_SIZE = 5.0, 10.0

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")

_SQRT3 = math.sqrt(3.0)
_PREFIX, _MIDDLE, _SUFFIX = "a ", " on a ", " background"


def caption(fg: str, shape: str, bg: str) -> str:
    return f"{_PREFIX}{fg} {shape}{_MIDDLE}{bg}{_SUFFIX}"


def _build_prompts() -> tuple[str, ...]:
    return tuple(caption(fg, shape, bg) for fg in PALETTE for shape in SHAPES for bg in PALETTE if bg != fg)


_PROMPTS = _build_prompts()
_PROMPT_INDEX = {p: k for k, p in enumerate(_PROMPTS)}


def all_prompts() -> list[str]:
    """The 168 captions, fg-major, then shape, then bg (see the module docstring)."""
    return list(_PROMPTS)


def prompt_index(caption_text: str) -> int:
    """Position of a caption in `all_prompts()`; ValueError for anything else."""
    try:
        return _PROMPT_INDEX[caption_text]
    except KeyError:
        raise ValueError(f"not a toy-world caption: {caption_text!r}") from None


def parse_prompt(caption_text: str) -> tuple[str, str, str]:
    """"a red circle on a blue background" -> ("red", "circle", "blue"); ValueError if malformed."""
    # Only the 168 valid captions parse: a lookup, not a regex, so "a red circle on a red
    # background" or an unknown colour is rejected just the same.
    index = prompt_index(caption_text)
    fg_shape, bg = caption_text[len(_PREFIX):-len(_SUFFIX)].split(_MIDDLE)
    fg, shape = fg_shape.split(" ")
    assert _PROMPTS[index] == caption(fg, shape, bg)
    return fg, shape, bg


def extent(shape: str, size: float) -> tuple[float, float, float, float]:
    """How far the shape reaches from its centre: (left, right, up, down), all >= 0."""
    if shape in ("circle", "square"):
        return size, size, size, size
    if shape == "triangle":
        half_width = size * _SQRT3 / 2
        return half_width, half_width, size, size / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) bool: pixel (i, j) is foreground iff its centre (j + 0.5, i + 0.5) is inside the shape."""
    centres = np.arange(image_size, dtype=np.float64) + 0.5
    dx = centres[None, :] - cx
    dy = centres[:, None] - cy
    if shape == "circle":
        return dx * dx + dy * dy <= size * size
    if shape == "square":
        return (np.abs(dx) <= size) & (np.abs(dy) <= size)
    if shape == "triangle":
        # Half-width grows linearly from 0 at the top vertex (dy = -r) to r*sqrt(3)/2 at the
        # base (dy = r/2): (dy + r) / sqrt(3).
        return (dy <= size / 2) & (np.abs(dx) * _SQRT3 <= dy + size)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(fg: str, shape: str, bg: str, cx: float, cy: float, size: float) -> np.ndarray:
    """One scene as uint8 (32, 32, 3): exact palette values, no anti-aliasing."""
    if fg not in PALETTE or bg not in PALETTE:
        raise ValueError(f"colours must be in PALETTE {list(PALETTE)}; got fg={fg!r}, bg={bg!r}")
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[...] = PALETTE[bg]
    image[shape_mask(shape, cx, cy, size)] = PALETTE[fg]
    return image


def sample_scene(rng: np.random.Generator, prompt: str | None = None) -> dict:
    """A random scene: the prompt uniform over the 168 (unless given), size U[5, 10], the centre
    uniform over the positions that keep the whole shape inside the image."""
    if prompt is None:
        prompt = _PROMPTS[int(rng.integers(len(_PROMPTS)))]
    fg, shape, bg = parse_prompt(prompt)
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    left, right, up, down = extent(shape, size)
    cx = float(rng.uniform(left, IMAGE_SIZE - right))
    cy = float(rng.uniform(up, IMAGE_SIZE - down))
    return {"fg": fg, "shape": shape, "bg": bg, "cx": cx, "cy": cy, "size": size, "caption": prompt}


def render_scene(scene: dict) -> np.ndarray:
    return render(scene["fg"], scene["shape"], scene["bg"], scene["cx"], scene["cy"], scene["size"])


class ToySource:
    """Deterministic, effectively unlimited map-style source of toy scenes (see the module docstring)."""

    LENGTH = 2**31

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.LENGTH

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.LENGTH
        if not 0 <= index < self.LENGTH:
            raise IndexError(f"index {index} out of range for ToySource of length {self.LENGTH}")
        scene = sample_scene(np.random.default_rng([self.seed, index]))
        image = render_scene(scene).astype(np.float32) / 127.5 - 1.0
        return {"image": image, **scene}

    def __repr__(self) -> str:
        return f"ToySource(seed={self.seed})"


def real_set(prompts: list[str] | None = None, seeds_per_prompt: int = 8,
             seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Reference images for the evaluator: uint8 (N, 32, 32, 3) and their captions, prompt-major.

    `prompts` defaults to `all_prompts()`; N = len(prompts) * seeds_per_prompt.
    """
    prompts = all_prompts() if prompts is None else list(prompts)
    images = np.empty((len(prompts) * seeds_per_prompt, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions = []
    for k, prompt in enumerate(prompts):
        index = prompt_index(prompt)
        for s in range(seeds_per_prompt):
            scene = sample_scene(np.random.default_rng([seed, index, s]), prompt)
            images[k * seeds_per_prompt + s] = render_scene(scene)
            captions.append(prompt)
    return images, captions
