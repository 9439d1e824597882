"""Exporting a trained transformer: a pipeline folder the sampler loads, and LoRA adapters alone.

    <out>/transformer/        the trained transformer (LoRA merged: kernel + scale * A @ B)
    <out>/vae, text_encoder, tokenizer, scheduler/   the base pipeline's, hard-linked (copied
                              across file systems)
    <out>/lora.safetensors    under LoRA: the adapters alone, diffusers/PEFT keys

`python -m qwen_jax.sample --model <out>` samples from it; `tools/convert_weights.py --to
diffusers <out>/transformer DIR` turns the transformer into a diffusers folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from qwen_jax import checkpoints
from qwen_jax.conversion.lora import save_lora
from qwen_jax.models.transformer import merge_lora
from qwen_jax.training.state import merge_model

COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def host_arrays(tree):
    """Every array of a (possibly multi-host sharded) tree as a full numpy array on this host."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def export_run(out: str | os.PathLike, graphdef, trainable: dict, frozen: dict, *, pipeline: str | os.PathLike,
               lora: bool) -> Path:
    """Writes `out` (see the module docstring), replacing it atomically when complete.

    Every process calls this (orbax writes collectively in a multi-host job); the first process
    writes the files that are not arrays and renames the folder into place.
    """
    from qwen_jax.pipeline import resolve_folder

    out = Path(out).absolute()  # orbax writes absolute paths only
    model = merge_model(graphdef, host_arrays(trainable), host_arrays(frozen))
    merged = merge_lora(model)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
    primary = jax.process_index() == 0
    tmp = out.parent / f".{out.name}.export-tmp"
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "transformer").mkdir(parents=True)
    _sync("export:start")
    try:
        ocp.save(tmp / "transformer" / checkpoints.PARAMS_DIR, params)
        if primary:
            checkpoints.write_config(tmp / "transformer", merged.config.to_diffusers_config())
            base = resolve_folder(pipeline)
            for name in COPIED_COMPONENTS:
                shutil.copytree(base / name, tmp / name, copy_function=_link_or_copy)
            if lora:
                save_lora(model, tmp / "lora.safetensors")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    _sync("export:done")
    return out
