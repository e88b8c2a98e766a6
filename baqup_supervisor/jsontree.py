"""Walking JSON-like values without recursion.

Values from outside (a control line, SDK metadata, a component's `error`) can be
nested as deep as the JSON parser allows, deeper than the interpreter's recursion
limit. `transform` copies such a value, mapping every leaf and key, with an explicit
stack; a subtree deeper than `MAX_DEPTH` is replaced by `TOO_DEEP` (the encoders,
which recurse, could not write it anyway). Pure: no imports from the package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

MAX_DEPTH = 500
TOO_DEEP = "[unencodable: nested too deeply]"


def transform(
    value: Any,
    leaf: Callable[[Any], Any],
    key: Callable[[Any], Any] = lambda k: k,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """A copy of `value` (mappings become dicts, tuples lists) with `leaf` applied to
    every non-container and `key` to every mapping key."""
    if not isinstance(value, (Mapping, list, tuple)):
        return leaf(value)
    root: Any = {} if isinstance(value, Mapping) else []
    stack: list[tuple[Any, Any, int]] = [(value, root, 1)]
    while stack:
        source, target, depth = stack.pop()
        items = source.items() if isinstance(source, Mapping) else enumerate(source)
        for name, item in items:
            if isinstance(item, (Mapping, list, tuple)):
                if depth >= max_depth:
                    child: Any = TOO_DEEP
                else:
                    child = {} if isinstance(item, Mapping) else []
                    stack.append((item, child, depth + 1))
            else:
                child = leaf(item)
            if isinstance(target, dict):
                target[key(name)] = child
            else:
                target.append(child)
    return root
