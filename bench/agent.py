"""The agent loop's cost: (1) its own overhead per turn, without a model; (2) N episodes at once on one
in-process Engine (continuous batching) against the same N run one after another.

(1) A client that returns ready-made completions at once drives `Agent` through 0, 1 and 4 tool calls
per turn (an async tool, and sync tools, which run on worker threads); µs per turn is the loop's
own work: messages, argument parsing and schema checks, the concurrent calls, the bookkeeping.
(2) A model with random weights (byte-level text) behind `EngineClient`; each episode is a three-turn
conversation (a scripted user follows up twice), every reply `--reply` tokens long (greedy). The
engine steps on the main thread, the episodes run on an asyncio loop on another (as `openk2 agent`
does), so one OpenMP pool does all the math.

    .venv/bin/python -m bench.agent [--preset k2-small] [--episodes 8] [--threads 2]
"""

import argparse
import asyncio
import statistics
import threading
import time

import torch

from bench.forward import machine_line
from openk2.agent.client import Completion, EngineClient
from openk2.agent.runtime import Agent, Budget
from openk2.agent.tools import tool
from openk2.config import PRESETS
from openk2.engine import Engine, EngineConfig
from openk2.model import build_model
from openk2.sampling import GREEDY
from openk2.server.chat_format import ChatFormat
from openk2.server.engine_loop import EngineLoop


@tool
async def ping(n: int) -> str:
    """Returns n."""
    return str(n)


@tool
def ping_sync(n: int) -> str:
    """Returns n, from a worker thread."""
    return str(n)


class InstantClient:
    """Completions made in advance: the model costs nothing, so what is timed is the loop."""
    name, context_window = "instant", None

    def __init__(self, tool_name: str, calls: int, turns: int):
        call = [{"id": f"functions.{tool_name}:{i}", "type": "function",
                 "function": {"name": tool_name, "arguments": f'{{"n": {i}}}'}} for i in range(calls)]
        message = {"role": "assistant", "content": "thinking", **({"tool_calls": call} if calls else {})}
        self.replies = [Completion(message, "tool_calls" if calls else "stop", 10, 5)] * turns

    async def complete(self, messages, tools=None, **kw) -> Completion:
        return self.replies.pop()


async def follow_up(ep):
    users = sum(m["role"] == "user" for m in ep.context)
    return "Tell me more." if users < 3 else None


def loop_overhead(turns: int = 2000) -> list[tuple[str, float]]:
    rows = []
    cases = [("answer, no calls", "ping", 0), ("1 call (async tool)", "ping", 1),
             ("4 parallel calls (async)", "ping", 4), ("4 parallel calls (sync, threads)", "ping_sync", 4)]
    for label, name, calls in cases:
        times = []
        for _ in range(3):
            client = InstantClient(name, calls, turns)
            user = (lambda ep: asyncio.sleep(0, "again")) if not calls else None  # answers continue the episode
            agent = Agent(client, [ping, ping_sync], budget=Budget(max_turns=turns), user=user)
            start = time.perf_counter()
            ep = asyncio.run(agent.run("go"))
            times.append((time.perf_counter() - start) / len(ep.turns) * 1e6)
        rows.append((label, statistics.median(times)))
    return rows


def episodes(model, n: int, reply: int, concurrent: bool) -> tuple[float, int]:
    """(seconds, generated tokens) of n three-turn episodes, together or one by one."""
    loop, done, out = EngineLoop(Engine(model, EngineConfig(max_batch=max(n, 1)))), threading.Event(), {}
    client = EngineClient(loop, ChatFormat.for_model(model), name="bench")

    async def run_all():
        make = lambda: Agent(client, [], temperature=GREEDY, user=follow_up, budget=Budget(turn_tokens=reply))  # noqa: E731
        if concurrent:
            return await asyncio.gather(*(make().run(f"Episode {i}: say something.") for i in range(n)))
        return [await make().run(f"Episode {i}: say something.") for i in range(n)]

    def agents():
        start = time.perf_counter()
        try:
            out["eps"] = asyncio.run(run_all())
        finally:
            out["s"] = time.perf_counter() - start
            done.set()

    threading.Thread(target=agents).start()
    loop.run_here(keep_going=lambda: not done.is_set())
    return out["s"], sum(ep.completion_tokens for ep in out["eps"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k2-small", choices=sorted(PRESETS))
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--reply", type=int, default=32, help="tokens per model reply")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    print("\n(1) loop overhead per turn, no model (median of 3 episodes of 2000 turns)\n")
    print("| turn | µs per turn |\n|---|---:|")
    for label, us in loop_overhead():
        print(f"| {label} | {us:.0f} |")
    model = build_model(PRESETS[args.preset], dtype=torch.bfloat16, seed=0).eval()
    episodes(model, 1, 4, True)  # warm-up: first-call allocations, kernels
    print(f"\n(2) {args.episodes} three-turn episodes on one Engine ({args.preset}, bf16, eager, "
          f"{args.reply}-token replies)\n")
    print("| episodes | wall s | generated tokens | tok/s |\n|---|---:|---:|---:|")
    rates = {}
    for concurrent in (False, True):
        seconds, tokens = episodes(model, args.episodes, args.reply, concurrent)
        rates[concurrent] = tokens / seconds
        label = "concurrent" if concurrent else "one by one"
        print(f"| {label} | {seconds:.2f} | {tokens} | {rates[concurrent]:.1f} |")
    print(f"\nconcurrent / one by one: {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
