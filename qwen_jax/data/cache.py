"""Precomputed conditioning: VAE latents and text embeddings, so training runs neither frozen model.

    write_cache("cache/", ImageCaptionSource("photos/"), Conditioner.from_pretrained(folder),
                buckets=official_buckets(1024))          # or: python tools/cache_dataset.py ...
    src = CachedSource("cache/")                         # then Loader(src, batch_size, seed=...)
    latents, embeds = src.load(i)                        # (h, w, C), (T_i, D) float32 numpy

Folder layout (format version 1):
  cache.json      metadata {"format": "qwen_jax.conditioning_cache", "version": 1, "pipeline",
                  "source", "buckets": [[W, H], ...] (as given at cache time), "bucket_counts":
                  {"WxH": n}, "spatial_factor", "latent_channels", "text_dim",
                  "max_sequence_length", "uncond_prompt", "count", "shard_size", "num_shards",
                  "num_skipped", "skipped": [[image path, reason], ...]}
  index.jsonl     one line per example i, in the source's order (unreadable images left out):
                  {"caption", "image" (original path), "bucket": [W, H], "latent_shape": [h, w, C],
                   "text_length": T_i, "shard": "shard-00000.safetensors", "key": "00000012"}
  shard-NNNNN.safetensors   at most `shard_size` (256) examples, two float32 tensors each:
                  "<key>.latents"        (h, w, C) normalised VAE posterior means, h = H / spatial_factor
                  "<key>.prompt_embeds"  (T_i, D) text-encoder states trimmed to the caption's real
                                         length (its mask is T_i ones)
  uncond.safetensors   "prompt_embeds" (T_u, D): the unconditional prompt (default " "), for CFG dropout

Each image is resized and centre-cropped to its nearest bucket with `images.load_image`, as the
Loader does, and encoded by the same `Conditioner` calls the trainer makes. A caption is encoded
only with batch-mates of its own padded token length, so its states never depend on which other
captions shared its batch (the padded length, and XLA's batch-1 kernels, change float rounding
by ~1e-6). Reading an example opens its shard's header and reads two tensors, never the shard.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from qwen_jax.data import images as image_ops
from qwen_jax.files import atomic_output_dir, check_output_dir
from qwen_jax.data.sources import DataError, ImageCaptionSource, _existing, _jsonl_objects, _try, logger

FORMAT, VERSION = "qwen_jax.conditioning_cache", 1
CACHE_FILE, INDEX_FILE, UNCOND_FILE = "cache.json", "index.jsonl", "uncond.safetensors"
SHARD_SIZE = 256
TEXT_BUCKET = 64  # prompt lengths are padded to multiples of this (`sampling.prompts.DEFAULT_BUCKET`)
_FIELDS = ("caption", "image", "bucket", "latent_shape", "text_length", "shard", "key")


def check_buckets(buckets: Sequence[image_ops.Bucket]) -> tuple[image_ops.Bucket, ...]:
    out = tuple((int(w), int(h)) for w, h in buckets)
    if not out:
        raise ValueError("no buckets given")
    for w, h in out:
        if w % 16 or h % 16 or w < 16 or h < 16:
            raise ValueError(f"bucket {(w, h)} is not a positive multiple of 16")
    return out


class _ShardWriter:
    """Collects examples and writes them `shard_size` at a time as shard-NNNNN.safetensors."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.tensors: dict[str, np.ndarray] = {}
        self.count = self.num_shards = 0

    def add(self, latents: np.ndarray, embeds: np.ndarray) -> tuple[str, str]:
        key = f"{self.count:08d}"
        shard = f"shard-{self.num_shards:05d}.safetensors"
        self.tensors[f"{key}.latents"] = np.ascontiguousarray(latents, np.float32)
        self.tensors[f"{key}.prompt_embeds"] = np.ascontiguousarray(embeds, np.float32)
        self.count += 1
        if len(self.tensors) == 2 * self.shard_size:
            self.flush()
        return shard, key

    def flush(self) -> None:
        if self.tensors:
            save_file(self.tensors, str(self.folder / f"shard-{self.num_shards:05d}.safetensors"))
            self.tensors, self.num_shards = {}, self.num_shards + 1


def _trimmed_text(conditioner, captions: list[str], rows: int) -> list[np.ndarray]:
    """Per caption, its (T_i, D) float32 states without the padding.

    Captions are encoded in calls of `rows` (short calls filled by repeats) with batch-mates of
    the same padded input length, so each result is what any batch of the caption with shorter
    batch-mates gives: a longer padded length changes the float rounding (by ~1e-6).
    """
    from qwen_jax.sampling.prompts import DEFAULT_BUCKET, tokenize_prompts

    counts = tokenize_prompts(conditioner.tokenizer, captions)[1].sum(axis=1)
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(counts):
        groups.setdefault(-(-int(n) // DEFAULT_BUCKET), []).append(i)
    out: list[np.ndarray] = [None] * len(captions)
    for members in groups.values():
        for start in range(0, len(members), rows):
            part = members[start:start + rows]
            padded = part + [part[-1]] * (rows - len(part))
            embeds, mask = (np.asarray(a) for a in conditioner.encode_text([captions[i] for i in padded]))
            lengths = mask.sum(axis=1).astype(int)
            if not np.array_equal(mask, np.arange(mask.shape[1])[None] < lengths[:, None]):
                raise ValueError("text mask is not a prefix of ones; cannot trim prompt embeddings")
            for row, i in enumerate(part):
                out[i] = embeds[row, :lengths[row]].astype(np.float32)
    return out


def _decode(pool, source, chunk, bucket) -> list:
    return [pool.submit(_try, image_ops.load_image, source.paths[i], bucket) for i in chunk]


def write_cache(out_dir: str | PathLike, source: ImageCaptionSource, conditioner, *,
                buckets: Sequence[image_ops.Bucket], batch_size: int = 8, uncond_prompt: str = " ",
                overwrite: bool = False, progress: bool = True, shard_size: int = SHARD_SIZE,
                num_threads: int = 8, pipeline: str | PathLike | None = None) -> dict:
    """Encodes every readable image of `source` with its caption into a cache folder at `out_dir`.

    Images are batched per bucket (`batch_size`, a short last batch padded by repeats so every
    call has one shape); unreadable ones are skipped and recorded in `source.skipped`. The folder
    appears only when complete; a non-empty `out_dir` is an error unless `overwrite`.
    `pipeline` is recorded in cache.json. Returns the cache.json metadata.
    """
    out = Path(out_dir).expanduser()
    check_output_dir(out, overwrite, DataError)
    buckets = check_buckets(buckets)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    assign = [image_ops.nearest_bucket(w, h, buckets) for w, h in source.sizes]
    members = [[i for i, b in enumerate(assign) if b == k] for k in range(len(buckets))]
    records: dict[int, dict] = {}
    with atomic_output_dir(out, overwrite, DataError) as tmp:
        shards = _ShardWriter(tmp, shard_size)

        def encode(bucket, batch):
            ids, arrays = [i for i, _ in batch], [a for _, a in batch]
            pixels = np.stack(arrays + arrays[-1:] * (batch_size - len(batch)))
            latents = np.asarray(conditioner.encode_images(pixels), np.float32)
            texts = _trimmed_text(conditioner, [source.captions[i] for i in ids], batch_size)
            for i, lat, emb in zip(ids, latents, texts):
                shard, key = shards.add(lat, emb)
                records[i] = {"caption": source.captions[i], "image": str(source.paths[i]), "bucket": list(bucket),
                              "latent_shape": list(lat.shape), "text_length": len(emb), "shard": shard, "key": key}

        with ThreadPoolExecutor(max(1, num_threads)) as pool, \
                tqdm(total=len(source), unit="img", desc="caching", disable=not progress) as bar:
            for bucket, idx in zip(buckets, members):
                chunks = [idx[start:start + batch_size] for start in range(0, len(idx), batch_size)] + [[]]
                pending, ahead = [], _decode(pool, source, chunks[0], bucket)
                for c, chunk in enumerate(chunks[:-1]):  # chunk c + 1 decodes while chunk c is encoded
                    futures, ahead = ahead, _decode(pool, source, chunks[c + 1], bucket)
                    for i, future in zip(chunk, futures):
                        array, error = future.result()
                        if error is None:
                            pending.append((i, array))
                        else:
                            source.mark_unreadable(i, error)
                    bar.update(len(chunk))
                    last = c == len(chunks) - 2
                    while len(pending) >= batch_size or (last and pending):
                        encode(bucket, pending[:batch_size])
                        pending = pending[batch_size:]
        shards.flush()
        if not records:
            raise DataError(f"{source.path}: none of the {len(source)} images could be decoded")

        uncond = _trimmed_text(conditioner, [uncond_prompt], batch_size)[0]
        save_file({"prompt_embeds": uncond}, str(tmp / UNCOND_FILE))
        order = sorted(records)
        with open(tmp / INDEX_FILE, "w", encoding="utf-8") as f:
            for i in order:
                f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
        first = records[order[0]]
        counts = {f"{w}x{h}": sum(records[i]["bucket"] == [w, h] for i in order) for w, h in buckets}
        skipped = source.skipped
        meta = {"format": FORMAT, "version": VERSION, "pipeline": None if pipeline is None else str(pipeline),
                "source": str(source.path), "buckets": [list(b) for b in buckets], "bucket_counts": counts,
                "spatial_factor": int(conditioner.pixels_per_latent), "latent_channels": first["latent_shape"][-1],
                "text_dim": int(uncond.shape[-1]),
                "max_sequence_length": getattr(conditioner, "max_sequence_length", None),
                "uncond_prompt": uncond_prompt, "count": len(order), "shard_size": shard_size,
                "num_shards": shards.num_shards, "num_skipped": len(skipped), "skipped": [list(s) for s in skipped]}
        with open(tmp / CACHE_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
    logger.info("cached %d examples in %s (%d skipped)", len(order), out, len(skipped))
    return meta


class CachedSource:
    """A cache folder written by `write_cache`, read lazily one example at a time.

    Attributes (index i over the cached examples, in the order of the source they came from):
      captions[i], sizes[i] = (W, H) bucket in pixels, paths[i] = original image path (str),
      text_lengths[i]; buckets: the bucket list given at cache time; metadata: cache.json;
      skipped / num_skipped: always empty (a cache holds readable examples only; what was
      skipped at cache time is metadata["skipped"]).
    `src.load(i)` -> (latents (h, w, C), prompt_embeds (T_i, D)) float32; `src[i]` -> dict of them.
    """

    def __init__(self, path: str | PathLike):
        self.path = _existing(path)
        meta_path = self.path / CACHE_FILE
        if not meta_path.is_file():
            raise DataError(f"{self.path}: not a latent cache (no {CACHE_FILE}); build one with tools/cache_dataset.py")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{meta_path}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: not a qwen_jax latent cache (format is not {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise DataError(f"{meta_path}: cache format version {meta.get('version')}, this code reads version "
                            f"{VERSION}; rebuild it with tools/cache_dataset.py")
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise DataError(f"{index_path}: missing; the cache is incomplete")
        records = [obj for _, obj in _jsonl_objects(index_path)]
        for number, obj in enumerate(records, 1):
            if any(k not in obj for k in _FIELDS):
                raise DataError(f"{index_path}: record {number} lacks one of {', '.join(_FIELDS)}")
        if not records:
            raise DataError(f"{self.path}: empty cache (no examples)")
        if len(records) != meta.get("count"):
            raise DataError(f"{index_path}: {len(records)} examples, but {CACHE_FILE} says {meta.get('count')}")
        for name in sorted({r["shard"] for r in records} | {UNCOND_FILE}):
            if not (self.path / name).is_file():
                raise DataError(f"{self.path / name}: missing; the cache is incomplete")
        self.metadata = meta
        self.buckets = tuple(tuple(b) for b in meta.get("buckets") or ())
        self.captions = [r["caption"] for r in records]
        self.paths = [r["image"] for r in records]
        self.sizes = [tuple(r["bucket"]) for r in records]
        self.text_lengths = [int(r["text_length"]) for r in records]
        self._where = [(r["shard"], r["key"]) for r in records]
        if not set(self.sizes) <= set(self.buckets):
            raise DataError(f"{meta_path}: 'buckets' lacks sizes the examples have")
        logger.info("%d cached examples from %s", len(records), self.path)

    skipped = property(lambda self: [])
    num_skipped = property(lambda self: 0)

    def __len__(self) -> int:
        return len(self.captions)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        shard, key = self._where[index]
        with safe_open(str(self.path / shard), framework="numpy") as f:
            return f.get_tensor(f"{key}.latents"), f.get_tensor(f"{key}.prompt_embeds")

    def __getitem__(self, index: int) -> dict:
        latents, embeds = self.load(index)
        return {"caption": self.captions[index], "latents": latents, "prompt_embeds": embeds}

    def batch(self, ids: Sequence[int]) -> dict:
        """Loader batch for these examples: prompt states zero-padded to a multiple of 64."""
        loaded = [self.load(i) for i in ids]
        length = max(TEXT_BUCKET, -(-max(len(e) for _, e in loaded) // TEXT_BUCKET) * TEXT_BUCKET)
        embeds = np.zeros((len(ids), length, loaded[0][1].shape[1]), np.float32)
        mask = np.zeros((len(ids), length), np.int32)
        for row, (_, e) in enumerate(loaded):
            embeds[row, :len(e)], mask[row, :len(e)] = e, 1
        return {"latents": np.stack([lat for lat, _ in loaded]), "prompt_embeds": embeds, "prompt_mask": mask,
                "captions": [self.captions[i] for i in ids], "ids": np.asarray(ids, np.int64)}

    def uncond(self) -> tuple[np.ndarray, np.ndarray]:
        """The unconditional prompt: (embeds (1, T_u, D) float32, mask (1, T_u) int32 ones)."""
        with safe_open(str(self.path / UNCOND_FILE), framework="numpy") as f:
            embeds = f.get_tensor("prompt_embeds")
        return embeds[None].astype(np.float32), np.ones((1, len(embeds)), np.int32)

    def __repr__(self) -> str:
        return f"CachedSource({str(self.path)!r}, {len(self)} examples)"
