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


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()


def _index_problem(keys: list[str]) -> str | None:
    """For a level whose keys are all digits (a list's positions): the first key that is not
    one of exactly ``"0" .. "n-1"`` (``"00"``, a gap), or ``None`` if they are."""
    want = {str(i) for i in range(len(keys))}
    return next((k for k in sorted(keys, key=lambda k: (len(k), k)) if k not in want), None)


def _check_key(key: Any, where: str) -> None:
    if not isinstance(key, str):
        raise TypeError(
            f"tree keys must be strings, got {key!r} ({type(key).__name__}) "
            f"at {where or '<root>'!r}"
        )
    if not key or "." in key:
        raise ValueError(
            f"tree keys must be non-empty strings without '.', got {key!r} at {where or '<root>'!r}"
        )


def flatten(tree: Tree) -> dict[str, torch.Tensor]:
    """``{dotted.name: leaf}`` in the tree's order.

    Refused, so that :func:`unflatten` inverts every result: keys that are not strings,
    empty or contain ``"."``, and a dict whose keys are all digits but not exactly
    ``"0" .. "n-1"`` (unflatten reads such a level as a list).
    """
    out: dict[str, torch.Tensor] = {}

    def visit(node: Tree, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k in node:
                _check_key(k, prefix[:-1])
            if node and all(_is_index(k) for k in node):
                bad = _index_problem(list(node))
                if bad is not None:
                    raise ValueError(
                        f"tree key {prefix + bad!r} and its siblings are all digits but not "
                        f"exactly 0..{len(node) - 1}: such a level can only be a list"
                    )
            for k, v in node.items():
                visit(v, f"{prefix}{k}.")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{prefix}{i}.")
        else:
            out[prefix[:-1]] = node

    visit(tree, "")
    return out


def _first_name(subtree: dict[str, Any], prefix: str) -> str:
    while isinstance(subtree, dict):
        key = next(iter(subtree))
        prefix, subtree = f"{prefix}.{key}", subtree[key]
    return prefix


def unflatten(flat: Mapping[str, torch.Tensor]) -> Tree:
    """Inverse of :func:`flatten`: nested dicts, with ``0..n-1``-keyed levels as lists.

    Refused with the offending name in the message: non-string names, empty names or
    segments (``"a..b"``), a level of list positions that are not exactly ``0..n-1``
    (``"a.0"``, ``"a.2"``), and a name that is both a leaf and a prefix (``"a"``, ``"a.b"``).

    Example: ``unflatten({"b.0.w": w0, "b.1.w": w1}) == {"b": [{"w": w0}, {"w": w1}]}``.
    """
    root: dict[str, Any] = {}
    for name, leaf in flat.items():
        if not isinstance(name, str):
            raise TypeError(f"names must be dotted strings, got {name!r} ({type(name).__name__})")
        if not name:
            raise ValueError("name '' is empty: names look like 'a.0.b'")
        parts = name.split(".")
        if "" in parts:
            raise ValueError(f"name {name!r} has an empty segment: names look like 'a.0.b'")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"name {name!r} nests under a leaf {'.'.join(parts[: i + 1])!r}: a name "
                    "cannot be both a leaf and a prefix"
                )
            node = child
        if parts[-1] in node:  # a subtree: an earlier name continued this one
            raise ValueError(
                f"name {name!r} is both a leaf and a prefix of "
                f"{_first_name(node[parts[-1]], name)!r}: it collides with a subtree of that name"
            )
        node[parts[-1]] = leaf

    def listify(node: Any, prefix: str) -> Any:
        if not isinstance(node, dict):
            return node
        items = {k: listify(v, f"{prefix}{k}.") for k, v in node.items()}
        if not (items and all(_is_index(k) for k in items)):
            return items
        bad = _index_problem(list(items))
        if bad is not None:
            positions = sorted(items, key=lambda k: (len(k), k))
            raise ValueError(
                f"name {prefix + bad!r} is a list position but the positions under "
                f"{prefix[:-1] or '<root>'!r} are {positions}, not exactly 0..{len(items) - 1}"
            )
        return [items[str(i)] for i in range(len(items))]

    return listify(root, "")


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
