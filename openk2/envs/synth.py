"""Trajectories for SFT: a teacher solves tasks in the agent loop, a judge keeps what passes (`openk2 synth`).

Every trajectory is a real episode of `Agent` against the task's world (its tools, its injected
failures) and the scripted user (the follow-ups of multi-turn tasks). The teacher is either the
programmatic oracle (`Teacher`: the plan's solver with seeded variety in its short thoughts before
calls and in its answers, played by a `ScriptedClient`), or an LLM behind any OpenAI-compatible
endpoint. The judge (judge.py) is the rubric, an LLM, or both; with `tries` > 1 a task is sampled
again until one trajectory passes (rejection sampling). Output: one JSON object a line,
`{"messages", "tools", "meta"}`: OpenAI chat format with tools, as `openk2 sft` and other SFT tools
read it, and `meta` for provenance (task id, kind, domain, seeds, teacher, verdict). Deterministic
per seed for the programmatic teacher (no ids, clocks or timings in the records).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import cache
from pathlib import Path

from openk2.envs.drills import drills, list_drills, sum_drills, tool_drills
from openk2.envs.judge import LLMJudge, category, corrected_turns, episode_reasons, rubric_verdict
from openk2.envs.play import gather_limited, play
from openk2.envs.rename import rename_share
from openk2.envs.simulated import LLMTaskWriter, LLMUser, OpenTask, SimulatedTools, load_schemas, write_tasks
from openk2.envs.spec import domain_names, load, parts
from openk2.envs.splits import bucket, held_out
from openk2.envs.tasks import KINDS, MORE_KINDS, SYSTEM, Task, generate
from openk2.envs.teacher import Teacher

MAX_TURNS = 16  # model calls an episode may take; the longest plan needs far fewer


@cache
def byte_tokenizer():
    """The ScriptedClient's tokenizer (renders each request as the engine would), built once: ~10 ms."""
    from openk2.tokenizer import Tokenizer
    return Tokenizer.byte_level()


def programmatic_client(task, seed: int, attempt: int = 0, slips: float = 0.0, corrections: float = 0.0,
                        repeats: float = 0.0):
    from openk2.agent.client import ScriptedClient
    teacher = Teacher(task, seed, slips, attempt, corrections, repeats)
    client = ScriptedClient([teacher.reply] * MAX_TURNS, byte_tokenizer(), name="oracle")
    client.refused = teacher.refused  # the calls it gets wrong on purpose, to correct (`trajectory`)
    return client


async def trajectory(task, client, seed: int, n_try: int = 0, judge: str = "rubric", llm_judge=None,
                     system: str | None = SYSTEM, temperature: float | None = None, max_tokens: int = 1024,
                     sim=None, corrected: bool = False) -> dict:
    """One episode of `client` on `task`, judged: its record (`meta.passed`, `meta.reasons`). An
    LLM-written task (`OpenTask`) runs against `sim`, the endpoint simulating its tools and user, and
    only an LLM judge can grade it. `corrected`: refused calls that the next round went past
    (`corrected_turns`; only the client's `refused` ids where it has them, as the programmatic
    teacher does) are overlooked by the rubric and written with weight 0 (shown, not trained)."""
    from openk2.agent.runtime import Budget

    episode_seed = int(bucket(f"{task.id}:{n_try}", seed) * 2**31)  # an endpoint's sampling seed, per try
    world = user = None
    if isinstance(task, OpenTask):
        if judge == "rubric" or llm_judge is None or sim is None:
            raise ValueError("an LLM-written task needs a simulator endpoint and the LLM judge")
        world = SimulatedTools(sim, task.schemas, task.seed * 100 + n_try, task.failures)
        user = LLMUser(sim, task)
    world, ep = await play(task, client, system=system, temperature=temperature, world=world, user=user,
                           budget=Budget(MAX_TURNS, turn_tokens=max_tokens), seed=episode_seed)
    overlook = corrected_turns(ep, getattr(client, "refused", None)) if corrected else []
    if isinstance(task, OpenTask):
        reasons = episode_reasons(ep) + world.problems + user.problems
        passed = not reasons
    else:
        passed, reasons = rubric_verdict(task, world, ep, overlook) if judge != "llm" else (True, [])
    if judge != "rubric":
        ok, why = await llm_judge(task, world, ep)
        passed, reasons = passed and ok, reasons + why
    meta = {"task": task.id, "kind": task.kind, "domain": task.domain, "task_seed": task.seed, "seed": seed,
            "try": n_try, "teacher": client.name, "judge": judge, "passed": passed, "reasons": reasons,
            "rejected_by": sorted({category(r) for r in reasons}), "stop_reason": ep.stop_reason,
            **({"corrected": len(overlook)} if overlook else {})}
    messages = [{**m, "weight": 0} if i in overlook else m for i, m in enumerate(ep.transcript)]
    return {"messages": messages, "tools": ep.tools, "meta": meta}


async def sample(task, make_client, seed: int, tries: int = 1, **kw) -> list[dict]:
    """Up to `tries` trajectories of one task, stopping at the first that passes (rejection sampling)."""
    out = []
    for n in range(tries):
        out.append(await trajectory(task, make_client(task, seed, n), seed, n, **kw))
        if out[-1]["meta"]["passed"]:
            break
    return out


def _programmatic_one(job) -> list[dict]:  # a process pool's unit of work (module level, so it pickles)
    task, seed, slips, corrections, repeats, kw = job
    teacher = functools.partial(programmatic_client, slips=slips, corrections=corrections, repeats=repeats)
    return asyncio.run(sample(Task.from_dict(task), teacher, seed, corrected=corrections > 0, **kw))


MIXED_KINDS = ("parallel", "multi_turn", "single")  # the kinds whose requests may span a merged world's domains


def pairs(worlds: list[str]) -> list[str]:
    """Every merged world of two of `worlds` ("bank+shop", …): tasks there ask for two domains' tools
    together, combinations no single-domain task can show."""
    return [f"{a}+{b}" for a, b in itertools.combinations(sorted(worlds), 2)]


def pick_tasks(n: int, seed: int, worlds=None, kinds=None, split_by: str | None = None, part: str = "train"):
    """n tasks of the given worlds and kinds; with `split_by`, only those in that part of the split (the
    parts are properties of each task, so they match what eval draws from its own seed)."""
    if not split_by:
        return generate(n, seed, worlds, kinds)
    return held_out(split_by, part, n, seed, worlds=worlds, kinds=kinds)


def synthesize(tasks: list, seed: int, *, workers: int = 1, concurrency: int = 8, client=None, progress=None,
               slips: float = 0.0, corrections: float = 0.0, repeats: float = 0.0, **kw) -> list[dict]:
    """Every task's trajectories, in task order. `client` None: the programmatic teacher (erring in a
    share `slips` of its episodes, correcting a refused call in a share `corrections`, made twice in a
    share `repeats` of those), in `workers` processes; else that endpoint client, `concurrency`
    episodes at a time."""
    if client is None:
        jobs, out = [(t.to_dict(), seed, slips, corrections, repeats, kw) for t in tasks], []
        with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
            for records in pool.map(_programmatic_one, jobs, chunksize=8) if pool else map(_programmatic_one, jobs):
                out += records
                progress and progress(1)
        return out

    async def one(task):
        return await sample(task, lambda *_: client, seed, **kw)

    return [rec for r in asyncio.run(gather_limited(tasks, one, concurrency, progress)) for rec in r]


def summary(records: list[dict]) -> str:
    """Per task kind: trajectories generated, kept, rejected, and the rejections by reason."""
    rows, why = {}, {}
    for r in records:
        m = r["meta"]
        row = rows.setdefault(m["kind"], Counter())
        row.update(generated=1, kept=m["passed"], rejected=not m["passed"])
        why.setdefault(m["kind"], Counter()).update(m["rejected_by"])
    head = f"{'kind':<12}{'generated':>10}{'kept':>8}{'rejected':>10}  rejected by reason"
    lines = [head, "-" * len(head)]
    for kind in [k for k in KINDS + MORE_KINDS if k in rows] + ["all"]:
        c = rows[kind] if kind != "all" else sum(rows.values(), Counter())
        reasons = why[kind] if kind != "all" else sum(why.values(), Counter())
        text = ", ".join(f"{k} {v}" for k, v in reasons.most_common()) or "-"
        lines.append(f"{kind:<12}{c['generated']:>10}{c['kept']:>8}{c['rejected']:>10}  {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------- `openk2 synth`

def add_parser(sub) -> None:
    s = sub.add_parser("synth", help="agentic SFT data: a teacher solves tool-world tasks, a judge keeps what passes")
    s.add_argument("--worlds", help="comma-separated domains (default: all; `openk2 envs list`); "
                   "a+b is one world of both domains' tools, for tasks that mix them")
    s.add_argument("--pairs", action="store_true", help="draw from the merged world of every two of --worlds "
                   f"(bank+shop, …) instead: requests that need two domains' tools (kinds {', '.join(MIXED_KINDS)})")
    s.add_argument("--kinds", help=f"comma-separated task kinds (default: all of {', '.join(KINDS)}; "
                   f"also {', '.join(MORE_KINDS)}, a record that does not exist)")
    s.add_argument("--split", choices=["seed", "args", "combo", "domain"], help="draw tasks from one part of a split")
    s.add_argument("--part", choices=["train", "test"], default="train")
    s.add_argument("--n", type=int, required=True, help="tasks to attempt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="the JSONL file to write (replaced)")
    s.add_argument("--no-failures", action="store_true", help="no injected tool failures (drops `recovery` tasks)")
    s.add_argument("--keep-failed", action="store_true", help="write rejected trajectories too (meta.passed false)")
    s.add_argument("--drills", type=int, default=0, help="also write this many copy drills: short tool-free chats "
                   "whose answer quotes values from the request (openk2/envs/drills.py; default 0)")
    s.add_argument("--tool-drills", type=int, default=0, help="also write this many tool drills: one request, a "
                   "list of made-up tools that share words, the call that does it with the request's values, "
                   "its result and the answer (openk2/envs/drills.py; default 0)")
    s.add_argument("--list-drills", type=int, default=0, help="also write this many list drills: a made-up "
                   "list tool's items, in pages or not, named back in order, each once (default 0)")
    s.add_argument("--sum-drills", type=int, default=0, help="also write this many sum drills: a + b asked "
                   "without tools, answered column by column as the teacher does (default 0)")
    s.add_argument("--rename-tools", type=float, default=0.0, metavar="SHARE", help="new names for the tools "
                   "of this share of the kept trajectories, wherever they appear, so a name is read from the tool "
                   "list, not recalled (openk2/envs/rename.py; default 0)")
    s.add_argument("--tries", type=int, default=1, help="samples per task until one passes (rejection sampling)")
    s.add_argument("--teacher-slips", type=float, default=0.0, help="the share of episodes in which the "
                   "programmatic teacher errs once, as an LLM teacher does (wrong argument or tool, no call, no "
                   "retry, an answer without the values): the judge rejects them (default 0)")
    s.add_argument("--teacher-corrections", type=float, default=0.0, metavar="SHARE", help="the share of episodes "
                   "in which the programmatic teacher may make a call the tools refuse (a tool the task does not "
                   "declare, arguments against the schema) in one of its one-call rounds, then correct it; the "
                   "refused turn is written with weight 0 (not trained)")
    s.add_argument("--teacher-repeats", type=float, default=0.0, metavar="SHARE", help="the share of those "
                   "corrections that make the refused call a second time, the same, before the fix (as a model "
                   "in a loop does; both refused turns at weight 0; default 0)")
    s.add_argument("--teacher-endpoint", help="an OpenAI-compatible base URL (default: the programmatic oracle)")
    s.add_argument("--teacher-model", help="the endpoint's model (default: its first)")
    s.add_argument("--temperature", type=float, help="the LLM teacher's sampling temperature")
    s.add_argument("--max-tokens", type=int, default=1024, help="the LLM teacher's tokens per reply")
    s.add_argument("--tools", help="LLM-simulated tools instead of the worlds: an OpenAI `tools` list (JSON file)")
    s.add_argument("--mcp", action="append", default=[], metavar="SERVER", help="LLM-simulated tools with the "
                   "schemas of this MCP server (a command line or an http(s)://…/mcp URL; repeatable)")
    s.add_argument("--sim-endpoint", help="the LLM that writes the tasks, plays the user and simulates the "
                   "tools of --tools/--mcp (default: the teacher's endpoint)")
    s.add_argument("--sim-model", help="the simulator endpoint's model (default: its first)")
    s.add_argument("--judge", choices=["rubric", "llm", "both"], help="default: rubric for the worlds, llm for "
                   "--tools/--mcp")
    s.add_argument("--judge-endpoint", help="the LLM judge's base URL (default: the teacher's)")
    s.add_argument("--judge-model", help="the LLM judge's model (default: the endpoint's first)")
    s.add_argument("--system", default=SYSTEM, help="the system prompt of every conversation (default: the one "
                   "`openk2 eval tools` uses; '' for none)")
    s.add_argument("--workers", type=int, default=1, help="processes for the programmatic teacher")
    s.add_argument("--concurrency", type=int, default=8, help="episodes in flight against an endpoint")
    s.set_defaults(fn=main)


def names(text: str | None, known: list[str], what: str, joined: bool = False) -> list[str] | None:
    """The comma-separated names of `text`, each one of `known` (or, `joined`, several joined by +)."""
    items = [x.strip() for x in text.split(",") if x.strip()] if text else None
    if bad := [x for x in items or [] if not set(parts(x) if joined else [x]) <= set(known)]:
        raise SystemExit(f"unknown {what} {bad}; the {what}s are: {', '.join(known)}")
    return items


def open_tasks(args, sim, kinds) -> list:
    """`args.n` LLM-written tasks over the tools of --tools and --mcp; what the writer spoiled is said."""
    from tqdm import tqdm

    schemas = load_schemas(args.tools, args.mcp)
    domain = Path(args.tools).stem if args.tools and not args.mcp else "mcp" if not args.tools else "tools+mcp"
    with tqdm(total=args.n, desc="write tasks", unit="task", file=sys.stderr) as bar:
        tasks, dropped = write_tasks(LLMTaskWriter(sim), schemas, args.n, args.seed, kinds, domain,
                                     args.concurrency, bar.update)
    if dropped:
        print(f"writer: {sum(dropped.values())} of {args.n} tasks unusable: "
              + ", ".join(f"{k} {v}" for k, v in dropped.most_common()), file=sys.stderr)
    if not tasks:
        raise ValueError("the task writer gave no usable task (reasons above): check --sim-endpoint and its model")
    return tasks


def main(args) -> None:
    from tqdm import tqdm

    from openk2.agent.client import OpenAIClient

    worlds = names(args.worlds, domain_names(), "world", joined=True)
    kinds = names(args.kinds, list(KINDS + MORE_KINDS), "kind")
    if args.pairs:
        if len(worlds or domain_names()) < 2 or any("+" in w for w in worlds or []):
            raise SystemExit("--pairs merges every two of two or more single --worlds")
        worlds, kinds = pairs(worlds or domain_names()), kinds or list(MIXED_KINDS)
    if args.no_failures:
        if kinds and "recovery" in kinds:
            raise SystemExit("--no-failures leaves no `recovery` task: drop it from --kinds")
        kinds = [k for k in kinds or KINDS if k != "recovery"]
    extra = {"copy": (args.drills, drills), "tool": (args.tool_drills, tool_drills),  # appended to the data
             "list": (args.list_drills, list_drills), "sum": (args.sum_drills, sum_drills)}
    if min(args.n, args.tries, args.workers, args.concurrency) < 1 or min(n for n, _ in extra.values()) < 0:
        raise SystemExit("--n, --tries, --workers and --concurrency must be at least 1, --drills, --tool-drills, "
                         "--list-drills and --sum-drills at least 0")
    if not 0 <= args.rename_tools <= 1:
        raise SystemExit("--rename-tools is a share in [0, 1]")
    for flag, share in (("--teacher-slips", args.teacher_slips), ("--teacher-corrections", args.teacher_corrections),
                        ("--teacher-repeats", args.teacher_repeats)):
        if not 0 <= share <= 1 or share and args.teacher_endpoint:
            raise SystemExit(f"{flag} is a share in [0, 1], for the programmatic teacher only")
    open_tools = bool(args.tools or args.mcp)
    judge_kind = args.judge or ("llm" if open_tools else "rubric")
    endpoint = args.judge_endpoint or args.teacher_endpoint
    if open_tools:
        why = ("the programmatic teacher solves only the built-in worlds: give --teacher-endpoint"
               if not args.teacher_endpoint else "--worlds and --split choose among the built-in worlds"
               if args.worlds or args.split else "only the LLM judge can grade LLM-written tasks"
               if judge_kind != "llm" else None)
        if why:
            raise SystemExit(f"--tools/--mcp: {why}")
    if judge_kind != "rubric" and not endpoint:
        raise SystemExit(f"--judge {judge_kind} needs --judge-endpoint (or --teacher-endpoint)")
    client = args.teacher_endpoint and OpenAIClient(args.teacher_endpoint, args.teacher_model)
    judge = endpoint and judge_kind != "rubric" and LLMJudge(OpenAIClient(endpoint, args.judge_model))
    sim = open_tools and OpenAIClient(args.sim_endpoint or args.teacher_endpoint, args.sim_model)
    try:
        if open_tools:
            tasks = open_tasks(args, sim, kinds)
        else:
            [load(w) for w in worlds or []]
            tasks = pick_tasks(args.n, args.seed, worlds, kinds, args.split, args.part)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    with tqdm(total=len(tasks), desc="synth", unit="task", file=sys.stderr) as bar:
        records = synthesize(tasks, args.seed, workers=args.workers, concurrency=args.concurrency, client=client,
                             progress=bar.update, slips=args.teacher_slips,
                             corrections=args.teacher_corrections, repeats=args.teacher_repeats,
                             tries=args.tries, judge=judge_kind,
                             llm_judge=judge or None, system=args.system or None, temperature=args.temperature,
                             max_tokens=args.max_tokens, sim=sim or None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = rename_share([r for r in records if r["meta"]["passed"] or args.keep_failed], args.rename_tools,
                        args.seed)
    with out.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                     for r in kept + [d for n, make in extra.values() for d in make(n, args.seed)])
    print(summary(records))
    renamed, corrected = (sum(key in r["meta"] for r in kept) for key in ("renamed", "corrected"))
    print(f"wrote {len(kept)} trajectories" + f" ({renamed} with renamed tools)" * bool(renamed)
          + f" ({corrected} with a corrected call)" * bool(corrected)
          + "".join(f" and {n} {kind} drills" for kind, (n, _) in extra.items() if n) + f" to {out}")
