"""JSON schemas from Python signatures, for `@tool` (tools.py): type hints -> each parameter's schema
(str, int, float, bool, list[...], dict[...], Literal[...], `X | None`, Annotated), defaults ->
optional parameters, descriptions from `Annotated[T, "text"]` or a Google-style `Args:` section.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Annotated, Any, Literal

SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def type_schema(hint) -> dict:
    """The JSON schema of one type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return type_schema(args[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        schema = type_schema(inner[0]) if len(inner) == 1 else {"anyOf": [type_schema(a) for a in inner]}
        return nullable(schema) if len(inner) < len(args) else schema
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset):
        return {"type": "array", **({"items": type_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": type_schema(args[1])} if len(args) == 2 else {})}
    if hint in SIMPLE:
        return {"type": SIMPLE[hint]}
    if hint is Any or hint is inspect.Parameter.empty:
        return {}
    raise TypeError(f"no JSON schema for the type {hint!r}")


def nullable(schema: dict) -> dict:
    """`schema` that also admits null (`X | None`: a model may send null for "not given")."""
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    return schema  # {} admits anything, null included


def docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: text}) from a docstring with an optional Google-style `Args:` section."""
    doc = inspect.cleandoc(doc or "")
    head, *tail = re.split(r"^(?:Args|Arguments|Parameters):[ \t]*$", doc, maxsplit=1, flags=re.M)
    rest = tail[0] if tail else ""
    params, name = {}, None
    indent = None  # of the parameter lines; deeper lines continue the previous one
    for line in rest.splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next section (Returns:, Raises:, ...)
        m = re.match(r"\s*(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if m and depth <= (indent or depth):
            indent, name, params[m[1]] = depth, m[1], m[2].strip()
        elif name:
            params[name] += " " + line.strip()
    return head.strip(), params


def signature_schema(fn, context_type) -> tuple[str, dict, str | None]:
    """(description, parameters schema, the name of the parameter typed `context_type` or None): the
    context parameter is left out of the schema, for the caller to fill in."""
    hints = typing.get_type_hints(fn, include_extras=True)
    description, param_docs = docstring_parts(fn.__doc__)
    props, required, context_param = {}, [], None
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name, inspect.Parameter.empty)
        if hint is context_type:
            context_param = p.name
            continue
        schema = type_schema(hint)
        extras = typing.get_args(hint)[1:] if typing.get_origin(hint) is Annotated else ()
        text = next((x for x in extras if isinstance(x, str)), None) or param_docs.get(p.name)
        schema.update({"description": text} if text else {})
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        elif p.default is not None:
            schema["default"] = p.default
        props[p.name] = schema
    return description, {"type": "object", "properties": props, "required": required,
                         "additionalProperties": False}, context_param
