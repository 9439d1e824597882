"""Training logs: what a run writes where, and readers for tests and tools.

    workdir/
      metrics.jsonl                      one {"step": s, "<tag>": value, ...} per `scalars` call
      tensorboard/events.out.tfevents.*  scalars, images, text; one file per (re)start of a run
      samples/<name>_<step:07d>.png      every logged image ("/" in the name becomes "_")

plus one console line per `scalars` call (absl logging) and a tqdm progress bar on stderr.

Resuming from `start_step` drops the later lines of metrics.jsonl and makes TensorBoard purge
the later steps (`purge_step`), so a preempted-and-resumed run's logs read like an
uninterrupted run's. In multi-host training only process 0 passes `enabled=True`; the others
write nothing. tensorboardX is imported lazily: it drags in torch whenever torch is installed.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import numpy as np
from absl import logging
from PIL import Image
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"


def format_number(value) -> str:
    """4 significant digits; scientific outside [1e-3, 1e4): 0.1234, 1234, 1.0e-04, 2.5e+06."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    rounded = f"{value:.3e}"
    if 1e-3 <= abs(float(rounded)) < 1e4:  # judged after rounding: 9999.9 -> 1.0e+04
        return f"{value:.4g}"
    mantissa, exponent = rounded.split("e")
    mantissa = mantissa.rstrip("0")  # 1.000 -> 1.0, 2.500 -> 2.5
    return f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{exponent}"


def _format_any(value) -> str:
    try:
        return format_number(value)
    except (TypeError, ValueError):
        return str(value)


def _replace_atomically(path: Path, write) -> None:
    """Readers (and a crash) see the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _restart_metrics_file(path: Path, start_step: int) -> None:
    """Keep the lines of steps <= start_step byte for byte; drop later ones and torn lines."""
    kept = []
    if start_step > 0 and path.exists():
        with open(path, "rb") as f:
            for line in f:
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill mid-write
                if line.endswith(b"\n") and step <= start_step:
                    kept.append(line)
    _replace_atomically(path, lambda f: f.writelines(kept))


def _to_uint8_hwc(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1|3|4) image, got shape {image.shape}")
    if image.dtype != np.uint8:  # floats in [0, 1]; bfloat16 too
        image = np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return image


class MetricWriter:
    """Writes scalars to metrics.jsonl, TensorBoard and the console; images and text to TensorBoard
    (images also as PNG files); drives a progress bar. Every method is a no-op when not enabled."""

    def __init__(self, workdir, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True):
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        _restart_metrics_file(path, start_step)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held until close)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names event files by the second and opens them with "wb": a restart
            # within the same second would wipe the previous file. The nanosecond suffix keeps
            # names unique and in creation order, the order TensorBoard reads them in.
            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR),
                                     purge_step=start_step + 1 if start_step else None,
                                     filename_suffix=f".{time.time_ns()}")
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=not progress)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {tag: float(value) for tag, value in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()  # in the OS after every line: a SIGKILL loses no completed line
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
        line = " | ".join([f"step {step}/{self.total_steps}"]
                          + [f"{tag} {format_number(value)}" for tag, value in values.items()])
        if not self._bar.disable:
            self._bar.clear()  # keep the log line from landing in the middle of the bar
        logging.info(line)
        if not self._bar.disable:
            self._bar.refresh()

    def images(self, step: int, name: str, image: np.ndarray) -> None:
        """`image`: (H, W, C) or (H, W), float in [0, 1] (clipped) or uint8."""
        if not self.enabled:
            return
        image = _to_uint8_hwc(image)
        if self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")
        samples = self.workdir / SAMPLES_DIR
        samples.mkdir(exist_ok=True)
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        path = samples / f"{name.replace('/', '_')}_{step:07d}.png"
        _replace_atomically(path, lambda f: pil.save(f, format="PNG"))

    def text(self, step: int, name: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(name, text, step)

    def progress(self, step: int, **postfix) -> None:
        """Moves the bar to `step`; `postfix` (e.g. loss=...) is shown after it, None values left out."""
        if not self.enabled or self._bar.disable:
            return
        text = ", ".join(f"{k}={_format_any(v)}" for k, v in postfix.items() if v is not None)
        if text:  # otherwise the last postfix stays
            self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(step - self._bar.n)

    def flush(self) -> None:
        if not self.enabled:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._tb is not None:
            self._tb.close()
        self._bar.close()
        self._jsonl.close()
        self.enabled = False  # later calls (and a second close) do nothing

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir) -> list[dict]:
    """The objects of workdir/metrics.jsonl in file order ([] when there is none)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _records(path: Path):
    """The payloads of a TFRecord file: uint64 length, uint32 masked crc32c of the length, data,
    uint32 masked crc32c of the data. Stops at the first record with a bad length crc or cut
    short (a writer killed mid-record). Data crcs are not checked: without the optional `crc32c`
    package, tensorboardX computes them in pure Python, too slow for images."""
    from tensorboardX.record_writer import masked_crc32c

    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        (length,), (length_crc,) = struct.unpack_from("<Q", data, pos), struct.unpack_from("<I", data, pos + 8)
        if length_crc != masked_crc32c(data[pos:pos + 8]) or pos + 16 + length > len(data):
            return
        yield data[pos + 12:pos + 12 + length]
        pos += 16 + length


def _decode(value):
    """(kind, tag, item) for the values MetricWriter writes, or None for anything else."""
    field = value.WhichOneof("value")
    if field == "simple_value":  # how tensorboardX writes scalars (a float32)
        return "scalars", value.tag, float(value.simple_value)
    if field == "image":  # tensorboardX stores grayscale images as RGB: c == 3
        return "images", value.tag, (value.image.height, value.image.width, value.image.colorspace)
    if field == "tensor":
        tensor = value.tensor
        if value.metadata.plugin_data.plugin_name == "text":  # add_text appends "/text_summary"
            return "text", value.tag.removesuffix("/text_summary"), tensor.string_val[0].decode()
        numbers = list(tensor.float_val) or list(tensor.double_val)  # scalars as tensors (TF writers)
        if not numbers and tensor.dtype in (1, 2):  # DT_FLOAT, DT_DOUBLE packed as bytes
            numbers = np.frombuffer(tensor.tensor_content, np.float32 if tensor.dtype == 1 else np.float64)
        if len(numbers) == 1:
            return "scalars", value.tag, float(numbers[0])
    return None


def read_tensorboard(logdir) -> dict:
    """Scalars, image shapes and text of the event files in `logdir`, without TensorFlow:
    {"scalars": {tag: [(step, value)]}, "images": {tag: [(step, (h, w, c))]}, "text": {tag: [(step, str)]}}.

    Files are read in name order (creation order, as TensorBoard reads them). Purges follow
    TensorBoard: a session START event at step s (written for `purge_step`) drops every entry with
    step >= s read so far, and a step that does not increase for a tag (a restart without
    purge_step) drops that tag's entries with step >= it. So the result is what TensorBoard shows.
    """
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out = {"scalars": {}, "images": {}, "text": {}}
    for path in sorted(p for p in Path(logdir).iterdir() if ".tfevents." in p.name):
        for record in _records(path):
            event = Event.FromString(record)
            if event.WhichOneof("what") == "session_log" and event.session_log.status == SessionLog.START:
                for series_by_tag in out.values():
                    for series in series_by_tag.values():
                        series[:] = [entry for entry in series if entry[0] < event.step]
            for value in event.summary.value:
                decoded = _decode(value)
                if decoded is None:
                    continue
                kind, tag, item = decoded
                series = out[kind].setdefault(tag, [])
                if series and series[-1][0] >= event.step:
                    series[:] = [entry for entry in series if entry[0] < event.step]
                series.append((event.step, item))
    for series_by_tag in out.values():  # tags emptied by a purge
        for tag in [tag for tag, series in series_by_tag.items() if not series]:
            del series_by_tag[tag]
    return out
