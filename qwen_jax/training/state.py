"""The trained model as pytrees: what is optimised, what stays frozen, and where each lives.

One transformer definition (`graphdef`) serves every parameter tree. A model is split into
  trainable  the LoRA factors (LoRA training) or every parameter (full training),
  frozen     the rest (the base weights under LoRA; empty otherwise),
both as nested dicts of arrays (`nnx.to_pure_dict` layout), so that several models (teacher,
student, fake score) can share one frozen base, and jitted steps take them as arguments.

The train state is a plain dict, the unit of checkpointing and donation:
  {"step": int32 scalar, "params": trainable, "opt_state": optax state, "ema": trainable copy (optional)}
Every leaf has a NamedSharding: parameters by the logical-axis rules of `qwen_jax.sharding`,
optimizer moments and EMA like the parameter they track, scalars replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from qwen_jax import sharding as sharding_lib
from qwen_jax.pytree import flatten_params, unflatten_params


def split_trainable(model: nnx.Module, lora: bool) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, trainable, frozen) pure-dict trees of `model`'s parameters."""
    if lora:
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, nnx.Param)
        return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    graphdef, trainable = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(trainable), {}


def merge_model(graphdef: nnx.GraphDef, trainable: dict, frozen: dict) -> nnx.Module:
    """The module holding `trainable` and `frozen` (inside jit: a traced view, no copies)."""
    return nnx.merge(graphdef, nnx.State(trainable), nnx.State(frozen))


def merge_trees(a: dict, b: dict) -> dict:
    """The union of two disjoint nested dicts (a LoRA tree and its base, for one full state)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def tree_shardings(params: dict, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES) -> dict:
    """NamedSharding per parameter of a pure-dict tree, by the logical-axis rules."""
    flat = flatten_params(params)
    return unflatten_params(sharding_lib.param_shardings({p: v.shape for p, v in flat.items()}, mesh, rules))


def opt_state_shardings(tx: optax.GradientTransformation, params: dict, param_sh: dict, mesh: Mesh):
    """Optimizer-state shardings: moments follow their parameter, counters are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    repl = sharding_lib.replicated(mesh)
    return optax.tree_map_params(tx, lambda _, sh: sh, abstract, param_sh,
                                 transform_non_params=lambda _: repl)


def state_shardings(tx, params: dict, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES, ema: bool = False) -> dict:
    param_sh = tree_shardings(params, mesh, rules)
    out = {"step": sharding_lib.replicated(mesh), "params": param_sh,
           "opt_state": opt_state_shardings(tx, params, param_sh, mesh)}
    if ema:
        out["ema"] = param_sh
    return out


def _init_state(tx, params: dict, ema: bool) -> dict:
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def create_train_state(tx, params: dict, shardings: dict) -> dict:
    """A fresh train state (step 0) from trainable `params`, every leaf in its sharding."""
    init = jax.jit(lambda p: _init_state(tx, p, "ema" in shardings), in_shardings=(shardings["params"],),
                   out_shardings=shardings)
    return init(params)


def abstract_train_state(tx, params: dict, shardings: dict) -> dict:
    """The train state as ShapeDtypeStructs with shardings: the target to restore a checkpoint into."""
    shapes = jax.eval_shape(lambda p: _init_state(tx, p, "ema" in shardings), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
