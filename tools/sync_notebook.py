#!/usr/bin/env python
"""Writes notebooks/<name>.ipynb from its jupytext percent script notebooks/<name>.py.

  python tools/sync_notebook.py notebooks/sample.py

(jupytext does the same with `jupytext --sync`; this keeps the repo free of that dependency.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def percent_cells(text: str) -> list[tuple[str, str]]:
    """(cell type, source) of a percent-format script, header excluded."""
    cells, kind, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line[2:] if kind == "markdown" and line.startswith("# ") else
                         ("" if kind == "markdown" and line == "#" else line))
    if kind is not None:
        cells.append((kind, "\n".join(lines).strip("\n")))
    return cells


def to_notebook(cells: list[tuple[str, str]]) -> dict:
    def cell(kind, source):
        out = {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True)}
        if kind == "code":
            out.update(execution_count=None, outputs=[])
        return out

    return {"cells": [cell(k, s) for k, s in cells], "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"jupytext": {"formats": "ipynb,py:percent"},
                         "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}}


def main(argv) -> int:
    for script in argv or ["notebooks/sample.py"]:
        script = Path(script)
        notebook = to_notebook(percent_cells(script.read_text()))
        script.with_suffix(".ipynb").write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {script.with_suffix('.ipynb')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
