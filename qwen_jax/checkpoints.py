"""The Flax transformer folder: what `convert_weights.py` writes and `load_transformer` reads.

  <folder>/config.json   the diffusers transformer config (architecture only)
  <folder>/params/       an orbax checkpoint of the parameters as a nested dict, blocks stacked
                         on a leading layer axis (paths as in `QwenImageTransformer`)

Parameters can be written and read one leaf at a time (orbax partial save / partial load), so
converting a 40 GB checkpoint never holds more than one stacked tensor in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from jax.sharding import Mesh

from qwen_jax import files, sharding as sharding_lib
from qwen_jax.conversion.errors import ConversionError
from qwen_jax.models.config import TransformerConfig
from qwen_jax.models.transformer import QwenImageTransformer, abstract_model, merge_lora
from qwen_jax.pytree import flatten_params, unflatten_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False):
    """`files.atomic_output_dir` raising ConversionError for an existing destination."""
    return files.atomic_output_dir(dst, overwrite, ConversionError)


def write_config(folder: Path, config: dict) -> None:
    with open(Path(folder) / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def read_config(folder: str | os.PathLike, **runtime) -> TransformerConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{folder}: not a qwen_jax transformer folder (no {CONFIG_FILE})")
    with open(path) as f:
        return TransformerConfig.from_diffusers_config(json.load(f), **runtime)


class ParamWriter:
    """Adds parameters to `<folder>/params` one leaf at a time; `finalize()` commits them."""

    def __init__(self, folder: Path):
        self.path = Path(folder).absolute() / PARAMS_DIR  # orbax wants absolute paths

    def add(self, path: tuple[str, ...], value: np.ndarray) -> None:
        ctx = ocp.Context()
        # zstd buys ~nothing on float weights but holds ~3 extra copies of the leaf while it
        # works (peak 2.6 GB vs 1.4 GB converting a 3.5 GB checkpoint); write uncompressed.
        ctx.array.saving.use_compression = False
        with ctx:
            ocp.partial.save(self.path, unflatten_params({path: value}))

    def finalize(self) -> None:
        ocp.partial.finalize(self.path)


def param_metadata(folder: str | os.PathLike) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of the stored parameters, read without loading them."""
    path = Path(folder).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise ConversionError(f"{folder}: no {PARAMS_DIR}/ checkpoint inside")
    meta = ocp.metadata(path).metadata
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten_params(meta).items()}


def check_stored_params(folder, stored: dict, expected: dict[tuple[str, ...], tuple[int, ...]]) -> None:
    """Raises unless the stored {path: (shape, dtype)} has exactly the expected paths and shapes."""
    bad = sorted("/".join(p) for p in set(expected) ^ set(stored))
    bad += sorted(f"{'/'.join(p)} {stored[p][0]} vs {expected[p]}"
                  for p in set(expected) & set(stored) if tuple(expected[p]) != tuple(stored[p][0]))
    if bad:
        raise ConversionError(f"{folder}: parameters do not match config.json: {', '.join(bad[:8])}")


def read_param(folder: str | os.PathLike, path: tuple[str, ...], shape, dtype) -> np.ndarray:
    """One stored parameter as a host numpy array (partial load: nothing else is read)."""
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        tree = ocp.load(Path(folder).absolute() / PARAMS_DIR, unflatten_params({path: np.empty(shape, dtype)}))
    return flatten_params(tree)[path]


def save_transformer(model: QwenImageTransformer, folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes a model (its config and parameters) as a transformer folder, atomically.

    A model with LoRA adapters is written merged (kernel + scale * A @ B), loadable as a plain
    model; `qwen_jax.conversion.lora.save_lora` writes the adapters alone.
    """
    save_module(merge_lora(model), model.config.to_diffusers_config(), folder, overwrite)


def save_module(model: nnx.Module, config: dict, folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes any component (VAE, text encoder, ...) as config.json + params/, atomically."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        write_config(tmp, config)
        ocp.save(tmp / PARAMS_DIR, params)


def stored_dtype(folder: str | os.PathLike) -> str:
    """The parameter dtype of a stored component (that of its first leaf)."""
    return np.dtype(next(iter(param_metadata(folder).values()))[1]).name


def load_params(folder: str | os.PathLike, wanted: dict, shardings=None) -> dict:
    """{path: array} for the abstract {path: ShapeDtypeStruct} `wanted`, read from a component folder.

    shardings: {path: Sharding} to restore each parameter straight into (default: one device).
    Stored parameters are cast to the wanted dtypes while loading.
    """
    check_stored_params(folder, param_metadata(folder), {p: tuple(v.shape) for p, v in wanted.items()})
    shardings = shardings or {p: sharding_lib.single_device() for p in wanted}
    target = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p]) for p, v in wanted.items()}
    return flatten_params(ocp.load(Path(folder).absolute() / PARAMS_DIR, unflatten_params(target)))


def load_into(folder: str | os.PathLike, abstract: nnx.Module, shardings=None) -> nnx.Module:
    """Reads a component's parameters into the abstract module `abstract` (from nnx.eval_shape)."""
    graphdef, abstract_state = nnx.split(abstract)
    loaded = load_params(folder, flatten_params(abstract_state), shardings)
    nnx.replace_by_pure_dict(abstract_state, unflatten_params(loaded))
    return nnx.merge(graphdef, abstract_state)


def load_transformer(
    folder: str | os.PathLike,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention: str = "xla",
    remat: str = "none",
    scan_unroll: int = 1,
    mesh: Mesh | None = None,
    rules=sharding_lib.DEFAULT_RULES,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    seed: int = 0,
) -> QwenImageTransformer:
    """The ready model from a transformer folder.

    param_dtype: storage dtype (default: as stored; a different one casts while loading).
    dtype: compute dtype (default: param_dtype).
    mesh: place every parameter straight into its sharding on this mesh (`rules` map logical
      axes to mesh axes); without one, parameters land on the default device.
    lora_rank, lora_alpha: add fresh LoRA adapters (seeded by `seed`) on the loaded base.
    """
    param_dtype = param_dtype or stored_dtype(folder)
    cfg = read_config(folder, param_dtype=param_dtype, dtype=dtype or param_dtype, attention=attention, remat=remat,
                      scan_unroll=scan_unroll, lora_rank=lora_rank, lora_alpha=lora_alpha)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    wanted = flatten_params(abstract_state)
    shardings = None
    if mesh is not None:
        shardings = sharding_lib.param_shardings({p: v.shape for p, v in wanted.items()}, mesh, rules)
    base = {p: v for p, v in wanted.items() if p[-1] not in ("lora_a", "lora_b")}
    loaded = load_params(folder, base, None if shardings is None else {p: shardings[p] for p in base})
    if cfg.lora_rank:  # fresh adapters (B = 0: the model starts equal to the base)
        abstract_adapters = nnx.state(abstract_model(cfg), nnx.LoRAParam)
        out_sh = None if shardings is None else unflatten_params(
            {p: shardings[p] for p in flatten_params(abstract_adapters)})  # created in place (multi-host safe)
        init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(QwenImageTransformer(cfg, rngs=nnx.Rngs(seed)),
                                                          nnx.LoRAParam)), out_shardings=out_sh)
        loaded.update(flatten_params(init()))
    nnx.replace_by_pure_dict(abstract_state, unflatten_params(loaded))
    return nnx.merge(graphdef, abstract_state)
