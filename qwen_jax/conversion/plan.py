"""Strict matching of checkpoint tensors (by key) to Flax parameters (by path), for any component.

A component (transformer, VAE, text encoder) supplies a `KeyTable`: a function that says where
each source key lives in its Flax tree (or that it is deliberately skipped), and which top-level
subtrees are stacked on a leading layer axis. `plan_conversion` checks that every source key
is used once, every Flax slot is filled once and every shape agrees, and lists every problem
by name in one error. `assemble_leaf` then builds one Flax array at a time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np

from qwen_jax.conversion.errors import ConversionError

# name -> (torch array -> Flax array, torch shape -> Flax shape, Flax shape -> torch shape or None)
TRANSFORMS: dict[str, tuple[Callable, Callable, Callable | None]] = {
    "identity": (lambda a: a, lambda s: s, lambda s: s),
    # torch Linear weight (out, in) <-> Flax kernel (in, out)
    "linear": (lambda a: a.T, lambda s: s[::-1], lambda s: s[::-1]),
    # Conv2d (O, I, kh, kw) -> HWIO
    "conv2d": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[2], s[3], s[1], s[0]),
               lambda s: (s[3], s[2], s[0], s[1])),
    # causal Conv3d (O, I, kt, kh, kw) on a single frame: only the last time slice sees data -> HWIO
    "conv3d_last": (lambda a: a[:, :, -1].transpose(2, 3, 1, 0), lambda s: (s[3], s[4], s[1], s[0]), None),
    # RMS gammas stored as (C, 1, 1[, 1]) -> (C,)
    "squeeze": (lambda a: a.reshape(-1), lambda s: (math.prod(s),), None),
}


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """Where one source tensor lives in the Flax tree."""

    torch_key: str
    flax_path: tuple[str, ...]
    layer: int | None = None  # index on the stacked layer axis; None for unstacked parameters
    transform: str = "identity"

    def flax_shape(self, torch_shape) -> tuple[int, ...]:
        return tuple(TRANSFORMS[self.transform][1](tuple(torch_shape)))

    def to_flax(self, value: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.transform][0](value)


SKIP = "skip"  # returned by a key table for tensors that are known but not used (e.g. a vision tower)


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """A component's key map: `map_key(key)` -> KeyMapping, SKIP, or None (not part of the model)."""

    map_key: Callable[[str], KeyMapping | str | None]
    slot_name: Callable[[tuple[str, ...], int | None], str]  # source key expected for a Flax slot
    stacked: tuple[str, ...] = ()  # top-level names whose leaves carry a leading layer axis
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)  # key -> what it marks


@dataclasses.dataclass
class LeafPlan:
    """One Flax parameter and the source tensors that fill it (one per layer when stacked)."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    stacked: bool
    sources: dict[int | None, KeyMapping]


@dataclasses.dataclass
class Plan:
    leaves: list[LeafPlan]
    skipped: list[str]  # source keys deliberately left out


def _listing(label: str, items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{len(items)} {label} ({shown})"


def plan_conversion(
    expected: Mapping[tuple[str, ...], tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]], table: KeyTable
) -> Plan:
    """Matches source {key: shape} to the expected Flax {path: shape}; raises on any mismatch."""
    leaves = {p: LeafPlan(p, tuple(s), p[0] in table.stacked, {}) for p, s in expected.items()}
    unexpected, wrong, skipped, twice = [], [], [], []
    for key, shape in sorted(shapes.items()):
        if key in table.unsupported:
            raise ConversionError(f"tensor {key!r} marks {table.unsupported[key]}, which is not supported")
        m = table.map_key(key)
        if m == SKIP:
            skipped.append(key)
            continue
        leaf = leaves.get(m.flax_path) if m else None
        if leaf is None or (m.layer is not None) != leaf.stacked or (leaf.stacked and m.layer >= leaf.shape[0]):
            unexpected.append(key)
            continue
        want = leaf.shape[1:] if leaf.stacked else leaf.shape
        try:
            got = m.flax_shape(shape)
        except IndexError:  # a tensor of the wrong rank for its transform
            got = None
        if got != want:
            inverse = TRANSFORMS[m.transform][2]
            wrong.append(f"{key} {tuple(shape)} vs expected {tuple(inverse(want)) if inverse else want}")
        if m.layer in leaf.sources:  # e.g. a file carrying two namings of one tensor
            twice.append(f"{leaf.sources[m.layer].torch_key} / {key}")
        leaf.sources[m.layer] = m  # present, even if misshapen: not "missing"
    missing = [table.slot_name(leaf.path, layer)
               for leaf in leaves.values()
               for layer in (range(leaf.shape[0]) if leaf.stacked else [None]) if layer not in leaf.sources]
    if missing or unexpected or wrong or twice:
        parts = [_listing(label, items) for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong),
                  ("filled twice", twice)) if items]
        raise ConversionError("checkpoint does not match the model config: " + "; ".join(parts))
    return Plan(list(leaves.values()), skipped)


def assemble_leaf(leaf: LeafPlan, get: Callable[[str], np.ndarray], dtype=None) -> np.ndarray:
    """The Flax array of one leaf, built from its source tensors (transformed, stacked, cast)."""
    out = None
    for layer, m in leaf.sources.items():
        value = m.to_flax(get(m.torch_key))
        if out is None:
            out = np.empty(leaf.shape, dtype or value.dtype)
        if layer is None:
            out[...] = value
        else:
            out[layer] = value
    return out
