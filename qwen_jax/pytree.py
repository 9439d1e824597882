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
