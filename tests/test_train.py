"""The training system on a tiny pipeline: meshes, resume after SIGKILL, SIGTERM, LoRA, exports,
skipped images, logs. Losses are compared across runs, so every check can fail."""

from __future__ import annotations

import io
import json
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
from launch import subprocess_env
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
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            **{"env": subprocess_env(), **popen})


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
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one["state"]))
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


# -- resume -----------------------------------------------------------------------------------------
def _wait_for_step(proc, workdir, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["step"] >= step for m in read_metrics(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline_dir, images, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("runs") / "straight"
    out, err = _finish(cli(tiny_pipeline_dir, images, workdir, "--config.total_steps=10",
                           "--config.checkpoint.every=3", "--config.eval.every=5"))
    return workdir, out, err


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_pipeline_dir, images, uninterrupted,  # noqa: F811
                                                         tmp_path):
    reference = losses(uninterrupted[0])
    assert sorted(reference) == list(range(1, 11))
    workdir = tmp_path / "killed"
    # no sampling here (the straight run has it): evaluation must not change the losses either
    args = ("--config.total_steps=10", "--config.checkpoint.every=3", "--config.eval.every=0")
    proc = cli(tiny_pipeline_dir, images, workdir, *args)
    _wait_for_step(proc, workdir, 7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(workdir)) < 10  # really killed before the end
    saved = checkpoints_steps(workdir)
    assert saved and max(saved) < 10
    out, err = _finish(cli(tiny_pipeline_dir, images, workdir, *args))
    assert f"resuming from step {max(saved)}" in err
    resumed = losses(workdir)
    assert sorted(resumed) == list(range(1, 11))
    assert resumed == reference  # bit for bit: floats written by repr
    assert json.loads(out.strip().splitlines()[-1])["step"] == 10


def checkpoints_steps(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_sigterm_saves_the_current_step_and_exits_zero(tiny_pipeline_dir, images, uninterrupted,  # noqa: F811
                                                       tmp_path):
    workdir = tmp_path / "terminated"
    # logs every 2 steps: the stop may fall between two logs (its summary must still be plain JSON)
    args = ("--config.total_steps=10", "--config.checkpoint.every=100", "--config.eval.every=0",
            "--config.log.every=2")
    proc = cli(tiny_pipeline_dir, images, workdir, *args)
    _wait_for_step(proc, workdir, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = _finish(proc, timeout=120)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by_signal"] and summary["step"] < 10 and isinstance(summary["loss"], float)
    assert checkpoints_steps(workdir) == [summary["step"]]  # every=100: only the SIGTERM save
    assert summary["step"] - 1 <= max(losses(workdir)) <= summary["step"]
    assert not (workdir / "export").exists()  # not finished: nothing exported
    # and it resumes from there to the same losses as the straight run
    _finish(cli(tiny_pipeline_dir, images, workdir, *args))
    reference = losses(uninterrupted[0])
    assert sorted(losses(workdir)) == [2, 4, 6, 8, 10]
    assert all(loss == reference[s] for s, loss in losses(workdir).items())


# -- logs, data skips, exports ----------------------------------------------------------------------
def test_logs_skips_and_export_of_a_full_run(tiny_pipeline_dir, uninterrupted):  # noqa: F811
    workdir, out, err = uninterrupted
    assert "2 unreadable images were skipped" in err
    assert "truncated.jpg" in err and "notes.png" in err
    assert all(m["data/skipped"] == 2 for m in read_metrics(workdir))
    tb = read_tensorboard(workdir / "tensorboard")
    for tag in ("train/loss", "train/grad_norm", "train/param_norm", "train/lr", "perf/step_time_s",
                "perf/images_per_s"):
        assert [s for s, _ in tb["scalars"][tag]] == list(range(1, 11)), tag
    np.testing.assert_allclose([v for _, v in tb["scalars"]["train/loss"]],
                               [losses(workdir)[s] for s in range(1, 11)], rtol=1e-6)
    assert [s for s, _ in tb["images"]["samples/grid"]] == [5, 10]
    assert len(list((workdir / "samples").glob("*.png"))) == 2
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 10

    # the exported pipeline samples, and its transformer equals the trained parameters
    from qwen_jax.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(workdir / "export")
    img = pipe(["a red picture"], height=32, width=32, num_steps=2, guidance=1.0).array
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert not (workdir / "export" / "lora.safetensors").exists()  # full training: no adapters

    # the exported transformer holds exactly the final trained parameters (checkpoint of step 10)
    import orbax.checkpoint as ocp

    final = flatten_params(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "10" / "state")["params"])
    exported = checkpoints.load_params(workdir / "export" / "transformer",
                                       {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in final.items()})
    assert final.keys() == exported.keys()
    for path, value in final.items():
        np.testing.assert_array_equal(np.asarray(exported[path]), value, err_msg=str(path))


def test_lora_trains_adapters_only_and_exports_merged_and_peft(tiny_pipeline_dir, images, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file

    sys.path.insert(0, str(REPO / "tools"))
    import convert_weights

    config = tiny_config(tiny_pipeline_dir, images, **{"total_steps": 3, "eval.every": 0, "model.lora_rank": 4,
                                                      "model.lora_alpha": 8.0, "ema.decay": 0.5})
    result = train(config, tmp_path / "lora")
    trained, frozen = flatten_params(result["state"]["params"]), flatten_params(result["frozen"])
    assert trained and all(p[-1] in ("lora_a", "lora_b") for p in trained)
    assert all(np.abs(np.asarray(v)).max() > 0 for p, v in trained.items() if p[-1] == "lora_b")  # B moved off 0
    base_folder = tiny_pipeline_dir / "transformer"
    base = checkpoints.load_params(base_folder, {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in frozen.items()})
    assert base.keys() == frozen.keys()
    for path, value in frozen.items():  # the base is bit-identical after training
        np.testing.assert_array_equal(np.asarray(value), np.asarray(base[path]), err_msg=str(path))

    # export: merged kernels = base + (alpha / rank) * A @ B of the EMA weights (export.use_ema)
    ema = {p: np.asarray(v) for p, v in flatten_params(result["state"]["ema"]).items()}
    export = tmp_path / "lora" / "export"
    merged = checkpoints.load_params(export / "transformer",
                                     {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in frozen.items()})
    n_merged = 0
    for path, a in ema.items():
        if path[-1] != "lora_a":
            continue
        kernel = path[:-1] + ("kernel",)
        want = merged_kernel(np.asarray(base[kernel]), a, ema[path[:-1] + ("lora_b",)], 8.0 / 4)
        np.testing.assert_allclose(np.asarray(merged[kernel]), np.asarray(want), rtol=1e-6, atol=1e-7)
        assert np.abs(np.asarray(merged[kernel]) - np.asarray(base[kernel])).max() > 0
        n_merged += 1
    assert n_merged >= 10
    peft = load_file(export / "lora.safetensors")
    assert peft and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in peft)
    assert "transformer.transformer_blocks.1.attn.to_q.lora_A.weight" in peft

    # and the converter turns the export into a diffusers transformer folder
    assert convert_weights.main([str(export / "transformer"), str(tmp_path / "diffusers"), "--to", "diffusers",
                                 "--quiet"]) == 0
    assert list((tmp_path / "diffusers").glob("*.safetensors"))


def test_config_and_data_errors_are_one_line_and_nonzero(tiny_pipeline_dir, images, tmp_path):  # noqa: F811
    proc = cli(tiny_pipeline_dir, images, tmp_path / "w", "--config.optim.lrr=1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "lrr" in err
    proc = cli(tiny_pipeline_dir, tmp_path / "missing", tmp_path / "w2")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("error:") and "missing" in err.strip().splitlines()[-1]


def test_training_from_a_cache_equals_training_from_images(tiny_pipeline_dir, images, tmp_path):  # noqa: F811
    import shutil

    from qwen_jax.data import ImageCaptionSource, write_cache
    from qwen_jax.training.conditioning import Conditioner

    clean = tmp_path / "clean"  # the cache holds readable images only; compare on a clean folder
    clean.mkdir()
    for f in images.glob("img*"):
        shutil.copy(f, clean / f.name)
    buckets = [(32, 32), (48, 32)]
    write_cache(tmp_path / "cache", ImageCaptionSource(clean), Conditioner.from_pretrained(tiny_pipeline_dir),
                buckets=buckets, progress=False)
    common = {"total_steps": 3, "eval.every": 0, "export.at_end": False, "mesh.fsdp": 1}
    one = jax.devices()[:1]  # the data path is under test here; meshes are in the test above
    train(tiny_config(tiny_pipeline_dir, clean, **common), tmp_path / "from_images", devices=one)
    cached = tiny_config(tiny_pipeline_dir, "", **common, **{"data.cache": str(tmp_path / "cache"), "data.buckets": ""})
    train(cached, tmp_path / "from_cache", devices=one)
    a, b = losses(tmp_path / "from_images"), losses(tmp_path / "from_cache")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


def test_export_cli_writes_any_saved_step(tiny_pipeline_dir, uninterrupted, tmp_path):  # noqa: F811
    import orbax.checkpoint as ocp

    from qwen_jax import export

    workdir = uninterrupted[0]
    assert export.main(["--workdir", str(workdir), "--step", "9", "--out", str(tmp_path / "e9")]) == 0
    saved = flatten_params(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "9" / "state")["params"])
    got = checkpoints.load_params(tmp_path / "e9" / "transformer",
                                  {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in saved.items()})
    for path, value in saved.items():
        np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=str(path))
    assert (tmp_path / "e9" / "tokenizer").is_dir()
    assert export.main(["--workdir", str(workdir), "--step", "4", "--out", str(tmp_path / "e4")]) == 1  # not kept
    assert not (tmp_path / "e4").exists()


def test_activation_constraints_follow_the_rules():
    import jax.numpy as jnp

    from qwen_jax.sharding import TOKENS, constrain, make_mesh

    f = jax.jit(lambda x: constrain(x * 2, TOKENS))
    with jax.set_mesh(make_mesh(2, 4, 1)):
        y = f(jnp.ones((8, 6, 4)))
        assert y.sharding.spec[0] == ("data", "fsdp") and all(a is None for a in y.sharding.spec[1:])
        assert f(jnp.ones((3, 6, 4))).sharding.is_fully_replicated  # 3 rows do not split 8 ways
    x = jnp.ones((8, 6, 4))
    assert constrain(x, TOKENS) is x  # no mesh: untouched
