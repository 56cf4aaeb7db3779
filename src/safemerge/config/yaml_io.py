"""The one YAML loader for user configs (merge and optimize): safe, bounded, one-line errors.

``yaml.safe_load`` builds no objects from tags, but two inputs still hurt: aliases that expand
exponentially (a "billion laughs" bomb stays small in memory until something walks it — a JSON
dump, a pydantic copy — and then grows without bound), and very deep nesting (the composer
recurses once per level, so a few thousand levels overflow Python's stack). This loader counts
the *expanded* size of the node graph (memoised, so the count itself is cheap), refuses recursive
aliases and caps the nesting depth, before any Python object is constructed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from safemerge.errors import ConfigError
from safemerge.io.text import read_utf8

MAX_DEPTH = 64  # nesting levels; real merge/optimize configs use fewer than 10
MAX_EXPANDED_NODES = 200_000  # scalars + collections after alias expansion


class _DepthLimitedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer refuses nesting deeper than :data:`MAX_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML hook
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"YAML nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})",
                                  "flatten the configuration; merge configs need only a few levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Number of nodes ``node`` becomes once every alias is expanded (memoised per node)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ConfigError("YAML alias refers to itself (a recursive structure)", "remove the recursive alias")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, memo, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    active.discard(key)
    memo[key] = total
    return total


def load_yaml(text: str, source: str = "config") -> Any:
    """Parse one YAML document with :class:`yaml.SafeLoader` semantics, within the bounds above.

    Raises:
        ConfigError: invalid YAML (with line and column), too deep, or expanding past
            :data:`MAX_EXPANDED_NODES` nodes through aliases.
    """
    loader = _DepthLimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"{source}: YAML expands to more than {MAX_EXPANDED_NODES:,} values through aliases (an alias bomb?)",
                "write the configuration out without nested & / * aliases",
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}",
                          "fix the YAML syntax (indentation, colons, quotes)") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, what: str) -> Any:
    """Read ``path`` as UTF-8 and parse it with :func:`load_yaml`."""

    return load_yaml(read_utf8(path, what), source=str(path))
