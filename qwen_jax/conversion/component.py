"""Writing one converted component (config.json + orbax params/) from a checked plan, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from qwen_jax import checkpoints
from qwen_jax.conversion.plan import Plan, assemble_leaf
from qwen_jax.conversion.safetensors_io import read_tensor
from qwen_jax.conversion.sources import CheckpointSource


def write_component(
    folder: Path, config: dict, source: CheckpointSource, plan: Plan, dtype=None, progress: bool = True,
    desc: str = "convert",
) -> None:
    """Fills `folder` with `config` as config.json and the planned parameters, one leaf at a time.

    dtype: cast every parameter to it (default: keep each tensor's stored dtype).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / checkpoints.CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    out_dtype = np.dtype(dtype) if dtype else None
    writer = checkpoints.ParamWriter(folder)
    total = sum(source.tensors[m.torch_key].nbytes for leaf in plan.leaves for m in leaf.sources.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for leaf in plan.leaves:
            writer.add(leaf.path, assemble_leaf(leaf, lambda k: read_tensor(source.tensors[k]), out_dtype))
            bar.update(sum(source.tensors[m.torch_key].nbytes for m in leaf.sources.values()))
    writer.finalize()
