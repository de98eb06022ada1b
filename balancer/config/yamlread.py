"""Reading YAML with its line numbers: the node walker behind :mod:`balancer.config`.

The text is *composed* (``yaml.compose``), not loaded, so every key and value stays a node with its
line, and duplicate keys (which ``yaml.safe_load`` silently collapses) stay visible. :class:`Reader`
walks the nodes against schema tables and turns any problem into one ``ConfigError`` naming file,
line and dotted path; every scalar goes through ``${VAR}`` substitution on its own node.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from ..errors import ConfigError

STR_TAG = "tag:yaml.org,2002:str"
NULL_TAG = "tag:yaml.org,2002:null"
MERGE_TAG = "tag:yaml.org,2002:merge"


class Loader(yaml.SafeLoader):
    """A SafeLoader that remembers which scalars were plain and untagged: only those are re-typed after
    ``${VAR}`` substitution (``"${PORT}"`` and ``!!str ${PORT}`` stay strings).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.retyped: set[int] = set()  # id() of nodes; the tree keeps them alive for the whole parse

    def compose_scalar_node(self, anchor: Any) -> yaml.ScalarNode:  # (the stubs mistype `anchor`)
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        node = super().compose_scalar_node(anchor)
        if getattr(event, "tag", None) is None and getattr(event, "style", None) is None:
            self.retyped.add(id(node))
        return node


T = TypeVar("T")
Converter = Callable[["Reader", yaml.Node, str], Any]
Schema = Mapping[str, tuple[str, Converter]]  # YAML key -> (dataclass attribute, converter)


class Reader:
    """One parse: turns nodes into values, or into a located ``ConfigError``."""

    __slots__ = ("environ", "loader", "pool_names", "source")

    def __init__(self, source: str, environ: Mapping[str, str], loader: Loader) -> None:
        self.source = source
        self.environ = environ
        self.loader = loader
        self.pool_names: tuple[str, ...] = ()  # set by _pools; the top-level schema lists pools first

    def error(self, message: str, node: yaml.Node, path: str) -> ConfigError:
        return ConfigError(message, file=self.source, line=node.start_mark.line + 1, path=path or None)

    def value(self, node: yaml.Node, path: str) -> object:
        """A scalar's Python value after substitution; a mapping or list comes back as its node."""
        if not isinstance(node, yaml.ScalarNode):
            return node
        if node.tag == STR_TAG and "$" in node.value:
            text = self.substitute(node, path)
            if id(node) not in self.loader.retyped:
                return text
            tag = self.loader.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
            node = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
        try:
            return self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:  # an explicit tag that does not fit, like `!!int x`
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else exc
            raise self.error(f"cannot read value: {reason}", node, path) from None

    def text(self, node: yaml.Node, path: str) -> str:
        """A scalar's source text after substitution, untyped: for argv items and environment values,
        where ``1.0`` should stay ``"1.0"`` and ``yes`` stay ``"yes"``.
        """
        if not isinstance(node, yaml.ScalarNode) or node.tag == NULL_TAG:
            raise self.error(f"expected a string, got {show(self.value(node, path))}", node, path)
        return self.substitute(node, path)

    def substitute(self, node: yaml.ScalarNode, path: str) -> str:
        try:
            return ENV_REF.sub(lambda match: expand_env(match, self.environ), node.value)
        except ConfigError as exc:
            raise self.error(exc.reason, node, path) from None

    def is_null(self, node: yaml.Node, path: str) -> bool:
        return isinstance(node, yaml.ScalarNode) and self.value(node, path) is None

    def mapping(self, node: yaml.Node, path: str,
                allowed: Mapping[str, object] | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Key -> (key node, value node), refusing duplicates and keys not in ``allowed`` (None = any)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {show(self.value(node, path))}", node, path)
        pairs: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error("keys must be plain strings", key_node, path)
            key = key_node.value
            where = join_path(path, key)
            if key_node.tag == MERGE_TAG:
                raise self.error("YAML merge keys ('<<') are not supported; alias a whole section instead",
                                 key_node, path)
            if key in pairs:
                first = pairs[key][0].start_mark.line + 1
                raise self.error(f"duplicate key (first given on line {first})", key_node, where)
            if key.startswith("x-") and allowed is not None:
                continue            # an extension key: a place for YAML anchors, ignored (Compose's rule)
            if allowed is not None and key not in allowed:
                raise self.error(unknown_key(key, list(allowed)), key_node, where)
            pairs[key] = (key_node, value_node)
        return pairs

    def fields(self, node: yaml.Node, path: str, schema: Schema,
               required: tuple[str, ...] = ()) -> dict[str, Any]:
        """Dataclass keyword arguments for the keys present, converted in schema order."""
        pairs = self.mapping(node, path, schema)
        present = {key: value for key, (_, value) in pairs.items()
                   if not self.is_null(value, join_path(path, key))}
        for key in required:
            if key not in present:
                raise self.error(f"missing required key {key!r}", node, path)
        return {attr: convert(self, present[key], join_path(path, key))
                for key, (attr, convert) in schema.items() if key in present}

    def items(self, node: yaml.Node, path: str) -> list[tuple[yaml.Node, str]]:
        """A list's items with their paths (``routes[0]``)."""
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {show(self.value(node, path))}", node, path)
        return [(item, f"{path}[{index}]") for index, item in enumerate(node.value)]


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def show(value: object) -> str:
    """A value as the operator wrote it: YAML spellings for null and booleans, repr otherwise."""
    if isinstance(value, yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def unknown_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (allowed: {', '.join(allowed)})"


# `$$` is a literal `$`; `${` must be closed. A `$` before anything else is left alone ("pa$word").
ENV_REF = re.compile(r"\$(?:(\$)|\{(?P<body>[^}]*)\}|\{)")
ENV_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def expand_env(match: re.Match[str], environ: Mapping[str, str]) -> str:
    if match[1]:
        return "$"
    body = match["body"]
    if body is None:
        raise ConfigError("unterminated '${' (write '$$' for a literal '$')")
    ref = ENV_BODY.fullmatch(body)
    if ref is None:
        raise ConfigError(f"bad variable reference '${{{body}}}': use ${{NAME}} or ${{NAME:-default}}")
    name, default = ref["name"], ref["default"]
    value = environ.get(name)
    # Shell semantics: `:-` also replaces a variable that is set but empty.
    if value is not None and (value or default is None):
        return value
    if default is not None:
        return default
    raise ConfigError(f"environment variable {name!r} is not set")
