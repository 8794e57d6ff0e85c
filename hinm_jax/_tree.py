"""Pytree helpers shared by the public transforms: readable paths, path-aware maps."""

from __future__ import annotations

import jax


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath) -> str:
    """``("Dense_0", "kernel")``-style key paths as ``"Dense_0/kernel"``.

    nnx ``Variable`` wrappers (a trailing ``.value``) are left out of the name.
    """
    parts = [_key_str(k) for k in keypath]
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def _paths(tree, is_leaf=None):
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def map_with_path(fn, tree, *rest, is_leaf=None, what: str = "tree"):
    """``fn(path, leaf, *matching)`` over ``tree``'s leaves; ``rest`` must have ``tree``'s
    structure as a prefix. A mismatch raises a ``ValueError`` naming the first path
    that differs."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    others = []
    for other in rest:
        try:
            others.append(treedef.flatten_up_to(other))
        except (ValueError, TypeError, KeyError) as e:
            mine, theirs = _paths(tree, is_leaf), _paths(other)
            not_in_other = [p for p in mine if not any(t == p or t.startswith(p + "/") for t in theirs)]
            not_in_mine = [t for t in theirs if not any(t == p or t.startswith(p + "/") for p in mine)]
            if not_in_other:
                detail = f"{not_in_other[:3]} only in {what}"
            else:
                detail = f"{not_in_mine[:3]} missing in {what}"
            raise ValueError(f"{what} and params have different structures ({detail}): {e}") from None
    out = [fn(path_str(p), leaf, *(o[i] for o in others)) for i, (p, leaf) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)
