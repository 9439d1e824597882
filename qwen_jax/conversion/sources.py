"""Finding a component checkpoint on disk: diffusers folders (sharded or not) and single files.

Accepted sources (shown for the transformer; the VAE and text encoder work alike):
  * a diffusers pipeline folder (uses its `transformer/` subfolder) or a `transformer/` folder:
    config.json plus `*.safetensors`, or shards listed by a `*.safetensors.index.json`;
  * a single .safetensors file: diffusers names, or ComfyUI's with `model.diffusion_model.`
    prefixes (a config.json beside it is used when present).
Pickle checkpoints (.bin/.pt/.ckpt...) are refused, never opened.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qwen_jax.conversion.errors import ConversionError
from qwen_jax.conversion.safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, TensorInfo, refuse_pickle

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclasses.dataclass
class CheckpointSource:
    """The tensors of a checkpoint (by diffusers key) and its config.json, if one was found."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict | None


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def _weight_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{folder}: several index files ({', '.join(p.name for p in indexes)}); keep one")
    if indexes:
        weight_map = _read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{indexes[0]}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ConversionError(f"{indexes[0]}: lists shard {f.name}, which is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise ConversionError(f"{folder}: no .safetensors weights found")
    return files


def open_source(src: str | Path, subfolder: str = "transformer", class_name: str = "QwenImageTransformer2DModel") -> CheckpointSource:
    """Validates every header of the checkpoint at `src` and indexes its tensors by key.

    `subfolder` is used when `src` is a whole pipeline folder; `class_name` is the config's
    expected `_class_name` (a different one beside a single file is ignored as foreign).
    """
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_dir():
        folder = src / subfolder if (src / subfolder).is_dir() else src
        files = _weight_files(folder)
        config_path = folder / "config.json"
    else:
        refuse_pickle(src)
        if src.suffix != ".safetensors":
            raise ConversionError(f"{src}: expected a .safetensors file or a diffusers folder")
        files, config_path = [src], src.parent / "config.json"

    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for key, info in SafetensorsFile(f).tensors.items():
            for prefix in COMFY_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            if key in tensors:
                raise ConversionError(f"tensor {key!r} appears twice ({tensors[key].path.name} and {f.name})")
            tensors[key] = info
    config = _read_json(config_path) if config_path.is_file() else None
    foreign = config is not None and config.get("_class_name", class_name) != class_name
    if foreign and src.is_file():
        config = None  # some other model's config.json that happens to sit beside a single file
    return CheckpointSource(src, tensors, config)
