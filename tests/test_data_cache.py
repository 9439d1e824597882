"""Latent + text-embedding caches: exact contents, skips, Loader batches and order, resume, the CLI."""

import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from tiny_pipeline import tiny_pipeline_dir  # noqa: F401

from qwen_jax.data import CachedSource, DataError, ImageCaptionSource, Loader, load_image, write_cache
from qwen_jax.training.conditioning import Conditioner

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cache_dataset", REPO / "tools" / "cache_dataset.py")
cache_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cache_dataset)

BUCKETS = ((32, 32), (48, 32))
GOOD = {"a.png": (32, 32), "b.jpg": (40, 40), "c.png": (32, 32), "d.png": (64, 64), "e.webp": (48, 32),
        "f.png": (72, 48), "g.jpg": (48, 32), "h.png": (96, 64)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """8 good images (4 square, 4 at 3:2, each with a caption of its own length) and a truncated JPEG."""
    root = tmp_path_factory.mktemp("cache_images")
    rng = np.random.default_rng(0)
    for i, (name, (w, h)) in enumerate(GOOD.items()):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"photo {name} " + "with words " * (i * 5))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


@pytest.fixture(scope="module")
def conditioner(tiny_pipeline_dir):  # noqa: F811
    return Conditioner.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, folder, conditioner):
    out = tmp_path_factory.mktemp("caches") / "cache"
    write_cache(out, ImageCaptionSource(folder), conditioner, buckets=BUCKETS, batch_size=2, shard_size=3,
                progress=False, pipeline="tiny")
    return out


def test_cache_holds_what_the_conditioner_computes(cache, folder, conditioner):
    src = CachedSource(cache)
    meta = src.metadata
    assert len(src) == meta["count"] == 8 and meta["num_shards"] == 3 and len(list(cache.glob("shard-*"))) == 3
    assert (meta["spatial_factor"], meta["latent_channels"], meta["text_dim"]) == (4, 4, 64)
    assert meta["bucket_counts"] == {"32x32": 4, "48x32": 4} and meta["pipeline"] == "tiny"
    assert meta["num_skipped"] == 1 and meta["skipped"][0][0] == str(folder / "trunc.jpg")
    assert src.skipped == [] and src.num_skipped == 0
    assert [Path(p).name for p in src.paths] == list(GOOD)  # source order, truncated file left out
    for i, path in enumerate(src.paths):
        w, h = src.sizes[i]
        assert (w, h) == (BUCKETS[0] if GOOD[Path(path).name][0] == GOOD[Path(path).name][1] else BUCKETS[1])
        latents, embeds = src.load(i)
        # encoded directly, in batches of two (XLA's batch-1 kernels round differently, by ~1e-6)
        pixels = load_image(path, (w, h))
        want = np.asarray(conditioner.encode_images(np.stack([pixels, np.zeros_like(pixels)])))[0]
        assert latents.shape == (h // 4, w // 4, 4) and latents.dtype == np.float32
        assert np.abs(latents - want).max() <= 1e-6
        full, mask = (np.asarray(a) for a in conditioner.encode_text([src.captions[i], "x"]))
        n = int(mask[0].sum())
        assert embeds.shape == (n, 64) == (src.text_lengths[i], 64) and embeds.dtype == np.float32
        assert np.abs(embeds - full[0, :n]).max() <= 1e-6
    assert src.captions[1] == (folder / "b.txt").read_text().strip()
    full, mask = (np.asarray(a) for a in conditioner.encode_text([" ", " "]))
    uncond, umask = src.uncond()
    n = int(mask[0].sum())
    assert uncond.shape == (1, n, 64) and umask.tolist() == [[1] * n]
    np.testing.assert_array_equal(uncond[0], full[0, :n])
    with safe_open(str(cache / "shard-00000.safetensors"), framework="numpy") as f:
        assert len(list(f.keys())) == 6  # 3 examples per shard, 2 tensors each


def test_loader_over_cache_matches_images_and_resumes(cache, folder):
    src = CachedSource(cache)
    loader = Loader(src, 2, seed=3, num_epochs=3)
    assert loader.buckets == BUCKETS and loader.bucket_counts == {(32, 32): 4, (48, 32): 4}
    images = Loader(ImageCaptionSource(folder, verify=True), 2, buckets=BUCKETS, seed=3, num_epochs=3)
    batches, image_batches = list(loader), list(images)
    assert len(batches) == len(image_batches) == 12
    assert [b["ids"].tolist() for b in batches] == [b["ids"].tolist() for b in image_batches]
    for b in batches:
        w, h = b["bucket"]
        assert set(b) == {"latents", "prompt_embeds", "prompt_mask", "captions", "bucket", "ids"}
        assert b["latents"].shape == (2, h // 4, w // 4, 4) and b["latents"].dtype == np.float32
        assert b["ids"].dtype == np.int64 and b["captions"] == [src.captions[i] for i in b["ids"]]
        lengths = [src.text_lengths[i] for i in b["ids"]]
        T = b["prompt_embeds"].shape[1]
        assert T % 64 == 0 and T - 64 < max(lengths) <= T and b["prompt_embeds"].dtype == np.float32
        assert b["prompt_mask"].dtype == np.int32 and b["prompt_mask"].sum(1).tolist() == lengths
        for row, i in enumerate(b["ids"]):
            latents, embeds = src.load(i)
            np.testing.assert_array_equal(b["latents"][row], latents)
            np.testing.assert_array_equal(b["prompt_embeds"][row, :len(embeds)], embeds)
            assert not b["prompt_embeds"][row, len(embeds):].any() and not b["prompt_mask"][row, len(embeds):].any()
    assert len({b["prompt_embeds"].shape[1] for b in batches}) > 1  # padded per batch, not globally

    it = iter(Loader(src, 2, seed=3, num_epochs=3))
    [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    resumed = Loader(CachedSource(cache), 2, seed=3, num_epochs=3).iterator(state)
    for a, b in zip(batches[5:], resumed):
        assert a["bucket"] == b["bucket"] and a["captions"] == b["captions"]
        for key in ("ids", "latents", "prompt_embeds", "prompt_mask"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(DataError, match=r"cached sizes \[\(48, 32\)\] are in none of the buckets"):
        Loader(src, 2, buckets=[(32, 32)])


def test_bad_caches_are_clear_errors(cache, tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file"):
        CachedSource(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: not a latent cache"):
        CachedSource(tmp_path / "plain")
    copy = shutil.copytree(cache, tmp_path / "copy")
    meta = json.loads((copy / "cache.json").read_text())
    (copy / "cache.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(DataError, match="version 99, this code reads version 1"):
        CachedSource(copy)
    (copy / "cache.json").write_text(json.dumps({**meta, "count": 0}))
    (copy / "index.jsonl").write_text("")
    with pytest.raises(DataError, match="copy: empty cache") as err:
        CachedSource(copy)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="exists and is not empty"):
        write_cache(copy, None, None, buckets=BUCKETS)


def test_cli_end_to_end_and_errors(tiny_pipeline_dir, folder, tmp_path, capsys):  # noqa: F811
    def run(*args):
        return cache_dataset.main(["--pipeline", str(tiny_pipeline_dir), "--buckets", "32x32,48x32",
                                   "--batch-size", "2", "--quiet", *map(str, args)])

    out = tmp_path / "cli"
    assert run("--images", folder, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "8 examples" in printed and "32x32: 4" in printed and "48x32: 4" in printed
    assert "skipped 1 unreadable" in printed and str(folder / "trunc.jpg") in printed
    src = CachedSource(out)
    assert len(src) == 8 and src.metadata["pipeline"] == str(Path(tiny_pipeline_dir).resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temporary folder left behind

    for args, message in [(("--images", tmp_path / "none", "--out", tmp_path / "o"), "none: no such file"),
                          (("--images", folder, "--out", out), "--out .*cli: exists and is not empty"),
                          (("--images", folder, "--out", tmp_path / "o", "--buckets", "30x30"), "--buckets: 30x30")]:
        assert run(*args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert re.search(message, err), err
    assert cache_dataset.main(["--pipeline", str(tmp_path / "nopipe"), "--images", str(folder),
                               "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert "--pipeline" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert run("--images", folder, "--out", out, "--overwrite", "--uncond-prompt", "") == 0
    assert CachedSource(out).metadata["uncond_prompt"] == ""
