"""Training data sources: prompts, and image + caption pairs, read and checked at construction.

Both are grain random-access sources (`len(src)`, `src[i]`), so `grain.MapDataset.source(src)`
takes them as they are. Every problem that would stop a run (a missing path, an unsupported
file, a malformed jsonl line, nothing to train on) raises `DataError` here, before training
starts. A corrupt image does not: it is skipped, logged on the "qwen_jax.data" logger and
recorded in `src.skipped`, here when its header cannot be read and in the loader when its pixels
cannot be decoded.

Accepted layouts:
  prompts  `.txt`: one prompt per line, blank lines skipped;
           `.jsonl`: one object per line with a "prompt" or "caption" string.
  images   a folder (searched recursively) of *.png/*.jpg/*.jpeg/*.webp, each with an optional
           same-name `.txt` caption (a missing one gives "" and is counted);
           a `.jsonl` manifest of {"image": path, "caption": text}, paths relative to the
           manifest ("file" and "prompt" are accepted too, so the sampler's `manifest.jsonl`
           is a training manifest as it is).
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path

from qwen_jax.data import images

logger = logging.getLogger("qwen_jax.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class DataError(ValueError):
    """A dataset that cannot be trained on; `str(err)` is a one-line diagnosis naming the path."""


def _existing(path: str | PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    return path


def _jsonl_objects(path: Path):
    """(line number, object) for every non-blank line; a line that is not an object is an error."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def _text_field(obj: dict, keys: tuple[str, ...], where: str) -> str | None:
    for key in keys:
        if key in obj:
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
            return obj[key]
    return None


class PromptSource:
    """Prompts from a `.txt` or `.jsonl` file. `src[i]` -> {"caption": str}."""

    def __init__(self, path: str | PathLike):
        self.path = _existing(path)
        if self.path.is_dir() or self.path.suffix.lower() not in (".txt", ".jsonl"):
            raise DataError(f"{self.path}: prompts must be a .txt or .jsonl file")
        if self.path.suffix.lower() == ".txt":
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self.prompts = [line.strip() for line in lines if line.strip()]
        else:
            self.prompts = []
            for number, obj in _jsonl_objects(self.path):
                text = _text_field(obj, ("prompt", "caption"), f"{self.path}:{number}")
                if text is None:
                    raise DataError(f"{self.path}:{number}: object has neither 'prompt' nor 'caption'")
                self.prompts.append(text)
        if not self.prompts:
            raise DataError(f"{self.path}: no prompts (empty dataset)")
        logger.info("%d prompts from %s", len(self.prompts), self.path)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.prompts[index]}

    def __repr__(self) -> str:
        return f"PromptSource({str(self.path)!r}, {len(self)} prompts)"


class ImageCaptionSource:
    """Image + caption pairs from a folder or a `.jsonl` manifest.

    Construction lists the pairs and reads every image's header (in `num_threads` threads) for
    its size, which decides its bucket; `verify=True` decodes every pixel instead, so that
    truncated files are found now rather than when the loader first meets them.

    Attributes (index i runs over the readable images, in a fixed order: sorted relative
    paths for a folder, file order for a manifest):
      paths[i], captions[i], sizes[i] = (width, height) as displayed;
      missing_captions: how many images had no caption ("" used);
      skipped: [(path, reason)] of unreadable images, growing as the loader finds more;
      num_skipped: len(skipped).
    `src[i]` -> {"path": str, "caption": str}.
    """

    def __init__(self, path: str | PathLike, *, verify: bool = False, num_threads: int = 16):
        self.path = _existing(path)
        if self.path.is_dir():
            candidates = self._scan_folder(self.path)
        elif self.path.suffix.lower() == ".jsonl":
            candidates = self._read_manifest(self.path)
        else:
            raise DataError(f"{self.path}: images must be a folder or a .jsonl manifest")
        if not candidates:
            raise DataError(f"{self.path}: no images ({', '.join(IMAGE_SUFFIXES)}) found (empty dataset)")

        self._lock = threading.Lock()
        self._skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            sizes = list(pool.map(lambda pc: _try(images.image_size, pc[0], decode=verify), candidates))
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.sizes: list[images.Bucket] = []
        self.missing_captions = 0  # counted over readable images only
        for (image_path, caption), (size, error) in zip(candidates, sizes):
            if error is not None:
                self._record_skip(image_path, error)
                continue
            self.paths.append(image_path)
            self.captions.append("" if caption is None else caption)
            self.missing_captions += caption is None
            self.sizes.append(size)
        if not self.paths:
            raise DataError(f"{self.path}: none of the {len(candidates)} images could be read")
        logger.info("%d images from %s (%d skipped, %d without caption)", len(self.paths), self.path,
                    self.num_skipped, self.missing_captions)

    @staticmethod
    def _scan_folder(folder: Path) -> list[tuple[Path, str | None]]:
        """(image, caption or None) pairs, sorted by relative path."""
        files = (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        pairs = []
        for image_path in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
            caption_path = image_path.with_suffix(".txt")
            caption = None
            if caption_path.is_file():
                caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
            pairs.append((image_path, caption))
        return pairs

    @staticmethod
    def _read_manifest(manifest: Path) -> list[tuple[Path, str | None]]:
        """(image, caption or None) pairs, in file order."""
        pairs = []
        for number, obj in _jsonl_objects(manifest):
            where = f"{manifest}:{number}"
            image = _text_field(obj, ("image", "file"), where)
            if not image:
                raise DataError(f"{where}: object has no 'image' path")
            caption = _text_field(obj, ("caption", "prompt"), where)
            pairs.append((manifest.parent / image, caption))  # an absolute `image` stays absolute
        return pairs

    def _record_skip(self, path, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self._skipped.append((str(path), reason))
        logger.warning("skipping unreadable image %s (%s)", path, reason)

    def mark_unreadable(self, index: int, error: BaseException | str) -> None:
        """Records that image `index` failed to decode (thread-safe; each image counted once)."""
        with self._lock:
            if index not in self._bad:
                self._bad.add(index)
                self._record_skip(self.paths[index], error)

    def is_unreadable(self, index: int) -> bool:
        return index in self._bad

    @property
    def skipped(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._skipped)

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"path": str(self.paths[index]), "caption": self.captions[index]}

    def __repr__(self) -> str:
        return f"ImageCaptionSource({str(self.path)!r}, {len(self)} images, {self.num_skipped} skipped)"


def _try(fn, *args, **kwargs):
    """(fn(...), None), or (None, the exception): any exception, since PIL signals a corrupt
    file with many types (OSError, SyntaxError, ValueError, struct.error, ...)."""
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - a bad file must never stop training
        return None, err
