"""The toy world: 32x32 solid shapes on solid backgrounds, a CPU-sized stand-in for real images.

    from qwen_jax.toy import ToySource, all_prompts, real_set
    src = ToySource(seed=0)      # src[i] -> {"image": float32 (32, 32, 3) in [-1, 1], "caption", scene fields}
    images, captions = real_set(all_prompts(), seeds_per_prompt=8, seed=0)   # uint8, for the evaluator

Rendering conventions, the prompt order and the sampling of scenes are documented in `world.py`;
the analytic evaluator is `qwen_jax.eval.toy_metrics`.
"""

from qwen_jax.toy.world import (IMAGE_SIZE, PALETTE, SHAPES, ToySource, all_prompts, caption, extent, parse_prompt,
                                prompt_index, real_set, render, render_scene, sample_scene, shape_mask)

__all__ = [
    "IMAGE_SIZE", "PALETTE", "SHAPES", "ToySource", "all_prompts", "caption", "extent", "parse_prompt",
    "prompt_index", "real_set", "render", "render_scene", "sample_scene", "shape_mask",
]
