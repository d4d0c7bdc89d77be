"""Tool-use evaluation: the agent on held-out tasks, scored per split part and task kind.

`openk2 eval tools CHECKPOINT` (our Engine in this process) or `--endpoint URL` (any OpenAI-compatible
server: `openk2 serve`, vLLM, a hosted K2) runs each held-out task as the agent loop runs it (the
task's world with its failure rules, the scripted user's follow-ups, a `Budget`), concurrently, and
scores the episode (`score`):
- format validity: the share of the model's tool calls that name a declared tool with a JSON object
  as arguments (calls the parser dropped count as invalid);
- tool name / arguments: the share of the plan's calls the model made with the right tool, and with
  the right arguments too (references to earlier results resolved as the oracle resolves them; the
  rubric's comparison), each matched to one call in the same user turn;
- success: the rubric passed and the episode ended with an answer; mean turns: model calls;
- the failure kind of a failed task, the first of FAILURES that applies.
No model code here: a model is reached through the agent's clients (see `make_client`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

from openk2.agent.tools import ToolError
from openk2.envs.oracle import Oracle
from openk2.envs.play import gather_limited, play
from openk2.envs.rubric import answers_of, calls_of, same_args
from openk2.envs.splits import SPLITS, held_out, in_distribution
from openk2.envs.tasks import SYSTEM
from openk2.envs.world import World
from openk2.sampling import GREEDY

if TYPE_CHECKING:  # the runtime's import reaches torch: loaded when an evaluation runs, not with the CLI
    from openk2.agent.runtime import Budget

FAILURES = {  # first match wins, in this order
    "error": "the model call failed (the endpoint or engine raised)",
    "bad_json": "a tool call could not be read: dropped by the parser, or arguments not a JSON object",
    "wrong_tool": "a tool the plan does not call in that user turn (or any tool where none is needed)",
    "wrong_args": "the plan's tool called, but never with the plan's arguments",
    "over_budget": "stopped by a budget: max turns, max tokens, a reply cut at the turn limit, the context",
    "no_call": "answered without calling any tool where the task needs one",
    "gave_up": "answered (or stopped answering) before making all the calls the task needs",
    "other": "every expected call made, yet the rubric failed (the answer misses a value, calls repeated, "
             "independent calls made one by one)",
}
OVER_BUDGET = ("max_turns", "max_tokens", "wall_time", "length", "context_length")


def expected_calls(task) -> list[dict]:
    """The plan's calls, one per step: {"name", "arguments", "turn"} (the user turn), each `$from`
    resolved from the earlier steps' results on the task's world without its failures."""
    world, oracle, results, out = World(task.domain, task.seed), Oracle(task), {}, []
    for i, step in enumerate(task.plan):
        args = oracle.resolve(step["arguments"], results)
        try:
            results[i] = [world.call(step["tool"], args)]
        except ToolError:  # generation keeps only plans without real errors; a later $from then fails loudly
            results[i] = []
        out.append({"name": step["tool"], "arguments": args, "turn": step["turn"]})
    return out


def model_calls(ep) -> list[dict]:
    """Every tool call the model wrote: {"name", "arguments" (None unless a JSON object), "turn" (the
    user turn it answers)}; a call the parser dropped has name None."""
    users, by_message = -1, []
    for m in ep.transcript:
        users += m["role"] == "user"
        if m["role"] == "assistant":
            by_message += [users] * len(m.get("tool_calls") or [])
    calls = [{**c, "turn": t} for c, t in zip(calls_of(ep.transcript), by_message)]
    return calls + [{"name": None, "arguments": None, "turn": None}
                    for e in ep.tool_errors if e["kind"] == "unparsed_call"]


def match(expected: list[dict], calls: list[dict]) -> list[tuple[bool, bool]]:
    """(tool right, arguments right) per expected call, each matched to a model call of its user turn
    with its tool (one with its arguments when there is one); no model call matches twice."""
    used, out = set(), []
    for e in expected:
        same = [i for i, c in enumerate(calls) if i not in used and c["turn"] == e["turn"] and c["name"] == e["name"]]
        hit = next((i for i in same if same_args(e["arguments"], calls[i]["arguments"])), same[0] if same else None)
        used.add(hit)
        out.append((hit is not None, hit is not None and same_args(e["arguments"], calls[hit]["arguments"])))
    return out


def failure_kind(ep, expected: list[dict], calls: list[dict], matched: list[tuple[bool, bool]]) -> str:
    wanted = {(e["turn"], e["name"]) for e in expected}
    if ep.stop_reason in ("model_error", "cancelled"):
        return "error"
    if any(c["arguments"] is None for c in calls):
        return "bad_json"
    if any((c["turn"], c["name"]) not in wanted for c in calls):
        return "wrong_tool"
    if any(name and not args for name, args in matched):
        return "wrong_args"
    if ep.stop_reason in OVER_BUDGET:
        return "over_budget"
    if expected and not calls:
        return "no_call"
    return "gave_up" if not all(name for name, _ in matched) or not ep.final else "other"


def score(task, ep, world) -> dict:
    """One task's result: success, the rubric's reasons, call counts and the failure kind."""
    passed, reasons = task.rubric.check(world.snapshot(), answers_of(ep.transcript), calls_of(ep.transcript))
    success = passed and ep.stop_reason == "answered"
    declared = {t["function"]["name"] for t in ep.tools}
    calls, expected = model_calls(ep), expected_calls(task)
    matched, valid = match(expected, calls), [c["name"] in declared and c["arguments"] is not None for c in calls]
    return {"id": task.id, "kind": task.kind, "domain": task.domain, "success": success,
            "failure": None if success else failure_kind(ep, expected, calls, matched),
            "calls": len(calls), "valid_calls": sum(valid), "expected_calls": len(expected),
            "tool_name": sum(n for n, _ in matched), "arguments": sum(a for _, a in matched),
            "turns": sum(t["kind"] == "turn" for t in ep.turns), "stop_reason": ep.stop_reason,
            "reasons": reasons + ([] if ep.stop_reason == "answered" else [f"stopped: {ep.stop_reason} ({ep.detail})"])}


def summarize(results: list[dict]) -> dict:
    """The metrics of a group of task results (micro-averaged: call shares over all calls); None where
    the group has nothing to measure (no calls made, none expected)."""
    def share(num, den):
        return None if den == 0 else sum(r[num] for r in results) / den
    failures = {k: n for k in FAILURES if (n := sum(r["failure"] == k for r in results))}
    stops = {k: sum(r["stop_reason"] == k for r in results) for k in sorted({r["stop_reason"] for r in results})}
    n, calls, expected = len(results), sum(r["calls"] for r in results), sum(r["expected_calls"] for r in results)
    return {"tasks": n, "success": share("success", n), "format_validity": share("valid_calls", calls),
            "tool_name": share("tool_name", expected), "arguments": share("arguments", expected),
            "mean_turns": share("turns", n), "calls": calls, "failures": failures, "stop_reasons": stops}


def report(results: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """Rows per (split, part): each task kind, then "all"; last, "overall" over every task evaluated."""
    rows = []
    for (by, part), rs in results.items():
        for kind in sorted({r["kind"] for r in rs}) + ["all"]:
            group = [r for r in rs if kind in ("all", r["kind"])]
            rows.append({"split": by, "part": part, "kind": kind, **summarize(group)})
    unique = {r["id"]: r for rs in results.values() for r in rs}
    return rows + [{"split": "overall", "part": "", "kind": "all", **summarize(list(unique.values()))}]


def table(rows: list[dict]) -> str:
    """A Markdown table of `report`'s rows."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"
    head = "| split | part | kind | tasks | success % | format % | tool % | args % | turns | failures |"
    lines = [head, "|" + "---|" * 3 + "---:|" * 6 + "---|"]
    for r in rows:
        fails = ", ".join(f"{k} {n}" for k, n in r["failures"].items()) or "–"
        turns = "–" if r["mean_turns"] is None else f"{r['mean_turns']:.2f}"
        shares = " | ".join(pct(r[k]) for k in ("success", "format_validity", "tool_name", "arguments"))
        lines.append(f"| {r['split']} | {r['part']} | {r['kind']} | {r['tasks']} | {shares} | {turns} | {fails} |")
    return "\n".join(lines)


async def run_task(task, client, budget: Budget, temperature: float | None = GREEDY, system: str = SYSTEM) -> dict:
    """One episode of a task (its world, scripted user and budget), scored."""
    world, ep = await play(task, client, system=system, budget=budget, temperature=temperature)
    return {**score(task, ep, world), "messages": ep.transcript}


async def evaluate(tasks: list, client_of, budget: Budget | None = None, temperature: float | None = GREEDY,
                   concurrency: int = 8, progress: bool = True) -> list[dict]:
    """Each task's result, in order; `client_of(task)` -> the model client of its episode; at most
    `concurrency` episodes at once (an in-process engine batches them). budget: 16 turns, 4,096 tokens,
    256 a reply unless given."""
    from tqdm import tqdm
    from openk2.agent.runtime import Budget
    budget = budget or Budget(max_turns=16, max_tokens=4096, turn_tokens=256)
    with tqdm(total=len(tasks), desc="eval tools", unit="task", disable=not progress, file=sys.stderr) as bar:
        return await gather_limited(tasks, lambda task: run_task(task, client_of(task), budget, temperature),
                                    concurrency, bar.update)


# ---------------------------------------------------------------- the command

def add_parser(sub, load) -> None:
    """`openk2 eval tools CHECKPOINT | --endpoint URL`; `load(path)` -> (model, tokenizer)."""
    s = sub.add_parser("eval", help="evaluate a model: `openk2 eval tools CHECKPOINT` (tool use on held-out tasks)")
    s = s.add_subparsers(dest="what", required=True).add_parser(
        "tools", help="tool use on held-out tasks of the tool worlds, per split part and task kind")
    s.add_argument("path", nargs="?", help="checkpoint folder or preset, run in this process (or use --endpoint)")
    s.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--model", help="model name at the endpoint (default: its first)")
    s.add_argument("--api-key", help="the endpoint's key (default: $OPENAI_API_KEY)")
    s.add_argument("--oracle", action="store_true", help="score the programmatic teacher instead (a check: all 100 %%)")
    s.add_argument("--split", default="seed", help=f"comma-separated splits: {', '.join(SPLITS)} (default: seed)")
    s.add_argument("--part", default="test", help="comma-separated parts: test, train (default: test)")
    s.add_argument("--n", type=int, default=100, help="tasks per split part (default: 100)")
    s.add_argument("--seed", type=int, default=0, help="task generation seed (the split itself uses seed 0)")
    s.add_argument("--trained-on", choices=SPLITS,
                   help="the split whose train part the model's data came from (openk2 synth --split S): seed and "
                        "args tasks are then drawn from that part too, none a combination or domain it held out")
    s.add_argument("--json", help="write the rows, the config and every task's result and transcript here")
    s.add_argument("--concurrency", type=int, default=8, help="episodes at once (default: 8)")
    s.add_argument("--max-turns", type=int, default=16, help="model calls per task (default: 16)")
    s.add_argument("--max-tokens", type=int, default=4096, help="generated tokens per task (default: 4096)")
    s.add_argument("--turn-tokens", type=int, default=256, help="max_tokens of each model call (default: 256)")
    s.add_argument("--temperature", type=float, default=GREEDY, help="sampling temperature (default: 0, greedy)")
    s.add_argument("--quantize", choices=["int8", "int4"], help="in-process model: quantize the weights")
    s.add_argument("--strict-tools", action="store_true",
                   help="constrained decoding: every call names a declared tool with arguments valid under its "
                        "schema (an endpoint gets the tools marked \"strict\": true)")
    s.set_defaults(fn=lambda args: eval_command(args, lambda: load(args.path)), compile=False)


def make_client(args, load):
    """(client of a task, the model's name, a stop event or None): the endpoint's, the checkpoint's in
    this process (as `openk2 agent`), or the oracle's."""
    from openk2.agent.cli import in_process_client
    from openk2.agent.client import OpenAIClient, ScriptedClient

    if sum(map(bool, (args.path, args.endpoint, args.oracle))) != 1:
        raise SystemExit("openk2 eval tools: give a checkpoint PATH, --endpoint URL or --oracle (one of them)")
    if args.oracle:
        return lambda task: ScriptedClient([Oracle(task).reply] * args.max_turns), "oracle", None
    if args.endpoint:
        client, stop = OpenAIClient(args.endpoint, args.model, args.api_key, strict_tools=args.strict_tools), None
    else:
        client, stop = in_process_client(load, args, sequences=args.concurrency)
    return lambda task: client, client, stop


def eval_command(args, load) -> None:
    splits, parts = args.split.split(","), args.part.split(",")
    if bad := [s for s in splits if s not in SPLITS] + [p for p in parts if p not in ("train", "test")]:
        raise SystemExit(f"openk2 eval tools: unknown split or part {bad}; splits: {', '.join(SPLITS)}; "
                         "parts: train, test")
    groups = {(by, part): held_out(by, part, args.n, args.seed, trained_on=in_distribution(by, args.trained_on))
              for by in splits for part in parts}
    tasks = list({t.id: t for ts in groups.values() for t in ts}.values())  # a task in two groups runs once
    from openk2.agent.runtime import Budget
    budget = Budget(max_turns=args.max_turns, max_tokens=args.max_tokens, turn_tokens=args.turn_tokens)
    client_of, client, stop = make_client(args, load)
    start = time.monotonic()
    try:
        results = asyncio.run(evaluate(tasks, client_of, budget, args.temperature, args.concurrency))
    finally:
        if stop is not None:
            stop.set()
    if results and all(r["failure"] == "error" for r in results):  # e.g. an endpoint that is not there
        raise SystemExit(f"openk2 eval tools: every model call failed; the first: {results[0]['reasons'][-1]}")
    name = getattr(client, "name", client)  # an endpoint's model is known once it has answered
    by_id = {r["id"]: r for r in results}
    rows = report({g: [by_id[t.id] for t in ts] for g, ts in groups.items()})
    seconds = time.monotonic() - start
    print(table(rows))
    print(f"[openk2] eval tools: {len(tasks)} tasks in {seconds:.1f} s ({name})", file=sys.stderr)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("fn", "api_key")}
        git = subprocess.run(["git", "-C", str(Path(__file__).parents[2]), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip() or "unknown"
        out = {"config": {**config, "model": name, "git": git}, "seconds": round(seconds, 2),
               "failure_kinds": FAILURES, "rows": rows,
               "groups": {f"{by}/{part}": [t.id for t in ts] for (by, part), ts in groups.items()}, "tasks": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False, default=str))
