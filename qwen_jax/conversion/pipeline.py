"""Converting a whole Qwen-Image folder (diffusers layout) in one go.

  SRC/transformer/  -> DST/transformer/   (Flax params, stacked blocks)
  SRC/vae/          -> DST/vae/           (single-image encoder/decoder; time_conv skipped)
  SRC/text_encoder/ -> DST/text_encoder/  (text model only; vision tower and lm_head skipped)
  SRC/tokenizer/, SRC/scheduler/, SRC/model_index.json  -> copied

Every component is opened and checked (headers, configs, key plans) before anything is
written; the destination appears only when all of it has been converted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from qwen_jax import checkpoints
from qwen_jax.conversion.component import write_component
from qwen_jax.conversion.errors import ConversionError
from qwen_jax.conversion.plan import Plan
from qwen_jax.conversion.sources import CheckpointSource, open_source
from qwen_jax.conversion.text_encoder_keys import plan_text_encoder
from qwen_jax.conversion.transformer import plan_transformer
from qwen_jax.conversion.vae_keys import plan_vae
from qwen_jax.flow import SchedulerConfig
from qwen_jax.models.config import TransformerConfig
from qwen_jax.models.text_encoder import TextEncoderConfig
from qwen_jax.models.vae import VAEConfig

COMPONENTS = ("transformer", "vae", "text_encoder")
COPIED = ("tokenizer", "scheduler")


@dataclasses.dataclass
class ComponentPlan:
    name: str
    source: CheckpointSource
    config: dict  # what DST/<name>/config.json will hold
    plan: Plan


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or all((path / c).is_dir() for c in COMPONENTS))


def _config(source: CheckpointSource, name: str, parse):
    if source.config is None:
        raise ConversionError(f"{source.path}: the {name} has no config.json")
    try:
        return parse(source.config)
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"{source.path}/config.json: bad {name} config: {e}") from None


def plan_pipeline(src: str | os.PathLike) -> list[ComponentPlan]:
    """Opens and checks all three components of a Qwen-Image folder; raises before any writing."""
    src = Path(src)
    for name in COMPONENTS + COPIED:
        if not (src / name).is_dir():
            raise ConversionError(f"{src}: not a Qwen-Image folder (no {name}/)")
    if not (src / "scheduler" / "scheduler_config.json").is_file():
        raise ConversionError(f"{src}/scheduler: no scheduler_config.json")
    with open(src / "scheduler" / "scheduler_config.json") as f:
        try:
            SchedulerConfig.from_diffusers_config(json.load(f))
        except (ValueError, json.JSONDecodeError) as e:
            raise ConversionError(f"{src}/scheduler/scheduler_config.json: {e}") from None

    plans = []
    source = open_source(src / "transformer")
    cfg = _config(source, "transformer", TransformerConfig.from_diffusers_config)
    plans.append(ComponentPlan("transformer", source, cfg.to_diffusers_config(),
                               plan_transformer(cfg, _shapes(source))))
    source = open_source(src / "vae", subfolder="vae", class_name="AutoencoderKLQwenImage")
    cfg = _config(source, "vae", VAEConfig.from_diffusers_config)
    plans.append(ComponentPlan("vae", source, cfg.to_diffusers_config(), plan_vae(cfg, _shapes(source))))
    source = open_source(src / "text_encoder", subfolder="text_encoder", class_name="")
    cfg = _config(source, "text encoder", TextEncoderConfig.from_transformers_config)
    plans.append(ComponentPlan("text_encoder", source, cfg.to_transformers_config(),
                               plan_text_encoder(cfg, _shapes(source))))
    return plans


def _shapes(source: CheckpointSource) -> dict[str, tuple[int, ...]]:
    return {k: info.shape for k, info in source.tensors.items()}


def _skip_group(key: str) -> str:
    if ".time_conv." in key:
        return "time_conv (temporal, unused for single images)"
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "model" else parts[0]


def summarize(plans: list[ComponentPlan]) -> list[str]:
    """One line per component: tensors converted and tensors deliberately skipped, by group."""
    lines = []
    for p in plans:
        used = sum(len(leaf.sources) for leaf in p.plan.leaves)
        line = f"{p.name}: {used} tensors -> {len(p.plan.leaves)} parameters"
        if p.plan.skipped:
            groups: dict[str, int] = {}
            for key in p.plan.skipped:
                groups[_skip_group(key)] = groups.get(_skip_group(key), 0) + 1
            line += f"; skipped {len(p.plan.skipped)} tensors: " + ", ".join(f"{g} ({n})" for g, n in groups.items())
        lines.append(line)
    return lines


def convert_pipeline(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Converts a Qwen-Image folder into a qwen_jax folder at `dst`; returns the summary lines."""
    src = Path(src)
    plans = plan_pipeline(src)
    with checkpoints.atomic_output_dir(dst, overwrite=overwrite) as tmp:
        for p in plans:
            write_component(tmp / p.name, p.config, p.source, p.plan, dtype, progress, desc=p.name)
        for name in COPIED:
            shutil.copytree(src / name, tmp / name)
        if (src / "model_index.json").is_file():
            shutil.copy2(src / "model_index.json", tmp / "model_index.json")
    return summarize(plans)
