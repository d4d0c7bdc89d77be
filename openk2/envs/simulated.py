"""LLM-simulated tool worlds: synthesis for tools that have no programmatic world, such as an MCP
server's tools (their schemas, read with `list_tools`) or any OpenAI `tools` list. K2's pipeline filled
these roles with models (K2-SPEC §9). Here each role is an OpenAI-compatible endpoint behind the same
client as the teacher and the judge:

- `LLMTaskWriter`: writes a task of one kind for a toolset: the user's request and follow-ups, the
  user's goal, the tools it needs and the criteria a judge checks.
- `SimulatedTools`: the stateful tool simulator. Arguments are checked against each tool's schema and
  the task's failure rules (world.py's) applied first; only then is the endpoint asked for the result,
  shown the tool's schema and every earlier call of the episode with its result, so the state it
  invents stays consistent. A reply that is not one JSON object is a `ToolError` for the model and a
  `problem` that rejects the episode.
- `LLMUser`: the user simulator. After each answer it writes the next message toward the goal (the
  writer's follow-ups, or a reply to the assistant's question), or ends the conversation.
- `OpenTask`: such a task as data. The LLM judge grades its episodes against its criteria.
Every request carries a seed derived from the task, so a deterministic endpoint gives the same data.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from openk2.agent.tools import Tool, ToolError
from openk2.envs.play import gather_limited
from openk2.envs.world import admit, check_rules
from openk2.sampling import GREEDY, WRITER_TEMPERATURE

KIND_BRIEFS = {
    "single": "needs exactly one tool call",
    "parallel": "needs two or more tool calls that do not depend on each other (they can be made at once)",
    "chain": "needs two tool calls where the second takes an argument from the first one's result",
    "multi_turn": "needs a tool call for the first request, then, after the answer, one follow-up request "
                  "that needs another call",
    "recovery": "needs exactly one tool call",  # the failure is injected, not written
    "no_tool": "needs no tool at all: a question answered from general knowledge",
    "missing": "names a record (by an id) that does not exist, so its one tool call fails and the answer says so",
}
WRITER_REPLY = ('{"request": "the user\'s first message", "follow_ups": ["later messages (multi_turn only)"], '
                '"goal": "what the user wants, in one sentence", "tools": ["the names of the tools needed"], '
                '"criteria": ["checkable facts a correct conversation satisfies"]}')


def tool_names(schemas: list[dict]) -> list[str]:
    return [s["function"]["name"] for s in schemas]


def read_tools_file(path) -> list[dict]:
    """An OpenAI `tools` list (JSON) as tool schemas; ValueError saying what is wrong."""
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of tools")
    for n, t in enumerate(data):
        f = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("parameters", {}), dict)):
            raise ValueError(f'{path}: tool {n} is not {{"type": "function", "function": {{"name", "parameters"}}}}')
    return [{"type": "function", "function": {"name": t["function"]["name"], "description":
             t["function"].get("description", ""), "parameters": t["function"].get("parameters") or
             {"type": "object", "properties": {}}}} for t in data]


async def mcp_tool_schemas(servers: list[str], taken=frozenset()) -> list[dict]:
    """The tool schemas of MCP servers (commands or URLs), listed and the connections closed again (a
    name in `taken` or another server's is prefixed with the server's)."""
    from openk2.agent.mcp import MCPTools

    async with MCPTools(servers, taken=set(taken)) as tools:
        return [t.schema() for t in tools]


def load_schemas(tools_file=None, servers=()) -> list[dict]:
    """The tools of a `tools` JSON file and of MCP servers; ValueError saying what failed."""
    schemas = read_tools_file(tools_file) if tools_file else []
    if servers:
        try:
            schemas += asyncio.run(mcp_tool_schemas(list(servers), tool_names(schemas)))
        except Exception as e:  # noqa: BLE001 — a server that cannot start or list is the user's to fix
            raise ValueError(f"--mcp: {e}") from None
    if len(set(tool_names(schemas))) < len(schemas):
        raise ValueError(f"{tools_file or '--mcp'}: two tools share a name")
    if not schemas:
        raise ValueError("--mcp: the servers list no tools")
    return schemas


@dataclass
class OpenTask:
    id: str
    kind: str
    domain: str  # where the tools came from
    seed: int
    schemas: list  # the OpenAI tools entries offered
    turns: list  # the first request, then the follow-ups the user simulator works toward
    goal: str
    criteria: list
    needs: list = field(default_factory=list)  # the tools the writer said the task needs
    failures: list = field(default_factory=list)  # world.py's rules, applied by the simulator

    @property
    def tools(self) -> list[str]:
        return tool_names(self.schemas)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_json_object(text: str | None, what: str) -> dict:
    try:
        v = json.loads((text or "").strip())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not one JSON object ({e.msg}): {(text or '')[:80]!r}") from None
    if not isinstance(v, dict):
        raise ValueError(f"{what}: not one JSON object: {(text or '')[:80]!r}")
    return v


class LLMTaskWriter:
    """`await writer(schemas, kind, seed, domain)` -> OpenTask; ValueError if the reply is unusable."""

    def __init__(self, client, max_tools: int = 6, temperature: float | None = WRITER_TEMPERATURE,
                 max_tokens: int = 768):
        self.client, self.max_tools, self.temperature, self.max_tokens = client, max_tools, temperature, max_tokens

    def prompt(self, offered: list[dict], kind: str) -> list[dict]:
        text = (f"Tools (OpenAI function schemas):\n{json.dumps(offered, ensure_ascii=False)}\n\n"
                f"Write one realistic task a user could give an assistant with these tools. The task "
                f"{KIND_BRIEFS[kind]}. Use concrete values (names, ids, numbers) in the request.\n"
                f"Reply with one JSON object and nothing else: {WRITER_REPLY}")
        return [{"role": "system", "content": "You write tasks for evaluating tool-using assistants."},
                {"role": "user", "content": text}]

    async def __call__(self, schemas: list[dict], kind: str, seed: int, domain: str = "tools") -> OpenTask:
        rng = random.Random(f"{domain}:{kind}:{seed}")
        picked = sorted(rng.sample(range(len(schemas)), min(self.max_tools, len(schemas))))
        offered = [schemas[i] for i in picked]
        c = await self.client.complete(self.prompt(offered, kind), max_tokens=self.max_tokens,
                                       temperature=self.temperature, seed=seed)
        v = parse_json_object(c.message.get("content"), "writer")
        strings = lambda x: isinstance(x, list) and all(isinstance(s, str) and s.strip() for s in x)  # noqa: E731
        if not (isinstance(v.get("request"), str) and v["request"].strip() and strings(v.get("criteria"))
                and v["criteria"] and strings(v.get("follow_ups", [])) and strings(v.get("tools", []))):
            raise ValueError(f"writer: expected {WRITER_REPLY}, got {json.dumps(v)[:120]}")
        needs, follow_ups = v.get("tools", []), v.get("follow_ups", []) if kind == "multi_turn" else []
        if unknown := [n for n in needs if n not in tool_names(offered)]:
            raise ValueError(f"writer: the task needs tools it was not offered: {unknown}")
        if (kind == "no_tool") != (not needs) or (kind == "multi_turn") != bool(follow_ups):
            raise ValueError(f"writer: not a {kind} task (tools {needs}, follow-ups {len(follow_ups)})")
        criteria, failures = list(v["criteria"]), []
        if kind == "recovery":
            failures = [{"kind": "transient", "op": needs[0], "times": 1}]
            criteria.append(f"after {needs[0]} fails once with a temporary error, the assistant calls it again")
        if kind == "missing":
            failures = [{"kind": "not_found", "op": needs[0]}]
            criteria.append(f"after {needs[0]} finds nothing, the assistant says so and neither retries nor guesses")
        return OpenTask(f"{domain}-{kind}-{seed}", kind, domain, seed, offered, [v["request"], *follow_ups],
                        v.get("goal") or v["request"], criteria, needs, failures)


class SimulatedTools:
    """The endpoint as the backend of `schemas`' tools for one episode (`log`: every call, in order)."""

    def __init__(self, client, schemas: list[dict], seed: int = 0, failures: list[dict] = (),
                 max_tokens: int = 512, temperature: float | None = GREEDY):
        self.client, self.schemas, self.seed = client, {s["function"]["name"]: s for s in schemas}, seed
        check_rules(failures, self.schemas, "the simulated tools")
        self.failures, self.rng, self.counts = [dict(f) for f in failures], random.Random(f"sim:{seed}"), {}
        self.max_tokens, self.temperature = max_tokens, temperature
        self.log, self.problems = [], []

    def tools(self, names: list[str] | None = None) -> list[Tool]:
        return [self.tool(name) for name in names or self.schemas]

    def tool(self, name: str) -> Tool:
        f = self.schemas[name]["function"]

        async def run(arguments: dict, context=None):
            return await self.call(name, arguments)

        return Tool(name, f.get("description", ""), f["parameters"], run)

    def prompt(self, name: str, arguments: dict, limit: int | None) -> list[dict]:
        done = [e for e in self.log if "result" in e or "error" in e]  # parallel calls still running: not yet
        earlier = "\n".join(f"{e['name']}({json.dumps(e['arguments'])}) -> " + (json.dumps(e["result"]) if "result" in e
                             else f"error: {e['error']}") for e in done) or "(none)"
        page = f" Return at most {limit} items and a next_offset for the rest." if limit is not None else ""
        text = (f"Tool: {json.dumps(self.schemas[name]['function'], ensure_ascii=False)}\n\n"
                f"Earlier calls in this session, with their results:\n{earlier}\n\n"
                f"Now: {name}({json.dumps(arguments, ensure_ascii=False)})\n\nReply with the tool's result as one "
                f"JSON object and nothing else, consistent with the earlier results; if the call cannot succeed "
                f'(say, nothing has that id), reply {{"error": "what went wrong"}}.{page}')
        return [{"role": "system", "content": "You simulate the backend of a software tool, realistically."},
                {"role": "user", "content": text}]

    async def call(self, name: str, arguments: dict):
        entry = {"name": name, "arguments": arguments}
        self.log.append(entry)
        try:
            limit = admit(self.tool(name), self.failures, self.counts, self.rng, arguments)
            try:
                c = await self.client.complete(self.prompt(name, arguments, limit), max_tokens=self.max_tokens,
                                               temperature=self.temperature, seed=self.seed * 1000 + len(self.log))
                result = parse_json_object(c.message.get("content"), f"simulator: {name}")
            except Exception as e:  # noqa: BLE001 — the model sees a failed call; the episode is rejected
                self.problems.append(str(e) if isinstance(e, ValueError) else
                                     f"simulator: the request for {name} failed: {type(e).__name__}: {e}")
                raise ToolError(f"{name} failed: the service gave no readable result") from None
            if set(result) == {"error"}:
                raise ToolError(str(result["error"]))
            entry["result"] = result
            return result
        except ToolError as e:
            entry["error"] = str(e)
            raise


class LLMUser:
    """The user simulator of an `OpenTask`: at most one message more than the writer planned (to answer
    a question of the assistant), then the conversation ends; "DONE" ends it sooner."""

    def __init__(self, client, task: OpenTask, max_tokens: int = 256, temperature: float | None = GREEDY):
        self.client, self.task, self.max_tokens, self.temperature = client, task, max_tokens, temperature
        self.problems = []

    def prompt(self, episode) -> list[dict]:
        from openk2.envs.judge import transcript_text

        planned = "\n".join(f"{n}. {t}" for n, t in enumerate(self.task.turns, 1))
        text = (f"Your goal: {self.task.goal}\nYour requests, in order:\n{planned}\n\nThe conversation so far:\n"
                f"{transcript_text([m for m in episode.transcript if m['role'] != 'system'])}\n\n"
                "Write only your next message as the user: your next request once the assistant has answered "
                "the last one, or an answer if it asked you something. If everything you wanted is done, "
                "reply with exactly DONE.")
        return [{"role": "system", "content": "You play a user talking to an AI assistant that has tools."},
                {"role": "user", "content": text}]

    async def __call__(self, episode) -> str | None:
        asked = sum(m["role"] == "user" for m in episode.transcript)
        if asked > len(self.task.turns):
            return None
        try:
            c = await self.client.complete(self.prompt(episode), max_tokens=self.max_tokens,
                                           temperature=self.temperature, seed=self.task.seed * 100 + asked)
        except Exception as e:  # noqa: BLE001 — the conversation ends; the episode is rejected, with why
            self.problems.append(f"user simulator: the request failed: {type(e).__name__}: {e}")
            return None
        text = (c.message.get("content") or "").strip()
        return None if not text or text.strip(" .!").upper() == "DONE" else text


def write_tasks(writer, schemas: list[dict], n: int, seed: int, kinds=None, domain: str = "tools",
                concurrency: int = 8, progress=None) -> tuple[list, Counter]:
    """n LLM-written tasks over `schemas` (the kinds in turn), and why the writer's unusable ones were
    dropped, by reason."""
    kinds = list(kinds or KIND_BRIEFS)

    async def one(i):
        try:
            return await writer(schemas, kinds[i % len(kinds)], seed * 1_000_003 + i, domain)
        except Exception as e:  # noqa: BLE001 — an unusable task is dropped and counted, with why
            return str(e) if isinstance(e, ValueError) else f"writer: the request failed: {type(e).__name__}"

    out = asyncio.run(gather_limited(range(n), one, concurrency, progress))
    dropped = Counter(re.split(r"[:(]", x.removeprefix("writer: "))[0].strip() for x in out if isinstance(x, str))
    return [t for t in out if isinstance(t, OpenTask)], dropped
