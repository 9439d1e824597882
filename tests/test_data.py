"""Data layer: sources, buckets, decoding, and the grain loader (order, resume, sharding, skips)."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from qwen_jax.data import (DataError, ImageCaptionSource, Loader, PromptSource, area_buckets, load_image,
                           nearest_bucket, official_buckets)

TINY = official_buckets(64)  # (64, 64), (80, 48), (48, 80), (64, 48), (48, 64)


def _noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    """8 good images in 3 buckets (5 captioned + 1 uncaptioned square, 2+1 landscape, 2 portrait),
    a truncated JPEG (readable header, landscape) and a text file named .png."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    good = {"sq1.png": (64, 64), "sq2.jpg": (100, 100), "sub/sq3.webp": (90, 90), "sq4.png": (70, 70),
            "nocap.png": (66, 66), "land1.jpg": (128, 72), "land2.png": (160, 96), "port1.jpeg": (72, 128),
            "port2.png": (48, 80)}
    for i, (name, (w, h)) in enumerate(good.items()):
        _noise(w, h, i).save(root / name)
        if name != "nocap.png":
            (root / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    buf = io.BytesIO()
    _noise(192, 108, 99).save(buf, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "truncated.txt").write_text("never seen")
    (root / "fake.png").write_text("this is not an image")
    return root


def _ids(batches):
    return [b["ids"].tolist() for b in batches]


def _take(it, n):
    return [next(it) for _ in range(n)]


# -- buckets ------------------------------------------------------------------------------------------

def test_official_buckets_match_the_pipeline_table():
    from qwen_jax.pipeline import ASPECT_RATIOS, ASPECT_RATIOS_2K
    assert official_buckets(1328) == tuple(ASPECT_RATIOS.values())
    assert official_buckets(2048) == tuple(ASPECT_RATIOS_2K.values())


@pytest.mark.parametrize("resolution", [512, 1024, 1328])
def test_bucket_construction(resolution):
    targets = [1, 16 / 9, 9 / 16, 4 / 3, 3 / 4, 3 / 2, 2 / 3]
    for buckets, area_tol in [(official_buckets(resolution), 0.15), (area_buckets(resolution**2), 0.03)]:
        assert len(buckets) == 7
        for (w, h), r in zip(buckets, targets):
            assert w % 16 == 0 and h % 16 == 0
            assert abs(w / h - r) / r < 0.04, (w, h, r)
            assert abs(w * h / resolution**2 - 1) < area_tol, (w, h)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in TINY) and len(set(TINY)) == len(TINY)


def test_nearest_bucket():
    b = official_buckets()
    assert b[nearest_bucket(1920, 1080, b)] == (1664, 928)
    assert b[nearest_bucket(1080, 1920, b)] == (928, 1664)
    assert b[nearest_bucket(500, 510, b)] == (1328, 1328)
    assert b[nearest_bucket(3000, 2000, b)] == (1584, 1056)


def test_load_image_centre_crops_to_the_bucket(tmp_path):
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, :32, 0] = 255   # red left quarter
    img[:, 32:96, 1] = 255  # green middle half
    img[:, 96:, 2] = 255   # blue right quarter
    Image.fromarray(img).save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png", (64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to([-1.0, 1.0, -1.0], out.shape), atol=1e-6)
    rgba = Image.new("RGBA", (20, 40), (0, 0, 0, 0))  # fully transparent: white after flattening
    rgba.save(tmp_path / "t.png")
    np.testing.assert_allclose(load_image(tmp_path / "t.png", (16, 32)), 1.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees: a portrait
    _noise(64, 32, 0).save(tmp_path / "r.jpg", exif=exif)
    src = ImageCaptionSource(tmp_path)
    assert src.sizes[src.paths.index(tmp_path / "r.jpg")] == (32, 64)
    assert load_image(tmp_path / "r.jpg", (32, 64)).shape == (64, 32, 3)


# -- sources ------------------------------------------------------------------------------------------

def test_folder_source_counts_captions_and_header_skips(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="qwen_jax.data"):
        src = ImageCaptionSource(folder)
    assert len(src) == 10 and src.missing_captions == 1  # the truncated JPEG passes a header read
    assert [p for p, _ in src.skipped] == [str(folder / "fake.png")]
    assert "fake.png" in caplog.text
    i = [p.name for p in src.paths].index("sq3.webp")
    assert src[i] == {"path": str(folder / "sub" / "sq3.webp"), "caption": "caption of sub/sq3.webp"}
    assert src.captions[[p.name for p in src.paths].index("nocap.png")] == ""


def test_verify_finds_truncated_images_at_construction(folder):
    src = ImageCaptionSource(folder, verify=True)
    assert len(src) == 9 and src.num_skipped == 2
    assert {p for p, _ in src.skipped} == {str(folder / "truncated.jpg"), str(folder / "fake.png")}


def test_jsonl_manifest(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        _noise(64, 64, i).save(tmp_path / "imgs" / f"{i}.png")
    rows = [{"image": "../imgs/0.png", "caption": "zero"}, {"file": "../imgs/1.png", "prompt": "one"},
            {"image": "../imgs/2.png"}, {"image": "../imgs/missing.png", "caption": "gone"}]
    manifest = tmp_path / "data" / "m.jsonl"  # image paths are relative to the manifest's folder
    manifest.parent.mkdir()
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = ImageCaptionSource(manifest)
    assert src.captions == ["zero", "one", ""] and src.missing_captions == 1
    assert src.num_skipped == 1 and src.skipped[0][0].endswith("missing.png")
    batch = next(iter(Loader(src, 3, buckets=TINY, seed=0)))
    assert batch["images"].shape == (3, 64, 64, 3) and sorted(batch["captions"]) == ["", "one", "zero"]


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a fox\n\n  \nan owl  \n")
    assert PromptSource(tmp_path / "p.txt").prompts == ["a fox", "an owl"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"caption": "b", "seed": 1}\n')
    assert PromptSource(tmp_path / "p.jsonl").prompts == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*neither"):
        PromptSource(tmp_path / "bad.jsonl")


def test_missing_and_empty_datasets_are_clear_errors(tmp_path, folder):
    for make in (PromptSource, ImageCaptionSource):
        with pytest.raises(DataError, match="nowhere.*no such file") as err:
            make(tmp_path / "nowhere")
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty.txt: no prompts"):
        PromptSource(tmp_path / "empty.txt")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="nothing: no images"):
        ImageCaptionSource(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1 images"):
        ImageCaptionSource(tmp_path / "bad")
    with pytest.raises(DataError, match="no bucket holds a full global batch of 8"):
        Loader(ImageCaptionSource(folder), 8, buckets=TINY)


# -- loader -------------------------------------------------------------------------------------------

def test_training_batches_and_skip_count(folder, caplog):
    src = ImageCaptionSource(folder)
    loader = Loader(src, 2, buckets=TINY, seed=0, num_epochs=2, drop_remainder=False)
    assert loader.bucket_counts == {(64, 64): 5, (80, 48): 3, (48, 80): 2, (64, 48): 0, (48, 64): 0}
    assert loader.steps_per_epoch == 3 + 2 + 1
    with caplog.at_level(logging.WARNING, logger="qwen_jax.data"):
        batches = list(loader)
    assert len(batches) == 12
    for b in batches:
        w, h = b["bucket"]
        assert b["images"].shape == (2, h, w, 3) and b["images"].dtype == np.float32
        assert -1.0 <= b["images"].min() < -0.5 and 0.5 < b["images"].max() <= 1.0
        assert b["captions"] == [src.captions[i] for i in b["ids"]]
        assert all(TINY[nearest_bucket(*src.sizes[i], TINY)] == (w, h) for i in b["ids"])
    # every readable image appears each epoch; the truncated one was met and replaced
    names = {src.paths[i].name for b in batches[:6] for i in b["ids"]}
    assert names == {"sq1.png", "sq2.jpg", "sq3.webp", "sq4.png", "nocap.png", "land1.jpg", "land2.png",
                     "port1.jpeg", "port2.png"}
    assert loader.num_skipped == 2
    assert {p for p, _ in loader.skipped} == {str(folder / "truncated.jpg"), str(folder / "fake.png")}
    assert "truncated.jpg" in caplog.text and "fake.png" in caplog.text


def test_shuffle_is_deterministic_and_reshuffles_each_epoch(folder):
    src = ImageCaptionSource(folder, verify=True)
    first = _ids(Loader(src, 2, buckets=TINY, seed=3, num_epochs=3))
    assert first == _ids(Loader(src, 2, buckets=TINY, seed=3, num_epochs=3))
    assert first != _ids(Loader(src, 2, buckets=TINY, seed=4, num_epochs=3))
    per_epoch = len(first) // 3
    assert len({str(first[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)}) > 1


@pytest.mark.parametrize("num_threads", [0, 2])
def test_resume_from_saved_state_gives_the_same_batches(folder, num_threads):
    def make():  # a restarted process: new source (nothing known about bad files), new loader
        return Loader(ImageCaptionSource(folder), 2, buckets=TINY, seed=5, drop_remainder=False,
                      num_threads=num_threads)

    it = iter(make())
    _take(it, 3)                                    # mid-epoch: 3 of the 6 batches of epoch 0
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 6)                         # into epoch 1, the truncated JPEG met on the way
    resumed_loader = make()
    resumed = _take(resumed_loader.iterator(state), 6)
    assert resumed_loader.position(state) == (0, 3)
    assert resumed_loader.num_skipped == 2  # with this seed the resumed window substitutes too
    for a, b in zip(expected, resumed):
        assert a["bucket"] == b["bucket"] and a["captions"] == b["captions"]
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_array_equal(a["images"], b["images"])
    it.set_state(state)                           # rewinding the same iterator works too
    assert _ids(_take(it, 6)) == _ids(expected)


def test_shards_split_each_global_batch(folder):
    src = ImageCaptionSource(folder, verify=True)
    whole = list(Loader(src, 4, buckets=TINY, seed=1, num_epochs=2, drop_remainder=False))
    parts = [list(Loader(src, 2, buckets=TINY, seed=1, num_epochs=2, drop_remainder=False,
                         shard_index=k, shard_count=2)) for k in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1])
    for w, a, b in zip(whole, *parts):
        assert w["bucket"] == a["bucket"] == b["bucket"]
        assert w["ids"].tolist() == a["ids"].tolist() + b["ids"].tolist()


def test_prompt_batches(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(10)))
    src = PromptSource(tmp_path / "p.txt")
    loader = Loader(src, 4, seed=0, num_epochs=2)
    batches = list(loader)
    assert loader.steps_per_epoch == 2 and len(batches) == 4
    assert set(batches[0]) == {"captions", "ids"}
    for b in batches:
        assert b["captions"] == [src.prompts[i] for i in b["ids"]] and len(set(b["ids"].tolist())) == 4
    assert len({i for b in batches[:2] for i in b["ids"]}) == 8  # no prompt twice in an epoch
