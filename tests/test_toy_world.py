"""The toy world's renderer and the analytic evaluator (qwen_jax.toy, qwen_jax.eval.toy_metrics).

Acceptance (from the issue): on real data (8 seeds per prompt) accuracy 1, clean 1, diversity
1 +- 0.1 and toy-FD near 0; a sigma = 1 px blur loses >= 0.08 clean-pixel fraction; a collapsed set
has diversity 0 and a toy-FD clearly above real data's. Numpy only; the whole file takes a few seconds.
"""

import math

import numpy as np
import pytest
from PIL import Image

from qwen_jax.eval import toy_metrics as tm
from qwen_jax.toy import (IMAGE_SIZE, PALETTE, SHAPES, ToySource, all_prompts, extent, parse_prompt, real_set,
                          render, render_scene, sample_scene)


# ----------------------------------------------------------------------------- renderer


def test_palette_and_prompts():
    assert list(PALETTE) == ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
    assert PALETTE["yellow"] == (255, 255, 0) and PALETTE["black"] == (0, 0, 0)
    prompts = all_prompts()
    assert len(prompts) == 168 == len(set(prompts))
    assert prompts[0] == "a red circle on a green background"
    assert prompts[7] == "a red square on a green background"      # shape after the 7 backgrounds
    assert prompts[21] == "a green circle on a red background"      # then the next fg colour
    for p in prompts:
        fg, shape, bg = parse_prompt(p)
        assert p == f"a {fg} {shape} on a {bg} background" and fg != bg and shape in SHAPES
    for bad in ("a red circle on a red background", "a pink circle on a red background", "red circle"):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_render_conventions():
    # A square of half-side 5 centred at (16, 16) covers x, y in [11, 21]: pixel centres 11.5 .. 20.5,
    # i.e. rows and columns 11..20.
    img = render("white", "square", "black", 16.0, 16.0, 5.0)
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    fg = (img == 255).all(-1)
    assert fg.sum() == 100 and fg[11:21, 11:21].all()
    # Upright triangle: the top rows are narrower than the base rows.
    tri = (render("red", "triangle", "blue", 16.0, 16.0, 9.0) == PALETTE["red"]).all(-1)
    widths = tri.sum(1)[tri.any(1)]
    assert widths[0] < widths[-1] and np.all(np.diff(widths) >= 0)


def test_random_scenes_hard_edges_and_inside():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert 5.0 <= scene["size"] <= 10.0
        left, right, up, down = extent(scene["shape"], scene["size"])
        assert scene["cx"] - left >= 0 and scene["cx"] + right <= IMAGE_SIZE
        assert scene["cy"] - up >= 0 and scene["cy"] + down <= IMAGE_SIZE
        img = render_scene(scene)
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours == {PALETTE[scene["fg"]], PALETTE[scene["bg"]]}       # exactly 2, exact values
        ys, xs = np.nonzero((img == PALETTE[scene["fg"]]).all(-1))
        # Every foreground pixel centre lies inside the shape's extent.
        assert np.all(xs + 0.5 >= scene["cx"] - left) and np.all(xs + 0.5 <= scene["cx"] + right)
        assert np.all(ys + 0.5 >= scene["cy"] - up) and np.all(ys + 0.5 <= scene["cy"] + down)
    prompts = {sample_scene(np.random.default_rng(k))["caption"] for k in range(2000)}
    assert len(prompts) > 160                                                 # uniform over all 168


def test_toy_source_deterministic_by_index():
    a, b = ToySource(3), ToySource(3)
    assert len(a) == 2**31
    x = a[123456789]
    y = b[123456789]                                # no earlier index generated in b
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["caption"] == y["caption"] and x["cx"] == y["cx"]
    assert x["image"].dtype == np.float32 and x["image"].shape == (32, 32, 3)
    assert set(np.unique(x["image"])) <= {-1.0, 1.0}
    np.testing.assert_array_equal(np.round((x["image"] + 1) * 127.5).astype(np.uint8), render_scene(x))
    assert a[0]["caption"] != a[1]["caption"] or a[0]["cx"] != a[1]["cx"]
    assert ToySource(4)[123456789]["cx"] != x["cx"]
    with pytest.raises(IndexError):
        a[2**31]


def test_real_set_layout():
    prompts = all_prompts()[5:8]
    images, captions = real_set(prompts, 4, seed=0)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert captions == [p for p in prompts for _ in range(4)]
    full, _ = real_set(None, 4, seed=0)
    np.testing.assert_array_equal(full[5 * 4:8 * 4], images)                 # a subset gives the same images


# ----------------------------------------------------------------------------- decoder


def _scenes(n, seed):
    rng = np.random.default_rng(seed)
    scenes = []
    for k in range(n):
        scene = sample_scene(rng)
        if k % 4 == 0:  # a quarter at the extremes: the smallest/largest size, pushed to the image edge
            scene["size"] = float(rng.choice([5.0, 10.0]))
            left, right, up, down = extent(scene["shape"], scene["size"])
            scene["cx"] = float(rng.choice([left, IMAGE_SIZE - right]))
            scene["cy"] = float(rng.choice([up, IMAGE_SIZE - down]))
        scenes.append(scene)
    return scenes, np.stack([render_scene(s) for s in scenes])


def test_classifier_exact_on_real_scenes():
    scenes, images = _scenes(2400, seed=1)
    decoded = tm.decode_batch(images)
    shapes = [SHAPES[s] for s in decoded["shape"]]
    assert shapes == [s["shape"] for s in scenes]
    assert [tm.PALETTE_NAMES[f] for f in decoded["fg"]] == [s["fg"] for s in scenes]
    assert [tm.PALETTE_NAMES[b] for b in decoded["bg"]] == [s["bg"] for s in scenes]
    np.testing.assert_array_equal(decoded["clean"], 1.0)
    f = decoded["features"]
    # Pixel-centre sampling: the centroid is within half a pixel, the area-based size close.
    assert np.abs(f[:, 0] - [s["cx"] for s in scenes]).max() < 0.5
    assert np.abs(f[:, 1] - [s["cy"] for s in scenes]).max() < 0.5
    assert np.abs(f[:, 2] - [s["size"] for s in scenes]).mean() < 0.15
    np.testing.assert_allclose(f[:, 4:7], [np.array(PALETTE[s["fg"]]) / 255 for s in scenes])


def test_decode_image_single_fallback_and_strays():
    scene = {"fg": "cyan", "shape": "triangle", "bg": "magenta", "cx": 12.0, "cy": 14.0, "size": 7.0}
    img = render_scene(scene)
    d = tm.decode_image(img.astype(np.float32) / 255)
    assert (d["bg"], d["fg"], d["shape"], d["clean"]) == ("magenta", "cyan", "triangle", 1.0)
    assert abs(d["cx"] - 12) < 0.5 and abs(d["cy"] - 14) < 0.5
    # Stray fg pixels away from the shape: not in the largest component, so geometry is unchanged.
    stray = img.copy()
    stray[28, 28] = stray[2, 29] = PALETTE["cyan"]
    assert tm.decode_image(stray) == {**d, "clean": 1.0}
    # A solid image has no foreground: fallbacks keep the features defined.
    solid = tm.decode_image(render("red", "circle", "blue", 16, 16, 0.1))
    assert solid["fg"] is None and solid["shape"] is None and solid["bg"] == "blue"
    assert (solid["cx"], solid["cy"], solid["size"], solid["fill"]) == (16.0, 16.0, 0.0, 0.0)


def test_frechet_distance():
    # Gaussians in 1D: (m1 - m2)^2 + (s1 - s2)^2.
    assert tm.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 10))
    cov = a @ a.T
    assert tm.frechet_distance(np.zeros(10), cov, np.zeros(10), cov) == pytest.approx(0, abs=1e-8)
    singular = np.diag([1.0, 0.0])   # rank deficient, as a collapsed set's covariance can be
    assert math.isfinite(tm.frechet_distance(np.zeros(2), singular, np.ones(2), np.eye(2)))


# ----------------------------------------------------------------------------- acceptance


@pytest.fixture(scope="module")
def reference():
    return tm.reference_stats(*real_set(None, 16, seed=1))


@pytest.fixture(scope="module")
def real():
    return real_set(None, 8, seed=2)                # independent of the reference


@pytest.fixture(scope="module")
def real_metrics(reference, real):
    return tm.evaluate(*real, reference)


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float in [0, 1], separable Gaussian, reflected edges (so the border
    keeps its colour; zero padding would darken it)."""
    x = images.astype(np.float64) / 255
    radius = math.ceil(3 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="reflect")
        n = x.shape[axis]
        x = sum(t * np.take(padded, np.arange(k, k + n), axis=axis) for k, t in enumerate(taps))
    return x


def test_real_data_scores_perfectly(real, real_metrics):
    images, captions = real
    m = real_metrics
    assert m["accuracy"] == 1.0 and m["clean"] == 1.0 and m["no_foreground"] == 0.0
    assert abs(m["diversity"] - 1.0) < 0.1
    # Positions are in pixels, so a finite sample leaves a floor (~0.1 median, 0.02-0.23 over
    # 20 seeds at these sizes; see toy_metrics' docstring); against itself it is exactly 0.
    assert m["toy_fd"] < 0.2
    assert len(m["per_prompt"]) == 168 and all(p["count"] == 8 for p in m["per_prompt"].values())
    self_ref = tm.reference_stats(images, captions)
    m_self = tm.evaluate(images, captions, self_ref)
    assert m_self["toy_fd"] == pytest.approx(0, abs=1e-6) and m_self["diversity"] == pytest.approx(1)
    table = tm.format_table(m)
    assert all(k in table for k in tm.HEADLINE) and len(table.splitlines()) == 6


def test_blur_loses_clean_pixels(reference, real):
    images, captions = real
    m = tm.evaluate(_gaussian_blur(images, 1.0), captions, reference)
    # Only pixels next to an edge move more than 0.1: ~0.89 stays clean (measured 0.893).
    assert 1.0 - m["clean"] >= 0.08
    assert m["clean"] > 0.8 and m["accuracy"] > 0.95


def test_collapse_shows_in_diversity_and_fd(reference, real, real_metrics):
    images, captions = real
    collapsed = np.repeat(images[::8], 8, axis=0)   # the first seed of every prompt, 8 times
    m_real = real_metrics
    m = tm.evaluate(collapsed, captions, reference)
    assert m["diversity"] == 0.0 and m["accuracy"] == 1.0
    # 168 distinct points instead of 1344: the FD rises ~5x in expectation (4.4x with these seeds).
    assert m["toy_fd"] > 3 * m_real["toy_fd"]


def test_feature_breakdown_finds_the_feature_that_moved(reference, real, real_metrics):
    images, captions = real
    # Every shape moved 3 px right (real shapes lie inside the image, so few wrap): the mean of cx
    # moves by ~3, and almost all of the toy-FD goes when cx is left out, none when cy is.
    shifted = np.roll(images, 3, axis=2)
    m = tm.evaluate(shifted, captions, reference)
    cx, cy = m["features"]["cx"], m["features"]["cy"]
    assert 2.5 < cx["mean"] - cx["real_mean"] < 3.5 and abs(cy["mean"] - cy["real_mean"]) < 0.3
    assert m["toy_fd"] > 5 and cx["fd_without"] < 0.25 * m["toy_fd"] and cy["fd_without"] > 0.9 * m["toy_fd"]
    real_fs = real_metrics["features"]
    assert list(real_fs) == list(tm.FEATURES)
    for name, f in real_fs.items():   # the real set against the reference: every spread within 10 %
        assert abs(f["std"] - f["real_std"]) <= 0.1 * f["real_std"] + 1e-3, name
    table = tm.format_features(m)
    assert all(name in table for name in tm.FEATURES) and f"{m['toy_fd']:.3f}" in table


def test_save_grid(tmp_path):
    images, _ = real_set(all_prompts()[:2], 3, seed=0)
    path = tmp_path / "grid.png"
    tm.save_grid(images, path, cols=3, scale=2)
    with Image.open(path) as im:
        assert im.size == ((3 * 32 + 2 * 2) * 2, (2 * 32 + 2) * 2)
        pixels = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(pixels[:64:2, :64:2], images[0])
