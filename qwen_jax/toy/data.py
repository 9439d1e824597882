"""The toy world as training batches: the same interface as `qwen_jax.data.Loader`, unlimited.

Batch k of the global batch G holds ToySource elements k*G .. k*G + G - 1; process `shard_index`
renders its `batch_size` of them. Batches are {"images": (B, 32, 32, 3) float32 in [-1, 1],
"captions": list[str], "ids": (B,) int64}; `iterator(state)` resumes at a `get_state()` position
(grain), exactly like the image loader.
"""

from __future__ import annotations

import grain
import numpy as np

from qwen_jax.toy.world import ToySource


class ToyLoader:
    def __init__(self, seed: int, batch_size: int, *, shard_index: int = 0, shard_count: int = 1,
                 num_threads: int = 0, prefetch: int = 2):
        if batch_size < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"batch_size {batch_size} / shard {shard_index} of {shard_count} is not valid")
        self.source = ToySource(seed)
        self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count
        self.global_batch = batch_size * shard_count
        self.steps_per_epoch = len(self.source) // self.global_batch
        self.read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self.dataset = grain.MapDataset.range(self.steps_per_epoch).map(self._load)

    skipped: list = []
    num_skipped = 0

    def _load(self, step: int) -> dict:
        start = step * self.global_batch + self.shard_index * self.batch_size
        ids = np.arange(start, start + self.batch_size, dtype=np.int64)
        items = [self.source[int(i)] for i in ids]
        return {"images": np.stack([it["image"] for it in items]), "captions": [it["caption"] for it in items],
                "ids": ids}

    def iterator(self, state: dict | None = None) -> grain.DatasetIterator:
        it = self.dataset.to_iter_dataset(self.read_options).__iter__()
        if state is not None:
            it.set_state(state)
        return it

    def __iter__(self):
        return self.iterator()
