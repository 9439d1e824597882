"""Toy model folders (`models/toy/*`): small enough to commit, loadable as they are everywhere.

A toy model folder holds only what is its own:

    toy.json      {"text_encoder_sha256": the digest of the family's text encoder it was trained
                   with, "text_encoder_fingerprint": the same up to rounding (`toy/build.py`), "seed": the family seed (default 0), "transformer": "random" for a
                   folder with no trained weights (the family's random transformer, a training
                   start, with "token_pixels": 4 or 2, default 4), plus free-form provenance:
                   recipe, scores}
    transformer/  the trained transformer (config.json + params/), unless "transformer" is "random"

The rest of a pipeline (the seeded text encoder, the real tokenizer, the pixel-shuffle codec,
the scheduler) is the family's (`toy/build.py`): 53 MB that every toy model shares and that a
seed regenerates exactly. `resolve_toy_folder` builds it once per family into the cache and
returns a pipeline folder of links, so `Pipeline.from_pretrained`, `python -m qwen_jax.sample
--model`, `python -m qwen_jax.eval.toy --model`, exports and `--config.model.pretrained` take a
toy model folder like any converted one (`pipeline.resolve_folder` sends them here):

    <cache>/toy-models/family-<version>-s<seed>-px<token pixels>-<digest[:12]>/   the family, built
        once (a full pipeline folder: the codec that matches the token size, the family's random
        transformer)
    <cache>/toy-models/<name>-<key>/     transformer -> <model folder>/transformer (or the
        family's random one), text_encoder, tokenizer, vae, scheduler -> the family's
    (<cache> is `pipeline.default_cache_dir()` unless given; key: the folder's path and toy.json)

A regenerated encoder that is not the one toy.json names (neither its digest nor, for an XLA that
rounds the draw differently, its fingerprint: a jax version that initialises differently) is
refused, by name, before anything is linked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from qwen_jax.conversion.errors import ConversionError
from qwen_jax.files import publish_dir

META_FILE = "toy.json"
SHARED = ("text_encoder", "tokenizer", "vae", "scheduler")
MODELS = Path(__file__).resolve().parents[2] / "models" / "toy"   # the committed toy models
INIT = MODELS / "init"         # the family's random transformer: where the teacher's training starts
INIT_PX2 = MODELS / "init_px2"  # the same with 2x2-pixel tokens
TEACHER = MODELS / "teacher"   # the trained teacher (configs/flow_matching.py:toy)
STUDENT = MODELS / "student"   # the 2-step student distilled from it (python -m qwen_jax.toy.distill)


def is_toy_model_folder(folder: Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("text_encoder_sha256"), str):
        raise ConversionError(f"{path}: no 'text_encoder_sha256' (the digest of the family's text encoder)")
    if meta.get("transformer", "trained") == "random":
        return meta
    if not (Path(folder) / "transformer" / "config.json").is_file():
        raise ConversionError(f"{folder}: a toy model folder needs transformer/ (or \"transformer\": "
                              f"\"random\" in {META_FILE})")
    return meta


def token_pixels(folder: Path, meta: dict) -> int:
    """Pixels per token side: the trained transformer's own, or toy.json's for a random one (default 4)."""
    from qwen_jax.checkpoints import read_config
    from qwen_jax.toy.build import token_pixels_of

    if meta.get("transformer") == "random":
        return int(meta.get("token_pixels", 4))
    try:
        return token_pixels_of(read_config(folder / "transformer"))
    except ValueError as e:
        raise ConversionError(f"{folder / 'transformer'}: {e}") from None


def family_folder(seed: int, digest: str, token_pixels: int, root: Path, fingerprint: dict | None = None) -> Path:
    """The family's pipeline folder for (seed, digest, token size) under `root`, built on first use
    (its encoder checked against `digest`, or `fingerprint`: see `build.build_toy_pipeline`)."""
    from qwen_jax.toy.build import FAMILY_VERSION, build_toy_pipeline

    target = root / f"family-{FAMILY_VERSION}-s{seed}-px{token_pixels}-{digest[:12]}"
    if (target / "scheduler").is_dir():
        return target
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_toy_pipeline(tmp, seed=seed, expect_digest=digest, token_pixels=token_pixels,
                           expect_fingerprint=fingerprint)
    except ValueError as e:  # the encoder check
        raise ConversionError(str(e)) from None
    publish_dir(tmp, target)
    return target


def resolve_toy_folder(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A pipeline folder (links into the cache) for a toy model folder; see the module docstring."""
    from qwen_jax.pipeline import default_cache_dir

    folder = Path(folder).resolve()
    meta = read_meta(folder)
    root = Path(cache_dir or default_cache_dir()) / "toy-models"
    root.mkdir(parents=True, exist_ok=True)
    family = family_folder(int(meta.get("seed", 0)), meta["text_encoder_sha256"], token_pixels(folder, meta), root,
                           meta.get("text_encoder_fingerprint"))
    key = hashlib.sha256(str(folder).encode() + (folder / META_FILE).read_bytes()).hexdigest()[:12]
    target = root / f"{folder.name}-{key}"
    if (target / META_FILE).is_file():
        return target
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    own = family if meta.get("transformer") == "random" else folder
    (tmp / "transformer").symlink_to(own / "transformer", target_is_directory=True)
    for name in SHARED:
        (tmp / name).symlink_to(family / name, target_is_directory=True)
    (tmp / META_FILE).write_text(json.dumps({**meta, "source": str(folder)}, indent=2))
    publish_dir(tmp, target)
    return target
