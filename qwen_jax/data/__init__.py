"""Training data: prompt and image + caption sources, aspect-ratio buckets, a grain loader.

    src = ImageCaptionSource("photos/")                  # or a .jsonl manifest; PromptSource("p.txt")
    loader = Loader(src, batch_size=4, buckets=official_buckets(1024), seed=0)
    it = iter(loader)                                    # a grain DatasetIterator
    batch = next(it)   # {"images": (4, H, W, 3) float32 in [-1, 1], "captions": [...], "bucket": (W, H), "ids"}
    state = it.get_state()                               # {"next_index": k}: save with the checkpoint
    it = loader.iterator(state)                          # resumes at exactly the next batch
    loader.num_skipped, loader.skipped                   # unreadable images so far: [(path, reason)]

    write_cache("cache/", src, conditioner, buckets=official_buckets(1024))  # or tools/cache_dataset.py
    loader = Loader(CachedSource("cache/"), batch_size=4, seed=0)
    batch = next(iter(loader))  # {"latents": (4, h, w, C), "prompt_embeds", "prompt_mask", "captions", "bucket", "ids"}

Layouts and the batching scheme are documented in `loader.py`; file formats in `sources.py`, the
cache folder in `cache.py`.
"""

from qwen_jax.data.cache import CachedSource, write_cache
from qwen_jax.data.images import (OFFICIAL_RATIOS, OFFICIAL_SIZES, area_buckets, load_image, nearest_bucket,
                                  official_buckets)
from qwen_jax.data.loader import Loader
from qwen_jax.data.sources import IMAGE_SUFFIXES, DataError, ImageCaptionSource, PromptSource

__all__ = [
    "IMAGE_SUFFIXES", "OFFICIAL_RATIOS", "OFFICIAL_SIZES", "CachedSource", "DataError", "ImageCaptionSource",
    "Loader", "PromptSource", "area_buckets", "load_image", "nearest_bucket", "official_buckets", "write_cache",
]
