"""The summary tree of a checkpoint, from its skeleton and header alone (pure, no torch, no I/O).

What :func:`torchkeep.inspect` returns under ``tree``: one node per entry with its kind
(``module``, ``optimizer``, ``scheduler``, ``rng_state``, ``dict``, ``int``, ...), tensor counts,
elements and bytes (each stored tensor counted once per subtree), and dotted module names grouped
into submodules.

Example:
    >>> from torchkeep.format.header import TensorSpec
    >>> specs = {"w": TensorSpec("w", "F32", (2, 3), 0, 24)}
    >>> nodes, params = summarise({"d": {"w": {"T": "w"}, "step": 5}}, specs, None)
    >>> [(n["name"], n["kind"], n["elements"]) for n in nodes], params
    ([('w', 'tensor', 6), ('step', 'int', 0)], None)
"""

from __future__ import annotations

import json
import math
from typing import Any

from torchkeep.format.dtypes import ST_TO_NAME
from torchkeep.format.header import TensorSpec

__all__ = ["summarise"]

_DTYPE_NAMES = ST_TO_NAME


def _stateful_kind(cls: str, value: Any) -> str:
    if _is_module_sd(value):
        return "module"
    if "lr_scheduler" in cls or cls.endswith("SWALR"):
        return "scheduler"
    if cls.startswith("torch.optim.") or (
        isinstance(value, dict) and isinstance(value.get("d"), dict) and {"state", "param_groups"} <= set(value["d"])
    ):
        return "optimizer"
    if cls.endswith("GradScaler"):
        return "grad_scaler"
    if cls == "torchkeep.rng.RNGState":
        return "rng_state"
    return "stateful"


def _is_module_sd(n: Any) -> bool:
    # module.state_dict() is an OrderedDict carrying ``_metadata``; flatten() keeps it as "m".
    return isinstance(n, dict) and "o" in n and "m" in n


def _key_label(k: Any) -> str:
    """A display name for a dict key node (ints, tuples, ... as Python would print them)."""
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, (bool, int, float)):
        return repr(k)
    if isinstance(k, dict) and "t" in k:
        inner = [_key_label(v) if not isinstance(v, str) else repr(v) for v in k["t"]]
        return "(" + ", ".join(inner) + ("," if len(inner) == 1 else "") + ")"
    if isinstance(k, dict) and "f" in k:
        return str(k["f"])
    return json.dumps(k)


class _Trie:
    __slots__ = ("children", "leaf")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.leaf: tuple[Any] | None = None


class _Summariser:
    """Turns skeleton nodes into summary nodes; counts each stored tensor once per subtree."""

    def __init__(self, specs: dict[str, TensorSpec], depth: int | None) -> None:
        self.specs = specs
        self.elements = {k: math.prod(s.shape) for k, s in specs.items()}
        self.depth = depth
        self.seen: set[str] = set()
        self.module_keys: set[str] | None = None  # stored tensors inside module state dicts

    def stats(self, node: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        node["tensors"] = len(keys)
        node["elements"] = sum(self.elements[k] for k in keys)
        node["bytes"] = sum(self.specs[k].nbytes for k in keys)
        return node

    def finish(
        self, node: dict[str, Any], children: list[tuple[dict[str, Any], set[str]]], level: int
    ) -> tuple[dict[str, Any], set[str]]:
        keys: set[str] = set().union(*(k for _, k in children))
        if len(keys) == sum(len(k) for _, k in children):  # disjoint (the usual case): add up
            node["tensors"] = len(keys)
            node["elements"] = sum(c["elements"] for c, _ in children)
            node["bytes"] = sum(c["bytes"] for c, _ in children)
        else:  # tied weights: count each stored tensor once
            self.stats(node, keys)
        if self.depth is not None and level >= self.depth:
            node["children_omitted"] = len(children)
        else:
            node["children"] = [c for c, _ in children]
        return node, keys

    def container(self, node: dict[str, Any], items: list[tuple[str, Any]], level: int):
        return self.finish(node, [self.node(name, child, level + 1) for name, child in items], level)

    def dotted(self, node: dict[str, Any], items: list[tuple[str, Any]], level: int):
        """Group dotted names (``encoder.layers.0.weight``) into nested nodes, one per prefix."""
        root = _Trie()
        for full, child in items:
            cur = root
            for part in full.split("."):
                cur = cur.children.setdefault(part, _Trie())
            cur.leaf = (child,)
        if node["kind"] != "module":
            return self._branch(node, root, "group", level)
        node, keys = self._branch(node, root, "submodule", level)
        self.module_keys = (self.module_keys or set()) | keys
        return node, keys

    def _branch(self, node: dict[str, Any], trie: _Trie, sub_kind: str, level: int):
        children = []
        if trie.leaf is not None:  # a name that is also a prefix of other names (only in foreign files)
            children.append(self.node("(self)", trie.leaf[0], level + 1))
        for part, sub in trie.children.items():
            if not sub.children:
                children.append(self.node(part, sub.leaf[0] if sub.leaf else None, level + 1))
            else:
                children.append(self._branch({"name": part, "kind": sub_kind}, sub, sub_kind, level + 1))
        return self.finish(node, children, level)

    def tensor(self, name: str, n: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        key = n.get("T")
        spec = self.specs.get(key) if isinstance(key, str) else None
        node: dict[str, Any] = {"name": name, "kind": "ndarray" if n.get("np") else "tensor", "key": key}
        if spec is None:
            node["missing"] = True  # the skeleton names a tensor the header lacks (damaged file)
            return self.stats(node, set()), set()
        view = n.get("v")
        shape = list(view[1]) if isinstance(view, list) and len(view) == 3 else list(spec.shape)
        node["dtype"] = _DTYPE_NAMES[spec.dtype]
        node["shape"] = shape
        if view is not None or key in self.seen:
            node["tied"] = True  # shares storage with another leaf (tied weights, a view): stored once
        self.seen.add(key)
        if "dev" in n:
            node["device"] = n["dev"]
        node["tensors"] = 1
        node["elements"] = self.elements[key]
        node["bytes"] = spec.nbytes
        return node, {key}

    def node(self, name: str, n: Any, level: int) -> tuple[dict[str, Any], set[str]]:
        if n is None or isinstance(n, (bool, int, float, str)):
            kind = "none" if n is None else type(n).__name__
            return {"name": name, "kind": kind, "value": n, "tensors": 0, "elements": 0, "bytes": 0}, set()
        if not isinstance(n, dict):
            return {"name": name, "kind": "unknown", "tensors": 0, "elements": 0, "bytes": 0}, set()
        if "V" in n:  # an everyday Python value (torchkeep.values): its kind, and its text when it has one
            value = n.get("v") if isinstance(n.get("v"), (str, int, float, bool)) else n.get("n")
            kind = str(n["V"]) if "c" not in n else f"{n['V']} {n['c']}"
            return {"name": name, "kind": kind, "value": value, "tensors": 0, "elements": 0, "bytes": 0}, set()
        if "T" in n:
            return self.tensor(name, n)
        if "S" in n:
            cls, v = str(n["S"]), n.get("v")
            kind = _stateful_kind(cls, v)
            if kind == "module":
                return self.dotted({"name": name, "kind": kind, "class": cls}, [(str(k), c) for k, c in v["o"]], level)
            inner, keys = self.node(name, v, level)
            node = {"name": name, "kind": kind, "class": cls}
            node.update((k, x) for k, x in inner.items() if k not in node)
            return node, keys
        if _is_module_sd(n):
            return self.dotted({"name": name, "kind": "module"}, [(_key_label(k), c) for k, c in n["o"]], level)
        if "d" in n and isinstance(n["d"], dict):
            return self.container({"name": name, "kind": "dict"}, list(n["d"].items()), level)
        if "D" in n or "o" in n:
            pairs = n.get("D", n.get("o")) or []
            return self.container({"name": name, "kind": "dict"}, [(_key_label(k), c) for k, c in pairs], level)
        if "l" in n or "t" in n:
            kind = "list" if "l" in n else "tuple"
            items = [(str(i), c) for i, c in enumerate(n[kind[0]])]
            return self.container({"name": name, "kind": kind}, items, level)
        if "G" in n:
            s = n.get("s")
            keys = {s["T"]} if isinstance(s, dict) and s.get("T") in self.specs else set()
            node = {"name": name, "kind": "generator", "device": n["G"]}
            return self.stats(node, keys), keys
        if "f" in n:
            kind, value = "float", n["f"]  # nan / inf / -inf, as text (JSON has no nan)
        elif "dt" in n:
            kind, value = "dtype", f"torch.{n['dt']}"
        elif "sz" in n:
            kind, value = "size", n["sz"]
        elif "dev" in n:
            kind, value = "device", n["dev"]
        elif "ns" in n:
            kind, value = f"numpy.{n['ns']}", n.get("v")
        else:
            kind, value = "unknown", None
        leaf = {"name": name, "kind": kind, "value": value, "tensors": 0, "elements": 0, "bytes": 0}
        return leaf, set()


def summarise(
    skeleton: Any, specs: dict[str, TensorSpec], depth: int | None
) -> tuple[list[dict[str, Any]], int | None]:
    """Top-level summary nodes, and the element count held in module state dicts (None: no module)."""
    s = _Summariser(specs, depth)
    if skeleton is None:  # plain safetensors: group the flat names by their dots, as module names are
        root, _ = s.dotted({"name": "", "kind": "group"}, [(k, {"T": k}) for k in specs], 0)
    elif isinstance(skeleton, dict) and isinstance(skeleton.get("d"), dict):
        root, _ = s.container({"name": "", "kind": "dict"}, list(skeleton["d"].items()), 0)
    else:
        node, _ = s.node("(root)", skeleton, 1)
        root = {"children": [node]}
    params = None if s.module_keys is None else sum(s.elements[k] for k in s.module_keys)
    return root.get("children", []), params
