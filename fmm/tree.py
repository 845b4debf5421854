"""Parameter pytrees: nested ``dict[str, ...]`` and ``list`` of tensors.

Dotted names follow ``nn.Module.state_dict`` so a flattened tree reads like one:
``{"image.blocks.3.attn.qkv.weight": Tensor[2304, 768], ...}``; list positions become
numbers. ``unflatten`` turns a level whose keys are exactly ``0..n-1`` back into a list.

Example::

    flat = fmm.tree.flatten(params)
    params2 = fmm.tree.unflatten(flat)
    fmm.tree.count(params)             # number of scalars
    ens = fmm.tree.stack([p1, p2, p3]) # leaves gain a leading [3] axis, ready for vmap
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "cast",
    "count",
    "flatten",
    "leaves",
    "map",
    "map_with_path",
    "path_str",
    "stack",
    "unflatten",
    "unstack",
]

Tree = Any


def path_str(keypath: Iterable[Any]) -> str:
    """The dotted name of a ``torch.utils._pytree`` key path: ``("blocks", 3, "w") -> "blocks.3.w"``."""
    parts = []
    for entry in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def flatten(tree: Tree) -> dict[str, torch.Tensor]:
    """``{dotted.name: leaf}`` in the tree's order. Keys containing ``"."`` are refused."""
    out: dict[str, torch.Tensor] = {}

    def visit(node: Tree, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if not isinstance(k, str) or "." in k or not k:
                    raise ValueError(f"tree keys must be non-empty strings without '.', got {k!r}")
                visit(v, f"{prefix}{k}.")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{prefix}{i}.")
        else:
            out[prefix[:-1]] = node

    visit(tree, "")
    return out


def unflatten(flat: Mapping[str, torch.Tensor]) -> Tree:
    """Inverse of :func:`flatten`: nested dicts, with ``0..n-1``-keyed levels as lists."""
    root: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split(".")
        node = root
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"name {name!r} nests under a leaf {part!r}")
            node = child
        if last in node:
            raise ValueError(f"name {name!r} collides with a subtree of the same name")
        node[last] = leaf

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        items = {k: listify(v) for k, v in node.items()}
        if items and all(k.isdigit() for k in items):
            idx = sorted(int(k) for k in items)
            if idx == list(range(len(idx))):
                return [items[str(i)] for i in idx]
        return items

    return listify(root)


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The leaves in flatten order."""
    return pytree.tree_leaves(tree)


def map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leafwise over one or more trees of the same structure."""
    return pytree.tree_map(fn, tree, *rest)


def map_with_path(fn: Callable[[str, torch.Tensor], Any], tree: Tree) -> Tree:
    """Apply ``fn(dotted_name, leaf)`` to every leaf, e.g. to pick leaves by name."""
    return pytree.tree_map_with_path(lambda kp, leaf: fn(path_str(kp), leaf), tree)


def stack(trees: list[Tree]) -> Tree:
    """Stack same-structured trees along a new leading axis: leaves ``[n, ...]``.

    The result maps with ``torch.func.vmap`` as an ensemble of ``n`` models.
    """
    if not trees:
        raise ValueError("stack needs at least one tree")
    return pytree.tree_map(lambda *xs: torch.stack(xs), *trees)


def unstack(tree: Tree) -> list[Tree]:
    """Inverse of :func:`stack`: split leaves ``[n, ...]`` into ``n`` trees."""
    flat, spec = pytree.tree_flatten(tree)
    if not flat:
        return []
    n = flat[0].shape[0]
    if any(leaf.shape[:1] != (n,) for leaf in flat):
        raise ValueError("unstack needs every leaf to share the same leading axis size")
    return [pytree.tree_unflatten([leaf[i] for leaf in flat], spec) for i in range(n)]


def count(tree: Tree) -> int:
    """Total number of scalars in the tree's leaves."""
    return sum(leaf.numel() for leaf in leaves(tree))


def cast(tree: Tree, dtype: torch.dtype) -> Tree:
    """Cast floating-point leaves to ``dtype``; integer and bool leaves stay as they are."""
    return map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)
