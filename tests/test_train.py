"""The training system on a tiny pipeline: meshes, resume after SIGKILL, SIGTERM, LoRA, exports,
skipped images, logs. Losses are compared across runs, so every check can fail."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from qwen_jax import checkpoints, sharding as sharding_lib
from qwen_jax.models.lora import merged_kernel
from qwen_jax.pytree import flatten_params
from qwen_jax.train import train
from qwen_jax.training.metrics import read_metrics, read_tensorboard
from tiny_pipeline import tiny_pipeline_dir  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "flow_matching.py"
COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 250, 0)]


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8) + np.asarray(COLOURS[seed % 4], np.uint8)
    y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
    arr[y:y + 8, x:x + 8] = 255 - arr[y, x]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 square and 8 landscape captioned images, a truncated JPEG and a text file named .png."""
    root = tmp_path_factory.mktemp("train_images")
    sizes = [(32, 32)] * 16 + [(48, 32)] * 8
    for i, (w, h) in enumerate(sizes):
        _image(w, h, i).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {['red', 'green', 'blue', 'yellow'][i % 4]} picture")
    buf = io.BytesIO()
    _image(64, 32, 7).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.png").write_text("not an image")
    return root


def tiny_config(pipeline, images, **overrides):
    sys.path.insert(0, str(CONFIG.parent))
    try:
        import flow_matching as config_module
    finally:
        sys.path.pop(0)
    c = config_module.get_config("tiny")
    c.model.pretrained = str(pipeline)
    c.data.images = str(images)
    c.data.buckets = "32x32,48x32"
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c


def cli(pipeline, images, workdir, *overrides, **popen):
    args = [sys.executable, "-m", "qwen_jax.train", f"--config={CONFIG}:tiny", f"--workdir={workdir}",
            f"--config.model.pretrained={pipeline}", f"--config.data.images={images}",
            "--config.data.buckets=32x32,48x32", *overrides]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **popen)


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir)}


# -- one device and eight ---------------------------------------------------------------------------
def test_one_and_eight_devices_give_the_same_losses(tiny_pipeline_dir, images, tmp_path):  # noqa: F811
    common = {"total_steps": 5, "eval.every": 0, "export.at_end": False, "checkpoint.every": 100}
    one = train(tiny_config(tiny_pipeline_dir, images, **common, **{"mesh.fsdp": 1}), tmp_path / "one",
                devices=jax.devices()[:1])
    eight = train(tiny_config(tiny_pipeline_dir, images, **common, **{"mesh.data": 2, "mesh.fsdp": 4}),
                  tmp_path / "eight")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5, atol=1e-6)
    assert a[5] < a[1]  # it learns

    # shardings of parameters and optimizer moments, read back, are those the rules give
    state = eight["state"]
    mesh = jax.tree.leaves(state["params"])[0].sharding.mesh
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    flat = flatten_params(state["params"])
    want = sharding_lib.param_shardings({p: v.shape for p, v in flat.items()}, mesh)
    split = 0
    for path, value in flat.items():
        assert value.sharding.spec == want[path].spec, path
        split += "fsdp" in value.sharding.spec
    assert split >= 10  # the rules really shard most kernels on this mesh
    adam = state["opt_state"][1][0]  # chain(clip, adamw) -> adamw = (ScaleByAdamState, ...)
    for moments in (adam.mu, adam.nu):
        for path, value in flatten_params(moments).items():
            assert value.sharding.spec == want[path].spec, path
    assert state["step"].sharding.is_fully_replicated and int(state["step"]) == 5
