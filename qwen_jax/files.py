"""Writing folders so that nothing half-written is ever seen: fill a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(dst: str | os.PathLike, overwrite: bool, error: type[Exception] = FileExistsError) -> None:
    """Raises `error` if `dst` is a file or a non-empty folder and `overwrite` is off."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise error(f"{dst}: destination exists and is not empty (choose a new path or overwrite)")


@contextmanager
def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False,
                      error: type[Exception] = FileExistsError) -> Iterator[Path]:
    """Yields a temporary sibling of `dst` to fill; renames it to `dst` only on success.

    A non-empty `dst` raises `error` unless `overwrite`; on any failure nothing is left behind.
    """
    dst = Path(dst).absolute()  # orbax writes absolute paths only
    check_output_dir(dst, overwrite, error)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Renames a finished `tmp` to `dst` where every writer builds the same content (a cache): if
    another process published `dst` first, its copy wins and `tmp` is removed."""
    tmp, dst = Path(tmp), Path(dst)
    try:
        tmp.rename(dst)
    except OSError:
        if not dst.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
