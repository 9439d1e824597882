"""Parameter trees as flat {path tuple: leaf} dicts and back (paths as in the NNX module)."""

from __future__ import annotations


def flatten_params(tree) -> dict[tuple[str, ...], object]:
    """{path tuple: leaf} of a nested dict, or of an nnx.State (through `nnx.to_pure_dict`)."""
    from flax import nnx

    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            flat[prefix] = node

    walk(tree, ())
    return flat


def unflatten_params(flat: dict[tuple[str, ...], object]) -> dict:
    """The nested dict of a {path tuple: leaf} dict."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def fill_abstract(abstract, params):
    """The module `abstract` (from nnx.eval_shape) holding `params` (a nested dict of arrays).

    No random initialisation runs. Every leaf must be given with the abstract shape; values
    are cast to the abstract dtypes.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    want, got = flatten_params(state), flatten_params(params)
    if set(got) != set(want):
        raise ValueError(f"params do not match the model: missing {sorted(set(want) - set(got))[:4]}, "
                         f"unexpected {sorted(set(got) - set(want))[:4]}")
    bad = [p for p in want if tuple(np.shape(got[p])) != tuple(want[p].shape)]
    if bad:
        raise ValueError(f"params of the wrong shape: {bad[:4]}")
    nnx.replace_by_pure_dict(state, unflatten_params({p: jnp.asarray(got[p], want[p].dtype) for p in want}))
    return nnx.merge(graphdef, state)
