"""Training batches on grain: bucketed, shuffled with a seed, repeated, resumable.

Batch layouts (one dict per step):
  images   {"images": (B, H, W, 3) float32 in [-1, 1], "captions": list[str] (B),
            "bucket": (W, H), "ids": (B,) int64 source indices}
  cached   {"latents": (B, h, w, C) float32, "prompt_embeds": (B, T, D) float32 zero-padded to T,
            the smallest multiple of 64 holding the batch's longest prompt, "prompt_mask": (B, T)
            int32, "captions": list[str] (B), "bucket": (W, H), "ids": (B,) int64 cache indices}
  prompts  {"captions": list[str] (B), "ids": (B,) int64}

A `CachedSource` (`cache.py`) is bucketed by its examples' exact sizes; its buckets default to
the list it was written with, so a cache and the images it came from (read with `verify=True`,
which drops the same unreadable files) give the same ids in the same order for the same seed,
batch size and buckets.

How an epoch is cut into batches. Examples are grouped by bucket; bucket b with n_b examples
has floor(n_b / G) batch slots (ceil with `drop_remainder=False`: the last slot wraps around
to the bucket's first examples, so every batch is full), where G = batch_size * shard_count is
the global batch. One grain pipeline does the rest:

    MapDataset.source(slots).shuffle(seed).repeat(num_epochs).map_with_index(load)

shuffle + repeat give every epoch its own order of slots; inside `load`, slot j of bucket b in
epoch e takes positions j*G .. j*G+G-1 of that bucket's members as shuffled by grain for epoch e
(a per-bucket `MapDataset.shuffle`), and process `shard_index` keeps its B of them. All
processes therefore agree on every step's bucket (their shapes match, so the global batch can
be assembled) while each decodes only its own images.

Position: `it = iter(loader)` is a grain `DatasetIterator`; `it.get_state()` is
{"next_index": k}, k batch slots consumed over all epochs, JSON-serialisable, and
`loader.iterator(state)` (or `it.set_state(state)`) resumes at exactly that batch. A state is
meaningful only for the same source, batch size, buckets, seed and shard layout.

An image that fails to decode is replaced by the next readable member of its bucket in the same
epoch order and recorded in `source.skipped`; the replacement depends only on the files, so a
resumed run sees the same batches. Skips are counted in this process: use grain threads
(`num_threads`), not worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from qwen_jax.data import images as image_ops
from qwen_jax.data.cache import CachedSource, check_buckets
from qwen_jax.data.sources import DataError, ImageCaptionSource, PromptSource, _try, logger


def _bucket_seed(seed: int, bucket: int) -> int:
    """A 32-bit seed for one bucket's member shuffle, independent of the slot-order seed."""
    return int(np.random.SeedSequence([seed, bucket]).generate_state(1)[0])


def _num_slots(n: int, global_batch: int, drop_remainder: bool) -> int:
    return n // global_batch if drop_remainder else -(-n // global_batch)


class Loader:
    """Batches for training from a `PromptSource`, an `ImageCaptionSource` or a `CachedSource`.

    batch_size: examples per batch in this process; buckets: (width, height) pairs (images:
    default `official_buckets()`, the 7 native Qwen-Image sizes; a cache: default its own, and
    every cached size must be one of them); num_epochs: None repeats
    forever; shard_index / shard_count: this process's slice of each global batch;
    num_threads / prefetch: grain read threads and batches decoded ahead (0 = in the caller).
    """

    def __init__(self, source: PromptSource | ImageCaptionSource | CachedSource, batch_size: int, *,
                 buckets: Sequence[image_ops.Bucket] | None = None, seed: int = 0,
                 num_epochs: int | None = None, drop_remainder: bool = True, shard_index: int = 0,
                 shard_count: int = 1, num_threads: int = 0, prefetch: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.global_batch = batch_size * shard_count
        self.read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)

        self.has_images = isinstance(source, ImageCaptionSource)
        self.cached = isinstance(source, CachedSource)
        if self.has_images:
            self.buckets = check_buckets(buckets or image_ops.official_buckets())
            assign = [image_ops.nearest_bucket(w, h, self.buckets) for w, h in source.sizes]
            members = [[i for i, b in enumerate(assign) if b == k] for k in range(len(self.buckets))]
        elif self.cached:
            self.buckets = check_buckets(buckets or source.buckets)
            lookup = {b: k for k, b in reversed(list(enumerate(self.buckets)))}
            absent = sorted(set(source.sizes) - set(lookup))
            if absent:
                raise DataError(f"{source.path}: cached sizes {absent} are in none of the buckets; "
                                "leave buckets out to use the cache's own")
            assign = [lookup[s] for s in source.sizes]
            members = [[i for i, b in enumerate(assign) if b == k] for k in range(len(self.buckets))]
        else:
            self.buckets = (None,)
            members = [list(range(len(source)))]
        self._members = members
        self._member_order = [grain.MapDataset.source(m).shuffle(seed=_bucket_seed(seed, k))
                              for k, m in enumerate(members)]

        num_slots = [_num_slots(len(m), self.global_batch, drop_remainder) for m in members]
        slots = [(k, j) for k, n in enumerate(num_slots) for j in range(n)]
        if not slots:
            sizes = {self.buckets[k]: len(m) for k, m in enumerate(members) if m}
            raise DataError(f"{source.path}: no bucket holds a full global batch of {self.global_batch} "
                            f"(examples per bucket: {sizes}); lower the batch size or pass drop_remainder=False")
        self.steps_per_epoch = len(slots)
        unused = sum(max(0, len(m) - n * self.global_batch) for m, n in zip(members, num_slots))
        if unused:  # different examples each epoch, since every epoch reshuffles the buckets
            logger.info("%d of %d examples per epoch fall outside full batches", unused, len(source))

        self.dataset = (grain.MapDataset.source(slots).shuffle(seed=seed).repeat(num_epochs)
                        .map_with_index(self._load))

    @property
    def bucket_counts(self) -> dict:
        """{bucket (W, H) (None for prompts): number of examples in it}."""
        return {b: len(m) for b, m in zip(self.buckets, self._members)}

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """[(path, reason)] of every image skipped so far (at construction or while loading)."""
        return self.source.skipped if self.has_images else []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def iterator(self, state: dict | None = None) -> grain.DatasetIterator:
        """A fresh grain iterator, at the start or at a `get_state()` position."""
        it = self.dataset.to_iter_dataset(self.read_options).__iter__()
        if state is not None:
            it.set_state(state)
        return it

    def __iter__(self) -> grain.DatasetIterator:
        return self.iterator()

    def position(self, state: dict) -> tuple[int, int]:
        """(epoch, batches done in that epoch) of an iterator state, for logging."""
        return divmod(int(state["next_index"]), self.steps_per_epoch)

    def _member(self, bucket: int, epoch: int, position: int) -> int:
        """Source index at `position` of bucket's shuffled order in `epoch` (wrapping around)."""
        n = len(self._members[bucket])
        return int(self._member_order[bucket][epoch * n + position % n])

    def _load(self, index: int, slot: tuple[int, int]) -> dict | None:
        bucket, j = slot
        epoch = index // self.steps_per_epoch
        start = j * self.global_batch + self.shard_index * self.batch_size
        positions = range(start, start + self.batch_size)
        if not self.has_images:
            ids = [self._member(bucket, epoch, p) for p in positions]
            if self.cached:
                return {**self.source.batch(ids), "bucket": self.buckets[bucket]}
            return {"captions": [self.source.prompts[i] for i in ids], "ids": np.asarray(ids, np.int64)}

        size = self.buckets[bucket]
        ids, arrays = [], []
        for p in positions:
            found = self._decode_from(bucket, epoch, p, size)
            if found is None:  # every image of this bucket is unreadable: grain drops the batch
                return None
            ids.append(found[0])
            arrays.append(found[1])
        return {"images": np.stack(arrays), "captions": [self.source.captions[i] for i in ids],
                "bucket": size, "ids": np.asarray(ids, np.int64)}

    def _decode_from(self, bucket: int, epoch: int, position: int, size) -> tuple[int, np.ndarray] | None:
        """(index, image) of the first readable member at or after `position`, or None."""
        for offset in range(len(self._members[bucket])):
            index = self._member(bucket, epoch, position + offset)
            if self.source.is_unreadable(index):
                continue
            array, error = _try(image_ops.load_image, self.source.paths[index], size)
            if error is None:
                return index, array
            self.source.mark_unreadable(index, error)
        logger.warning("every image of bucket %s is unreadable; its batches are dropped", size)
        return None
