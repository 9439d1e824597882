"""Qwen-Image prompt encoding: what `QwenImagePipeline.encode_prompt` computes, on the JAX encoder.

Steps (diffusers `_get_qwen_prompt_embeds` + `encode_prompt`):
  1. wrap each prompt in the chat template and tokenize the batch (max_length 1024 + 34,
     truncation, padding to the longest);
  2. run the text encoder and take its last hidden state (after the final norm);
  3. per sample keep the real tokens only, drop the first 34 (the template's system turn and
     `<|im_start|>user\\n`; the 5 trailing template tokens stay), right-pad with zeros to the
     batch's longest and truncate to `max_sequence_length`.

Differences from diffusers, on purpose:
  * token arrays are right-padded further up to a multiple of `bucket`, so a jitted encoder
    compiles once per bucket instead of once per prompt length. The extra columns are masked
    padding after every real token: with causal attention and positions `arange(L)` they
    cannot change any real token's state, whichever side the tokenizer pads on;
  * a 0/1 mask is always returned (diffusers returns None when it is all ones).

Layouts: token ids / masks (B, L) int32; prompt_embeds (B, T, D); prompt mask (B, T) int32,
T = min(longest kept length, max_sequence_length).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP_IDX = 34  # tokens of the template up to and including "user\n"
TOKENIZER_MAX_LENGTH = 1024
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default (encode_prompt's is 1024)
DEFAULT_BUCKET = 64

Encoder = Callable[[jax.Array, jax.Array], jax.Array]  # (ids (B, L), mask (B, L)) -> (B, L, D)


def format_prompts(prompts: str | Sequence[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return [template.format(p) for p in prompts]


def tokenize_prompts(tokenizer, prompts: str | Sequence[str],
                     drop_idx: int = DROP_IDX) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, L) int32, exactly as the pipeline tokenizes."""
    tokens = tokenizer(format_prompts(prompts), max_length=TOKENIZER_MAX_LENGTH + drop_idx, padding=True,
                       truncation=True, return_tensors="np")
    return np.asarray(tokens["input_ids"], np.int32), np.asarray(tokens["attention_mask"], np.int32)


def pad_to_bucket(ids: np.ndarray, mask: np.ndarray, bucket: int = DEFAULT_BUCKET, pad_id: int = 0):
    """Right-pads (B, L) ids (with `pad_id`) and mask (with 0) to a multiple of `bucket` columns."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    extra = -ids.shape[1] % bucket
    return (np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id),
            np.pad(mask, ((0, 0), (0, extra)), constant_values=0))


def prompt_token_indices(mask: np.ndarray, drop_idx: int = DROP_IDX,
                         max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Where each kept token sits in the encoder output, and the 0/1 mask of the result.

    mask (B, L) 0/1 -> (index (B, T) int32, out_mask (B, T) int32): row b of the result takes
    the real tokens of sample b from the (drop_idx+1)-th on, in order, left-aligned; unused
    slots point at position 0 and are masked. Works for padding on either side.
    """
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
    real = [np.flatnonzero(row)[drop_idx:] for row in np.asarray(mask)]
    length = min(max((len(r) for r in real), default=0), max_sequence_length)
    index = np.zeros((len(real), length), np.int32)
    out_mask = np.zeros((len(real), length), np.int32)
    for b, r in enumerate(real):
        r = r[:length]
        index[b, : len(r)] = r
        out_mask[b, : len(r)] = 1
    return index, out_mask


def gather_prompt_embeds(hidden: jax.Array, index: np.ndarray, out_mask: np.ndarray) -> jax.Array:
    """hidden (B, L, D), index/out_mask (B, T) -> (B, T, D) with exact zeros in masked slots."""
    picked = jnp.take_along_axis(hidden, jnp.asarray(index)[..., None], axis=1)
    return jnp.where(jnp.asarray(out_mask, bool)[..., None], picked, jnp.zeros((), hidden.dtype))


def encode_prompts(
    prompts: str | Sequence[str],
    tokenizer,
    encoder: Encoder,
    *,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    bucket: int = DEFAULT_BUCKET,
    num_images_per_prompt: int = 1,
    drop_idx: int = DROP_IDX,
) -> tuple[jax.Array, jax.Array]:
    """(prompt_embeds (B*n, T, D), mask (B*n, T) int32), as `pipe.encode_prompt(prompts, ...)`.

    tokenizer: a transformers Qwen2 tokenizer. encoder: `(ids, mask) -> last hidden state`, e.g.
    `jit_encoder(model)`; it sees (B, L_bucket) int32 arrays. The mask is never None.
    """
    ids, mask = tokenize_prompts(tokenizer, prompts, drop_idx)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_to_bucket(ids, mask, bucket, pad_id)
    hidden = encoder(jnp.asarray(ids), jnp.asarray(mask))
    index, out_mask = prompt_token_indices(mask, drop_idx, max_sequence_length)
    embeds = gather_prompt_embeds(hidden, index, out_mask)
    out_mask = jnp.asarray(out_mask)
    if num_images_per_prompt > 1:  # each prompt's copies next to each other, as diffusers orders them
        embeds = jnp.repeat(embeds, num_images_per_prompt, axis=0)
        out_mask = jnp.repeat(out_mask, num_images_per_prompt, axis=0)
    return embeds, out_mask


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def jit_encoder(model: nnx.Module) -> Encoder:
    """A jitted `(ids, mask) -> hidden` over a snapshot of `model`'s current parameters.

    Parameters are arguments, not baked-in constants; compilations are shared by every model of
    the same structure (one per (batch, bucket) shape).
    """
    graphdef, state = nnx.split(model)
    return functools.partial(_forward, graphdef, state)
