"""Tool worlds and tasks with rubrics, the ground agentic data synthesis and evaluation stand on.

- spec.py: declarative domain specs (domains/*.json: entities, generators, operations of generic kinds)
- world.py: `World(domain, seed, failures)`: seeded state, the operations as agent `Tool`s, failures
- tasks.py: `make_task`, `generate`: single, parallel, chain, multi-turn, recovery and no-tool tasks
- rubric.py: `Rubric.check(final_state, answer, calls) -> (passed, reasons)`
- oracle.py: the plan's programmatic solver (a `ScriptedClient` teacher) and the scripted user
- splits.py: splits by seed, argument values, unseen tool combinations, unseen domain
- judge.py, synth.py: trajectories for SFT, a teacher in the agent loop and a judge (`openk2 synth`)
- evaluate.py: `openk2 eval tools`: the agent on held-out tasks, scored per split part and task kind
Pure Python over openk2.agent's `Tool`: no torch, no model.
"""

from openk2.envs.oracle import Oracle, ScriptedUser
from openk2.envs.rubric import Rubric, answers_of, calls_of
from openk2.envs.spec import domain_names, load
from openk2.envs.splits import SPLITS, split
from openk2.envs.tasks import KINDS, Task, generate, make_task
from openk2.envs.world import World


def describe() -> str:
    """One block per domain: its description, record counts and tools (`openk2 envs list`)."""
    out = []
    for name in domain_names():
        spec, world = load(name), World(name)
        counts = ", ".join(f"{len(r)} {e}" for e, r in world.state.items())
        out.append(f"{name}: {spec['description']} ({counts})")
        out += [f"  {t.name}({', '.join(t.parameters['properties'])}): {t.description}" for t in world.tools()]
    return "\n".join(out)


def add_parsers(sub, load=None) -> None:
    """`openk2 envs list` (the CLI's other parsers take `load`; the worlds need no model)."""
    s = sub.add_parser("envs", help="the tool worlds of agentic data and evaluation: `openk2 envs list`")
    s.add_argument("action", choices=["list"])
    s.set_defaults(fn=lambda args: print(describe()))
    from openk2.envs.synth import add_parser as synth_parser  # `openk2 synth`
    synth_parser(sub)
    from openk2.envs.evaluate import add_parser as eval_parser  # `eval tools`
    eval_parser(sub, load)


__all__ = ["KINDS", "SPLITS", "Oracle", "Rubric", "ScriptedUser", "Task", "World", "add_parsers", "answers_of",
           "calls_of", "describe", "domain_names", "generate", "load", "make_task", "split"]
