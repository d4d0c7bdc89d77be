"""Tools for the agent loop: a typed Python function becomes a `Tool` with an OpenAI function schema.

`@tool` reads the signature (schema.py): type hints give each parameter's JSON schema, defaults make
a parameter optional, descriptions come from `Annotated[T, "text"]` or the docstring's `Args:`
section, whose first paragraph describes the tool. A parameter annotated `ToolContext` is not shown
to the model: the loop passes the running agent and episode there (the `task` tool starts sub-agents
with it). Sync functions run in a worker thread, so parallel calls run concurrently. `Tool.check`
validates arguments against the schema (jsonschema, `ArgumentError`) before a call; errors become text
for the model in runtime.py.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from openk2.agent.schema import signature_schema


@functools.lru_cache(maxsize=1024)
def schema_validator(schema_json: str):
    """The jsonschema validator of a schema (as canonical JSON), or None if the schema is broken."""
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None
    return cls(schema)


@dataclass
class ToolContext:
    """What a tool may ask for by annotating a parameter with this type."""
    agent: Any  # runtime.Agent
    episode: Any  # runtime.Episode
    call_id: str = ""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[[dict, ToolContext | None], Awaitable[Any]]  # (arguments, context) -> result
    needs_approval: bool = False  # the CLI asks before running it (shell, code, writes) unless --yes
    timeout: float | None = None  # seconds; None: the agent's default

    def schema(self) -> dict:
        """The OpenAI `tools[]` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    @functools.cached_property
    def validator(self):
        """The schema's jsonschema validator; None for a broken schema (an MCP server's, say), in which
        case the tool itself judges its arguments. Built once per schema, however many tools share it
        (a tool world makes its tools anew for every task)."""
        return schema_validator(json.dumps(self.parameters, sort_keys=True))

    def check(self, arguments: dict) -> None:
        """ArgumentError unless `arguments` satisfy the schema (the most relevant violation)."""
        import jsonschema

        try:
            error = self.validator and jsonschema.exceptions.best_match(self.validator.iter_errors(arguments))
        except Exception:  # noqa: BLE001 — a schema it cannot apply (an unresolvable $ref): the tool judges, as for
            return        # a broken one

        if error:
            where = "/".join(map(str, error.absolute_path))
            raise ArgumentError(f"{where + ': ' if where else ''}{error.message}")

    def arguments_hint(self) -> str:
        """The arguments the schema names, for an error text: "sku (required), amount (required), note";
        "none" for an object without properties; "" when the schema names none (not an object schema)."""
        props, required = self.parameters.get("properties"), self.parameters.get("required") or []
        if not isinstance(props, dict):
            return "none" if self.parameters.get("type") == "object" else ""
        return ", ".join(f"{k} (required)" if k in required else k for k in props) or "none"

    async def run(self, arguments: dict, context: ToolContext | None = None) -> str:
        """Call with checked arguments; the result as text."""
        return as_text(await self.fn(arguments, context))

    async def invoke(self, arguments: dict, context: ToolContext | None = None) -> str:
        self.check(arguments)
        return await self.run(arguments, context)


class ArgumentError(ValueError):
    """Arguments that do not satisfy a tool's schema."""


class ToolError(Exception):
    """A tool's own account of a failure, shown to the model as it is (an MCP error result, say)."""


def as_text(result: Any) -> str:
    """A tool's return value as the text the model reads."""
    if isinstance(result, str):
        return result
    return "" if result is None else json.dumps(result, ensure_ascii=False, default=str)


def tool(fn: Callable | None = None, *, name: str | None = None, needs_approval: bool = False,
         timeout: float | None = None):
    """Make a `Tool` of a typed function: `@tool` or `@tool(name=..., needs_approval=True)`."""
    if fn is None:
        return lambda f: tool(f, name=name, needs_approval=needs_approval, timeout=timeout)
    description, parameters, context_param = signature_schema(fn, ToolContext)

    async def call(arguments: dict, context: ToolContext | None):
        kwargs = {**arguments, **({context_param: context} if context_param else {})}
        if inspect.iscoroutinefunction(fn):
            return await fn(**kwargs)
        return await asyncio.to_thread(fn, **kwargs)

    return Tool(name or fn.__name__, description, parameters, call, needs_approval, timeout)


def toolbox(tools) -> dict[str, Tool]:
    """Tools by name; a clear error for two tools of the same name."""
    out: dict[str, Tool] = {}
    for t in tools:
        if t.name in out:
            raise ValueError(f"two tools are named {t.name!r}")
        out[t.name] = t
    return out


__all__ = ["ArgumentError", "ToolError", "Tool", "ToolContext", "tool", "toolbox", "as_text"]
