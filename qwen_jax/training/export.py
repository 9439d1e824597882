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

from qwen_jax import checkpoints
from qwen_jax.conversion.lora import save_lora
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


def export_run(out: str | os.PathLike, graphdef, trainable: dict, frozen: dict, *, pipeline: str | os.PathLike,
               lora: bool, primary: bool = True, overwrite: bool = True) -> Path | None:
    """Writes `out` (see the module docstring) atomically; only the primary process writes."""
    from qwen_jax.pipeline import resolve_folder

    trainable, frozen = host_arrays(trainable), host_arrays(frozen)
    if not primary:
        return None
    model = merge_model(graphdef, trainable, frozen)
    base = resolve_folder(pipeline)
    with checkpoints.atomic_output_dir(out, overwrite=overwrite) as tmp:
        checkpoints.save_transformer(model, tmp / "transformer")
        for name in COPIED_COMPONENTS:
            shutil.copytree(base / name, tmp / name, copy_function=_link_or_copy)
        if lora:
            save_lora(model, tmp / "lora.safetensors")
    return Path(out)
