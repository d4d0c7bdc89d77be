"""One episode of a task in the agent loop, and many at once: what synthesis, evaluation and RL
rollouts share. An episode runs the real `Agent` on the task's world (its injected failures, the
toolset the task offers) with the scripted user asking the task's follow-ups; many run concurrently,
at most `concurrency` at a time (an in-process engine batches them)."""

from __future__ import annotations

import asyncio

from openk2.envs.oracle import ScriptedUser
from openk2.envs.tasks import SYSTEM


async def play(task, client, *, system: str | None = SYSTEM, budget=None, temperature: float | None = None,
               seed: int | None = None, world=None, user=None):
    """(world, episode): `client` solving `task` from a fresh world (or `world`: an LLM-simulated one)
    with the task's scripted user (or `user`); budget None: the Agent's default."""
    from openk2.agent.runtime import Agent, Budget

    world = world or task.world()
    agent = Agent(client, world.tools(task.tools), system=system, budget=budget or Budget(), temperature=temperature,
                  seed=seed, user=user or ScriptedUser(task))
    return world, await agent.run(task.turns[0])


async def gather_limited(items, run, concurrency: int, progress=None) -> list:
    """[await run(x) for x in items], at most `concurrency` at once, in order; progress(1) after each."""
    gate = asyncio.Semaphore(concurrency)

    async def one(x):
        async with gate:
            out = await run(x)
        progress and progress(1)
        return out

    return list(await asyncio.gather(*(one(x) for x in items)))
