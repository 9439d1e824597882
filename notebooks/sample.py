# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Qwen-Image in JAX: load, jit, sample, look
#
# Converts nothing by itself: point `MODEL` at a folder written by
# `python tools/convert_weights.py Qwen-Image/ qwen_image_jax` (or at a diffusers folder or hub
# id, which `Pipeline.from_pretrained` converts once into its cache). Environment variables
# override the settings below, which is how the test suite runs this notebook on a tiny model.

# %%
import os
import time

import jax
import numpy as np

from qwen_jax import flow
from qwen_jax.pipeline import ASPECT_RATIOS, Pipeline, to_pil
from qwen_jax.sampling.grid import image_grid

MODEL = os.environ.get("QWEN_JAX_MODEL", "qwen_image_jax")
WIDTH, HEIGHT = (int(v) for v in os.environ.get("QWEN_JAX_SIZE", "%dx%d" % ASPECT_RATIOS["1:1"]).split("x"))
STEPS = int(os.environ.get("QWEN_JAX_STEPS", 50))
GUIDANCE = float(os.environ.get("QWEN_JAX_GUIDANCE", 4.0))
PROMPTS = [
    "A red fox sleeping in fresh snow, soft morning light, watercolor",
    "A lighthouse on a cliff during a storm, dramatic clouds, oil painting",
    "A bowl of ramen on a wooden table, steam rising, photograph",
    'A neon sign that says "JAX" in a rainy alley at night',
]
print(jax.devices())

# %% [markdown]
# ## Load
# Parameters are read straight into their (optional) shardings; the text encoder, the sampler
# and the VAE decoder are jitted functions that take the parameters as arguments.

# %%
pipe = Pipeline.from_pretrained(MODEL)
print(pipe.transformer.config)

# %% [markdown]
# ## Sample
# The first call compiles (one program for the whole denoising loop); the second one, with the
# same shapes and new seeds, reuses it.

# %%
for attempt in ("compile + run", "run"):
    start = time.perf_counter()
    out = pipe(PROMPTS, " ", height=HEIGHT, width=WIDTH, num_steps=STEPS, guidance=GUIDANCE,
               seed=0 if attempt == "run" else 100)
    print(f"{attempt}: {time.perf_counter() - start:.1f} s for {len(PROMPTS)} images")

# %% [markdown]
# ## Look

# %%
grid = to_pil(image_grid(out.array, cols=2))
grid.save(os.environ.get("QWEN_JAX_GRID", "sample_grid.png"))
grid

# %% [markdown]
# ## A few-step student
# A distilled student runs the same pipeline with a fixed-shift schedule, 2 steps, no CFG
# (sigmas 1.0 and 0.75).

# %%
student = Pipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, flow.SchedulerConfig.fixed_shift(3.0))
fast = student(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=2, guidance=1.0, seed=0)
print(student.sigmas(2, (HEIGHT // 16) * (WIDTH // 16)))
to_pil(image_grid(fast.array, cols=2))
