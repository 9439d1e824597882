"""Two processes on localhost (2 fake CPU devices each, gloo collectives) train as one job: the
same losses as one process driving 4 devices, and a shared checkpoint both can resume from."""

from __future__ import annotations

import socket
import subprocess
import sys

import jax
import numpy as np

from launch import subprocess_env, xla_flags
from qwen_jax.train import train
from test_train import CONFIG, REPO, images, losses, tiny_config  # noqa: F401  (fixture)
from tiny_pipeline import tiny_pipeline_dir  # noqa: F401  (session fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(pipeline, images, workdir, steps: int, eval_every: int = 2):  # noqa: F811
    port = _free_port()
    env = subprocess_env(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    procs = []
    for pid in range(2):
        args = [sys.executable, "-m", "qwen_jax.train", f"--config={CONFIG}:tiny", f"--workdir={workdir}",
                f"--config.model.pretrained={pipeline}", f"--config.data.images={images}",
                "--config.data.buckets=32x32,48x32", f"--config.total_steps={steps}", "--config.checkpoint.every=2",
                f"--config.eval.every={eval_every}", "--config.log.every=1",
                f"--config.distributed.coordinator=localhost:{port}", "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={pid}"]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env=env))
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return results


def test_two_processes_train_like_one(tiny_pipeline_dir, images, tmp_path):  # noqa: F811
    _launch(tiny_pipeline_dir, images, tmp_path / "two", steps=4)
    two = losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()) == [2, 4]
    assert (tmp_path / "two" / "export" / "transformer").is_dir()

    config = tiny_config(tiny_pipeline_dir, images, **{"total_steps": 4, "eval.every": 0, "export.at_end": False})
    train(config, tmp_path / "one", devices=jax.devices()[:4])
    one = losses(tmp_path / "one")
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5, atol=1e-6)

    # both processes resume from the shared checkpoint and continue the same run (no sampling:
    # the first launch covered it). One step: process 1 compiles every program it runs at each
    # launch (only process 0 writes the compilation cache; jax_share_binary_between_hosts, process
    # 0 handing its executables over, hung here), and a second step would be the other bucket's
    _launch(tiny_pipeline_dir, images, tmp_path / "two", steps=5, eval_every=0)
    assert sorted(losses(tmp_path / "two")) == [1, 2, 3, 4, 5]
