"""The declarative map between diffusers `AutoencoderKLQwenImage` keys and the Flax VAE tree.

Module paths are the same on both sides (see `qwen_jax.models.vae`) except that `resample.1`
is `resample_1`. Per tensor:
  <conv>.weight (O, I, 3|1, k, k)  -> <conv>.kernel  "conv3d_last": last time slice, HWIO
  <conv>.weight (O, I, k, k)       -> <conv>.kernel  "conv2d": resample.1, to_qkv, proj
  <norm>.gamma  (C, 1, 1[, 1])     -> <norm>.gamma   "squeeze": (C,)
  <module>.bias                    -> <module>.bias  "identity"
  *.time_conv.{weight,bias}        -> SKIP (temporal resampling, unused for single images)
Nothing is stacked. Whether a key exists in the model is decided by `plan_conversion` against
the Flax tree, so a syntactically mapped key that the config lacks is reported as unexpected.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qwen_jax.conversion.plan import SKIP, KeyMapping, KeyTable, Plan, assemble_leaf, plan_conversion
from qwen_jax.models.vae import VAEConfig, abstract_params, decoder_layout, encoder_layout
from qwen_jax.pytree import unflatten_params

# torch path segment <-> Flax path segment, where they differ
_TORCH_TO_FLAX = {"resample.1": "resample_1"}
# Convs whose torch weights are 4-D nn.Conv2d rather than causal Conv3d.
_CONV2D_MODULES = ("resample_1", "to_qkv", "proj")
_TENSORS = {"weight": "kernel", "bias": "bias", "gamma": "gamma"}


def time_conv_modules(cfg: VAEConfig) -> set[str]:
    """diffusers module names of the 3-D resamplers' `time_conv`s that `cfg` has."""
    enc = {f"encoder.down_blocks.{i}.time_conv" for i, (kind, _, _) in enumerate(encoder_layout(cfg))
           if kind == "downsample3d"}
    dec = {f"decoder.up_blocks.{i}.upsamplers.0.time_conv" for i, (_, _, mode) in enumerate(decoder_layout(cfg))
           if mode == "upsample3d"}
    return enc | dec


def map_key(torch_key: str, time_convs: set[str] | None = None) -> KeyMapping | str | None:
    """The Flax location of a diffusers key, SKIP for a `time_conv` tensor, None when not a VAE key.

    With `time_convs` (from `time_conv_modules`), only the time_convs of that config are skipped;
    any other `time_conv` key is reported as unexpected instead of being silently dropped.
    """
    module, _, tensor = torch_key.rpartition(".")
    if tensor not in _TENSORS or not module:
        return None
    if module.endswith("time_conv") and tensor in ("weight", "bias"):
        return SKIP if time_convs is None or module in time_convs else None
    for torch_name, flax_name in _TORCH_TO_FLAX.items():
        module = module.replace(torch_name, flax_name)
    path = tuple(module.split(".")) + (_TENSORS[tensor],)
    if tensor == "gamma":
        transform = "squeeze"
    elif tensor == "bias":
        transform = "identity"
    else:
        transform = "conv2d" if path[-2] in _CONV2D_MODULES else "conv3d_last"
    return KeyMapping(torch_key, path, None, transform)


def torch_key(flax_path: tuple[str, ...], layer: int | None = None) -> str:
    """The diffusers key of one Flax leaf (`layer` is unused: nothing is stacked)."""
    module = ".".join(flax_path[:-1])
    for torch_name, flax_name in _TORCH_TO_FLAX.items():
        module = module.replace(flax_name, torch_name)
    tensor = {v: k for k, v in _TENSORS.items()}[flax_path[-1]]
    return f"{module}.{tensor}"


def key_table(cfg: VAEConfig | None = None) -> KeyTable:
    """The VAE's KeyTable; with `cfg`, only that architecture's `time_conv` tensors are skipped."""
    time_convs = time_conv_modules(cfg) if cfg is not None else None
    return KeyTable(map_key=lambda key: map_key(key, time_convs), slot_name=torch_key)


TABLE = key_table()


def plan_vae(cfg: VAEConfig, shapes: Mapping[str, tuple[int, ...]]) -> Plan:
    """Matches source keys {key: torch shape} to the Flax tree of `cfg`; raises on any mismatch."""
    table = key_table(cfg)
    expected = {path: tuple(s.shape) for path, s in abstract_params(cfg).items()}
    return plan_conversion(expected, shapes, table)


def vae_state_dict_to_params(cfg: VAEConfig, state_dict: Mapping[str, np.ndarray], dtype=None) -> dict:
    """In-memory conversion of a {diffusers key: numpy array} dict to the nested Flax params
    (string keys; `nnx.update` them into an `AutoencoderKLQwenImage`)."""
    plan = plan_vae(cfg, {k: tuple(v.shape) for k, v in state_dict.items()})
    return unflatten_params({leaf.path: assemble_leaf(leaf, state_dict.__getitem__, dtype) for leaf in plan.leaves})
