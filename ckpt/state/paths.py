"""Tree paths and the shape of an encoded tree, without torch.

A path names a node of a state tree: its keys, JSON-pointer escaped, joined by ``/``.
These helpers read encoded trees (manifests) only, so the command line and other
readers use them without importing torch; :mod:`ckpt.state.tree` re-exports them.
"""

from __future__ import annotations

from typing import Any


def escape(key: str) -> str:
    """One path component, JSON-pointer escaped so '/' in keys stays unambiguous."""
    return key.replace("~", "~0").replace("/", "~1")


def unescape(part: str) -> str:
    """One escaped path component back to the key it names (``~1`` is ``/``, ``~0`` is ``~``)."""
    return part.replace("~1", "/").replace("~0", "~")


def join(prefix: str, key: Any) -> str:
    part = escape(str(key))
    return f"{prefix}/{part}" if prefix else part


def dotted(path: str) -> str:
    """``model/0.weight`` -> ``model.0.weight``: a path as PyTorch names parameters."""
    return ".".join(unescape(p) for p in path.split("/"))


def children(node: Any) -> list[tuple[str, Any]] | None:
    """Named children of an encoded tree node, or None for a leaf value.

    A list (or tuple) of scalars is one leaf; a tagged value (``$tensor``, ``$float``...)
    is a leaf; mappings, ``$map`` pairs and other sequences have children.
    """
    if isinstance(node, list):
        if all(not isinstance(v, (dict, list)) for v in node):
            return None
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, dict):
        if "$map" in node and isinstance(node["$map"], list):
            return [(str(p[0]), p[1]) for p in node["$map"] if isinstance(p, list) and len(p) == 2]
        if "$tuple" in node and isinstance(node["$tuple"], list):
            return children(node["$tuple"])
        if any(isinstance(k, str) and k.startswith("$") for k in node):
            return None
        return list(node.items())
    return None


def tensor_paths(node: Any) -> list[str]:
    """Every tensor path referenced by an encoded tree, in tree order."""
    found: list[str] = []

    def walk(n: Any) -> None:
        if isinstance(n, list):
            for v in n:
                walk(v)
        elif isinstance(n, dict):
            if "$tensor" in n:
                found.append(str(n["$tensor"]))
            else:
                for v in n.values():
                    walk(v)

    walk(node)
    return found
