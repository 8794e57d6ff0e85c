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

    nnx ``Variable`` wrappers (a trailing ``.value``) are left out of the name. Keys are
    written as they are (a ``"/"`` inside a key is not escaped, so paths stay what
    regexes and users expect); :func:`flatten_with_paths` refuses two leaves with the
    same path.
    """
    parts = [_key_str(k) for k in keypath]
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def flatten_with_paths(tree, is_leaf=None, what: str = "params") -> list:
    """``[(path, leaf)]`` of ``tree`` with :func:`path_str` paths, which must be unique.

    A dict key may contain ``"/"`` (``{"a/b": {"w": ...}}`` is ``"a/b/w"``), but two leaves
    with the same path string (``{"a/b": {"w": x}, "a": {"b": {"w": y}}}``) would be
    confused by everything that selects or looks up leaves by path (``where=``, per-path
    patterns, ``score=``), so they raise a ``ValueError`` naming both key paths.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    seen = {}
    out = []
    for keypath, leaf in leaves:
        path = path_str(keypath)
        if path in seen:
            raise ValueError(
                f"{path}: two leaves of {what} have this path, {seen[path]} and "
                f"{jax.tree_util.keystr(keypath)}: a key containing '/' collides with nested keys; "
                "rename one of them"
            )
        seen[path] = jax.tree_util.keystr(keypath)
        out.append((path, leaf))
    return out


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
