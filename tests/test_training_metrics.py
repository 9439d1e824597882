"""MetricWriter: metrics.jsonl, TensorBoard event files and PNG samples, read back; resume; console."""

import json
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qwen_jax.training.metrics import MetricWriter, format_number, read_metrics, read_tensorboard


def test_scalars_images_text_round_trip(tmp_path):
    image = np.linspace(0, 1, 6 * 5 * 3, dtype=np.float32).reshape(6, 5, 3)
    with MetricWriter(tmp_path, total_steps=10, progress=False) as writer:
        writer.scalars(1, {"train/loss": np.float32(0.5), "lr": 1e-4})
        writer.scalars(2, {"train/loss": 0.25, "lr": 2e-4})
        writer.images(2, "samples/grid", image)
        writer.text(2, "prompt", "a cat")

    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 0.5, "lr": 1e-4},
                                      {"step": 2, "train/loss": 0.25, "lr": 2e-4}]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "train/loss": 0.5, "lr": 1e-4}

    tb = read_tensorboard(tmp_path / "tensorboard")
    assert tb["scalars"]["train/loss"] == [(1, 0.5), (2, 0.25)]
    # simple_value is a float32
    assert [s for s, _ in tb["scalars"]["lr"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in tb["scalars"]["lr"]], [1e-4, 2e-4], rtol=1e-6)
    assert tb["images"] == {"samples/grid": [(2, (6, 5, 3))]}
    assert tb["text"] == {"prompt": [(2, "a cat")]}

    png = tmp_path / "samples" / "samples_grid_0000002.png"
    pixels = np.asarray(Image.open(png))
    np.testing.assert_array_equal(pixels, np.round(image * 255).astype(np.uint8))
    assert not list((tmp_path / "samples").glob("*.tmp"))


def test_grayscale_and_uint8_images(tmp_path):
    with MetricWriter(tmp_path, total_steps=1, progress=False) as writer:
        writer.images(1, "gray", np.full((4, 7), 2.0))  # clipped to 1
        writer.images(1, "rgba", np.zeros((3, 2, 4), np.uint8))
    assert np.asarray(Image.open(tmp_path / "samples" / "gray_0000001.png")).tolist() == [[255] * 7] * 4
    tb = read_tensorboard(tmp_path / "tensorboard")
    assert tb["images"]["gray"] == [(1, (4, 7, 3))]  # tensorboardX stores grayscale as RGB
    assert tb["images"]["rgba"] == [(1, (3, 2, 4))]
    with pytest.raises(ValueError, match="image"):
        MetricWriter(tmp_path / "x", total_steps=1, progress=False).images(1, "bad", np.zeros((2, 2, 2)))


def test_resume_drops_later_steps(tmp_path):
    with MetricWriter(tmp_path, total_steps=10, progress=False) as writer:
        for step in range(1, 7):
            writer.scalars(step, {"loss": float(step)})
        writer.text(5, "note", "first run")
    before = (tmp_path / "metrics.jsonl").read_bytes().splitlines(keepends=True)

    with MetricWriter(tmp_path, total_steps=10, start_step=3, progress=False) as writer:
        for step in (4, 5):
            writer.scalars(step, {"loss": 10.0 * step})

    assert read_metrics(tmp_path) == [{"step": s, "loss": v} for s, v in
                                      [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]]
    after = (tmp_path / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert after[:3] == before[:3]  # kept lines are byte-identical
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # two files even within one second
    tb = read_tensorboard(tmp_path / "tensorboard")
    assert tb["scalars"]["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert "note" not in tb["text"]  # purged with every other entry at step >= 4


def test_resume_cuts_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    MetricWriter(tmp_path, total_steps=5, start_step=2, tensorboard=False, progress=False).close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_fresh_start_replaces_old_logs(tmp_path):
    with MetricWriter(tmp_path, total_steps=5, progress=False) as writer:
        writer.scalars(1, {"loss": 1.0})
        writer.scalars(2, {"loss": 2.0})
    with MetricWriter(tmp_path, total_steps=5, progress=False) as writer:  # start_step 0: new run
        writer.scalars(1, {"loss": 7.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 7.0}]
    # no purge_step, but the step going back drops the old run's entries, as TensorBoard does
    assert read_tensorboard(tmp_path / "tensorboard")["scalars"]["loss"] == [(1, 7.0)]


def test_lines_are_on_disk_before_close(tmp_path):
    writer = MetricWriter(tmp_path, total_steps=5, tensorboard=False, progress=False)
    writer.scalars(1, {"loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]  # read by another handle
    writer.close()


def test_sigkill_keeps_completed_lines(tmp_path):
    script = (
        "import os, signal, sys\n"
        "from qwen_jax.training.metrics import MetricWriter\n"
        "w = MetricWriter(sys.argv[1], total_steps=9, tensorboard=False, progress=False)\n"
        "for step in (1, 2, 3):\n"
        "    w.scalars(step, {'loss': step / 2})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=repo, timeout=60,
                          check=False)
    assert proc.returncode == -signal.SIGKILL
    assert read_metrics(tmp_path) == [{"step": s, "loss": s / 2} for s in (1, 2, 3)]


def test_disabled_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricWriter(workdir, total_steps=5) as writer:
        pass
    assert workdir.exists()
    workdir = tmp_path / "other_host"
    with MetricWriter(workdir, total_steps=5, enabled=False) as writer:
        writer.scalars(1, {"loss": 1.0})
        writer.images(1, "x", np.zeros((2, 2, 3)))
        writer.text(1, "t", "x")
        writer.progress(1, loss=1.0)
        writer.flush()
    assert not workdir.exists()
    assert read_metrics(workdir) == []


def test_console_line(tmp_path, caplog):
    with (caplog.at_level(logging.INFO, logger="absl"),
          MetricWriter(tmp_path, total_steps=1000, tensorboard=False, progress=False) as writer):
        writer.scalars(120, {"train/loss": 0.12341, "lr": 1e-4, "grad_norm": 12345.0})
    assert "step 120/1000 | train/loss 0.1234 | lr 1.0e-04 | grad_norm 1.234e+04" in caplog.messages


def test_progress_bar(tmp_path, capsys):
    with MetricWriter(tmp_path, total_steps=10, start_step=2, tensorboard=False) as writer:
        writer.progress(5, loss=np.float32(0.25), stage="warmup")
        assert writer._bar.n == 5
        writer.progress(7, loss=None)
        assert writer._bar.n == 7
    err = capsys.readouterr().err
    assert "7/10" in err and "loss=0.25, stage=warmup" in err and "None" not in err


@pytest.mark.parametrize("value, text", [(0.1234, "0.1234"), (1234.5, "1234"), (9999.9, "1.0e+04"),
                                         (2.5e-7, "2.5e-07"), (0.0, "0"), (float("nan"), "nan"),
                                         (-3, "-3")])
def test_format_number(value, text):
    assert format_number(value) == text
