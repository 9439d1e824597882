"""Logical axis names for every parameter, and the rules that place them on a device mesh.

Parameters are named by *logical* axes (maxtext style); a rule table maps each logical axis to
a mesh axis (or None = replicated). A dimension that the mesh axis does not divide, or a mesh
axis absent from the mesh or already used by the same tensor, stays replicated, so one rule
table serves any mesh shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwen_jax.pytree import flatten_params, unflatten_params

# (regex on the "/"-joined parameter path, logical axes of one layer's tensor)
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)/kernel$", ("embed", "heads")),
    (r"attn/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)/bias$", ("heads",)),
    (r"attn/(to_out|to_add_out)/kernel$", ("heads", "embed")),
    (r"attn/(to_out|to_add_out)/bias$", ("embed",)),
    (r"attn/norm_\w+/scale$", ("head_dim",)),
    (r"mlp/proj_in/kernel$", ("embed", "mlp")),
    (r"mlp/proj_in/bias$", ("mlp",)),
    (r"mlp/proj_out/kernel$", ("mlp", "embed")),
    (r"mlp/proj_out/bias$", ("embed",)),
    (r"(img_mod|txt_mod|norm_out/linear)/kernel$", ("embed", "modulation")),
    (r"(img_mod|txt_mod|norm_out/linear)/bias$", ("modulation",)),
    (r"(img_in|timestep_embedder/linear_1)/kernel$", ("input", "embed")),
    (r"txt_in/kernel$", ("text_embed", "embed")),
    (r"txt_norm/scale$", ("text_embed",)),
    (r"timestep_embedder/linear_2/kernel$", ("embed_in", "embed")),
    (r"proj_out/kernel$", ("embed", "output")),
    (r"(img_in|txt_in|timestep_embedder/linear_\d)/bias$", ("embed",)),
    (r"proj_out/bias$", ("output",)),
)
STACKED_PREFIX = "transformer_blocks/"

MESH_AXES = ("data", "fsdp", "tensor")
SEQUENCE_AXIS = "sequence"  # optional: only in meshes made with sequence > 1
BATCH_AXES = ("data", "fsdp")  # the batch is split over every replica of the model

# FSDP over "fsdp" and tensor parallelism over "tensor"; the layer axis is never split.
# A tuple lists candidates in order: the first mesh axis of size > 1 that is free and divides
# the dimension. A candidate may itself be a tuple of mesh axes that split the dimension jointly
# (those of them present with size > 1): "embed" goes over ("fsdp", "sequence"), so weights are
# sharded over the devices that split an image's tokens too instead of being copied on each of
# them (on meshes without a "sequence" axis this is plain "fsdp"). LoRA factors ("lora_*": the kernel's axis on a factor whose other axis is the
# unsplit rank) fall back to "fsdp" when "tensor" is absent, or they would be replicated: rank 64
# on Qwen-Image is 0.6 B parameters, 2.2 GB fp32 on every device for each copy of the adapters.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("embed", (("fsdp", SEQUENCE_AXIS), "fsdp")),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("modulation", "tensor"),
    ("text_embed", (("fsdp", SEQUENCE_AXIS), "fsdp")),
    ("lora_embed", ("fsdp",)),
    ("lora_heads", ("tensor", "fsdp")),
    ("lora_mlp", ("tensor", "fsdp")),
    ("lora_modulation", ("tensor", "fsdp")),
)


# Activations (the image and text token streams between blocks): batch over every model replica;
# image tokens over "sequence" (sequence parallelism, `qwen_jax.models.sequence_parallel`); the
# short text stream is never split along its length.
ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_text_length", None),
    ("activation_heads", "tensor"),
    ("activation_embed", None),
)
TOKENS = ("activation_batch", "activation_length", "activation_embed")  # (B, L_img, D) image stream
TEXT_TOKENS = ("activation_batch", "activation_text_length", "activation_embed")  # (B, L_txt, D) text stream



def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None, *, sequence: int = 1) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all); one size may be -1 (fill).

    `sequence` != 1 adds a "sequence" axis (between "fsdp" and "tensor") that splits each image's
    tokens across devices (`qwen_jax.models.sequence_parallel`). With the default 1 the axis is
    left out: a mesh without it behaves as sequence size 1, and existing meshes keep their shape.
    Axes are Auto (GSPMD propagation; `with_sharding_constraint` works inside jit).
    """
    devices = list(jax.devices() if devices is None else devices)
    names = ("data", "fsdp", SEQUENCE_AXIS, "tensor") if sequence != 1 else MESH_AXES
    sizes = [data, fsdp, sequence, tensor] if sequence != 1 else [data, fsdp, tensor]
    asked = ", ".join(f"{n}={s}" for n, s in zip(names, sizes))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {asked}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into {asked}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, found {len(devices)}")
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at "/"-joined `path` (stacked blocks get "layers" first).

    LoRA factors follow their kernel: `lora_a` (in, r) keeps the kernel's input axis, `lora_b`
    (r, out) its output axis, as "lora_<axis>" (rules of their own); the rank axis is never split.
    """
    if path.endswith(("/lora_a", "/lora_b")):
        kernel = logical_axes(path.rsplit("/", 1)[0] + "/kernel", ndim)
        if path.endswith("a"):
            return kernel[:-2] + (f"lora_{kernel[-2]}", None)
        return kernel[:-2] + (None, f"lora_{kernel[-1]}")
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path):
            axes = (("layers",) + axes) if path.startswith(STACKED_PREFIX) else axes
            if len(axes) != ndim:
                raise ValueError(f"logical axes {axes} do not fit parameter {path} of rank {ndim}")
            return axes
    raise ValueError(f"no logical axes declared for parameter {path}")


def partition_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, str | None]]
) -> PartitionSpec:
    table = dict(rules)
    used, spec = set(), []
    for name, size in zip(axes, shape):
        rule = table.get(name) if name else None
        if isinstance(rule, tuple):  # candidates: the first that is present, > 1, free and divides
            rule = next((c for c in map(_present, rule, [mesh] * len(rule))
                         if c and not used & set(c) and size % math.prod(mesh.shape[a] for a in c) == 0), None)
            if rule:
                used.update(rule)
                spec.append(rule[0] if len(rule) == 1 else rule)
                continue
        if rule is None or rule not in mesh.shape or rule in used or size % mesh.shape[rule]:
            spec.append(None)
        else:
            used.add(rule)
            spec.append(rule)
    return PartitionSpec(*spec)


def _present(candidate: str | tuple[str, ...], mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of a rule candidate (one axis or a joint group) that exist with size > 1."""
    group = (candidate,) if isinstance(candidate, str) else candidate
    return tuple(a for a in group if mesh.shape.get(a, 1) > 1)


def param_shardings(
    flat_shapes: Mapping[tuple[str, ...], Sequence[int]], mesh: Mesh, rules=DEFAULT_RULES
) -> dict[tuple[str, ...], NamedSharding]:
    """NamedSharding for every parameter, given {path tuple: shape}."""
    out = {}
    for path, shape in flat_shapes.items():
        joined = "/".join(path)
        out[path] = NamedSharding(mesh, partition_spec(logical_axes(joined, len(shape)), shape, mesh, rules))
    return out


def place_state(state, mesh: Mesh, rules=DEFAULT_RULES):
    """An nnx.State of model parameters moved onto `mesh`, each parameter in its sharding."""
    pure = nnx.to_pure_dict(state)
    flat = flatten_params(pure)
    shardings = param_shardings({p: v.shape for p, v in flat.items()}, mesh, rules)
    placed = jax.device_put(pure, unflatten_params(shardings))
    state = jax.tree.map(lambda x: x, state)  # a copy to fill, leaving the caller's intact
    nnx.replace_by_pure_dict(state, placed)
    return state


def activation_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh, rules=ACTIVATION_RULES
) -> PartitionSpec:
    """The PartitionSpec of an activation by logical axes on `mesh` (a Mesh or AbstractMesh).

    Mesh axes absent from the mesh are dropped; a dimension the remaining axes do not divide
    stays unsplit.
    """
    table, spec = dict(rules), []
    for name, size in zip(logical, shape):
        axes = table.get(name) if name else None
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in mesh.shape)
        split = math.prod(mesh.shape[a] for a in axes)
        spec.append(axes if axes and size % split == 0 else None)
    return PartitionSpec(*spec)


def activation_sharding(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int],
                        rules=ACTIVATION_RULES) -> NamedSharding:
    """Where an activation (or a sampler input such as the latents) lives on `mesh`."""
    return NamedSharding(mesh, activation_spec(logical, shape, mesh, rules))


def constrain(x: jax.Array, logical: Sequence[str | None], rules=ACTIVATION_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical activation axes under the ambient mesh (`jax.set_mesh`).

    Without a mesh (plain single-device use) this is the identity; a dimension the mesh axes do
    not divide stays unsplit.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(logical, x.shape, mesh, rules))


def axis_size(name: str, mesh=None) -> int:
    """The size of mesh axis `name` (1 if absent) on `mesh`, default the ambient (`jax.set_mesh`) one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else dict(mesh.shape).get(name, 1)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def single_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this host's first device
