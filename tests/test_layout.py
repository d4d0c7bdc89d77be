"""Layout rules of ../shared/DESIGN.md and STYLE.md, enforced: import directions, line budgets,
a light core import."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "openk2"
BUDGETS = {  # per-file ceilings (STYLE.md "A starting layout")
    "config.py": 250, "cli.py": 230, "model/norm.py": 40, "model/rope.py": 120, "model/attention.py": 300,
    "model/moe.py": 300, "model/transformer.py": 250, "model/linear.py": 130, "model/rows.py": 50,
    "model/expert_loop.py": 150, "model/head_loss.py": 110, "model/kept.py": 40,
    "checkpoint/hf.py": 325,
    "engine/sampler.py": 100,
    "engine/generate.py": 100, "engine/engine.py": 330, "engine/kv_cache.py": 200, "engine/decode.py": 300,
    "tokenizer/tokenizer.py": 260, "tokenizer/toolcalls.py": 330, "data/corpus.py": 200, "data/loader.py": 200,
    "optim/muon.py": 370, "optim/groups.py": 60, "optim/qk_clip.py": 120, "optim/schedule.py": 80, "train/loop.py": 360,
    "quant/__init__.py": 200, "quant/int8.py": 200, "quant/int4.py": 100, "quant/int4_decode.py": 200,
    "quant/fp8.py": 200,
    "server/protocol.py": 250, "server/app.py": 300,
    "server/engine_loop.py": 165, "server/detokenizer.py": 80, "server/extra.py": 150, "server/metrics.py": 80,
    "server/chat_format.py": 190, "server/constrain.py": 220, "server/guard.py": 80, "tokenizer/protect.py": 115,
    "checkpoint/state.py": 200, "tokenizer/reasoning.py": 150, "server/logprobs.py": 150,
    "agent/runtime.py": 250, "agent/episode.py": 100, "agent/client.py": 250, "agent/tools.py": 150,
    "agent/schema.py": 100,
    "agent/compact.py": 120, "agent/files.py": 150, "agent/sandbox.py": 175, "agent/jail.py": 150,
    "agent/subagents.py": 60, "agent/search.py": 60, "agent/mcp.py": 150, "agent/builtin.py": 40, "agent/cli.py": 155,
    "envs/__init__.py": 60, "envs/expr.py": 80, "envs/spec.py": 165, "envs/world.py": 235, "envs/tasks.py": 275,
    "envs/rubric.py": 160, "envs/oracle.py": 175, "envs/splits.py": 110, "envs/judge.py": 150, "envs/synth.py": 320,
    "envs/evaluate.py": 290, "envs/teacher.py": 250, "envs/play.py": 60, "envs/simulated.py": 275,
    "agent/terminal.py": 180, "tokenizer/sft.py": 165, "data/packing.py": 200, "train/sft.py": 200,
    "train/budget.py": 90,
    "sampling.py": 45, "rl/objective.py": 100, "rl/rollout.py": 200, "rl/rewards.py": 150, "rl/config.py": 120,
    "rl/loop.py": 300, "train/plot.py": 130, "pipeline.py": 200, "offload/store.py": 180, "offload/cache.py": 245,
    "offload/experts.py": 150, "parallel/ep.py": 210, "kernels/__init__.py": 145,
    "checkpoint/sharded.py": 130, "parallel/training.py": 150,
}
# package -> openk2 packages it must not import
FORBIDDEN = {
    # quantization is a transform from outside: the model reads quantized weights through one face
    "model": ["openk2.engine", "openk2.tokenizer", "openk2.server", "openk2.checkpoint", "openk2.optim",
              "openk2.train", "openk2.data", "openk2.quant", "openk2.offload", "openk2.kernels", "torch.distributed"],
    # the engine reads quantized weights through the linears' face (openk2.model.linear), never a format
    "engine": ["openk2.tokenizer", "openk2.server", "openk2.train", "openk2.quant", "openk2.checkpoint",
               "openk2.offload"],
    # quantization formats and module swaps: checkpoint load/save uses them, never the other way round
    "quant": ["openk2.checkpoint", "openk2.engine", "openk2.tokenizer", "openk2.server", "openk2.train",
              "openk2.agent", "openk2.cli", "torch.distributed"],
    "tokenizer": ["openk2.model", "openk2.engine"],
    # CPU kernels register into the model's kernel table (openk2.model.linear) and know nothing above it
    "kernels": ["openk2.engine", "openk2.quant", "openk2.checkpoint", "openk2.server", "openk2.train",
                "openk2.offload", "openk2.agent", "openk2.cli"],
    # the agent reaches a model through a client: HTTP, or the server's own chat layer in process
    "agent": ["torch", "openk2.model", "openk2.engine", "openk2.checkpoint", "openk2.quant", "openk2.train",
              "openk2.optim", "openk2.data", "openk2.cli"],
    "server": ["openk2.agent", "openk2.train", "openk2.cli", "openk2.offload"],
    # tool worlds and tasks: pure Python over the agent's Tool (data for SFT, eval and RL)
    "envs": ["torch", "openk2.model", "openk2.engine", "openk2.server", "openk2.checkpoint", "openk2.train",
             "openk2.cli"],
    # RL composes the others (engine, agent loop, worlds, trainer); only the command line composes RL
    "rl": ["openk2.cli"],
    # expert offload: a loader and a drop-in experts module over the checkpoint reader; the engine, the
    # server and the model never import it (they see a model, and its `expert_cache` by duck typing)
    "offload": ["openk2.engine", "openk2.server", "openk2.agent", "openk2.train", "openk2.cli", "openk2.rl"],
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_directions(package):
    for path in sorted((ROOT / package).glob("*.py")):
        bad = [m for m in _imports(path) for f in FORBIDDEN[package] if m == f or m.startswith(f + ".")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_line_budgets():
    over = {name: n for name, limit in BUDGETS.items()
            if (ROOT / name).exists() and (n := len((ROOT / name).read_text().splitlines())) > limit}
    assert not over, f"over budget: {over}"


def test_an_engine_is_built_from_its_config():
    """`Engine(model, config)`: every knob of the engine is an `EngineConfig` field, none a keyword."""
    import inspect

    from openk2.engine import Engine, EngineConfig
    params = inspect.signature(Engine.__init__).parameters
    assert list(params) == ["self", "model", "config"] and params["config"].annotation in (EngineConfig, "EngineConfig")


def test_one_decode_path():
    """Decoding token by token is the Engine's alone: nowhere else in openk2 is a decode cache built, a
    decode step compiled or decode kernels chosen (`generate` submits Engine requests)."""
    engine_only = {"new_cache", "CompiledDecode", "decode_step", "decode_kernels", "BlockPool"}
    home = {"engine/engine.py", "engine/decode.py", "engine/kv_cache.py", "model/transformer.py"}
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in home:
            continue
        tree = ast.parse(path.read_text())
        used = ({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
                | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
                | {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names})
        assert not used & engine_only, f"{path.relative_to(ROOT)} decodes on its own: {used & engine_only}"


def test_the_way_back_from_the_engine_is_typed():
    """The server and the in-process agent client read a request's result off its `Run`
    (engine_loop.py), never out of a dict by "completion_tokens", "reason" or "request"."""
    keys = {"completion_tokens", "reason", "finish_reason", "request"}
    for path in sorted([*(ROOT / "server").glob("*.py"), ROOT / "agent" / "client.py"]):
        read = {n.slice.value for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant)}
        assert not read & keys, f"{path.relative_to(ROOT)} reads a result out of a dict: {read & keys}"


def _bound_numbers(tree: ast.AST):
    """(name, number) for every number bound to a name (either branch of a conditional too): keyword
    arguments, parameter and field defaults, argparse flags' defaults (`add_argument("--top-p", default=1.0)`)."""
    for node in ast.walk(tree):
        pairs = []
        if isinstance(node, ast.keyword):
            pairs = [(node.arg, node.value)]
        elif isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            pairs = [*zip([a.arg for a in positional[len(positional) - len(node.defaults):]], node.defaults),
                     *zip([a.arg for a in node.kwonlyargs], node.kw_defaults)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            pairs = [(node.target.id, node.value)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).startswith("--"):
            pairs = [(node.args[0].value[2:].replace("-", "_"), k.value) for k in node.keywords if k.arg == "default"]
        for name, value in pairs:
            for v in (value.body, value.orelse) if isinstance(value, ast.IfExp) else (value,):
                if isinstance(v, ast.Constant) and type(v.value) in (int, float):
                    yield name, v.value


def test_sampling_defaults_are_named_once():
    """A default temperature, top-p or top-k is a name from openk2/sampling.py (each defined once, with
    its reason), never a number written where it is used."""
    for path in sorted(ROOT.rglob("*.py")):
        if path != ROOT / "sampling.py":
            bad = [(n, v) for n, v in _bound_numbers(ast.parse(path.read_text()))
                   if n and any(k in n for k in ("temperature", "top_p", "top_k"))]
            assert not bad, f"{path.relative_to(ROOT)}: {bad} (name it in openk2/sampling.py)"
def test_quant_formats_have_one_owner():
    """FP8 blocks, INT4 groups, int8 rows: each format's (de)quantise and (un)pack functions are defined
    in openk2/quant only; checkpoint load/save and the module swaps both call them."""
    fmt = re.compile(r"^_?(de|un)?(quant|quantize|pack)_(fp|int)\d")
    stray = [f"{path.relative_to(ROOT)}:{node.name}" for path in sorted(ROOT.rglob("*.py"))
             if path.parent.name != "quant" for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef) and fmt.match(node.name)]
    assert not stray, stray


def _dotted(node) -> str:
    return f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")


def _switches_backend(node) -> bool:
    """An assignment to a torch.backends attribute, or a call of `torch.backends.*.flags`,
    `torch._C._set_*` or `setattr(torch.backends.*, ...)`."""
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(_dotted(t).startswith("torch.backends.") for t in targets)
    if isinstance(node, ast.Call):
        name = _dotted(node.func)
        return (name.startswith("torch._C._set_") or name.startswith("torch.backends.") and name.endswith(".flags")
                or name == "setattr" and bool(node.args) and _dotted(node.args[0]).startswith("torch.backends"))
    return False


def test_no_backend_flag_is_switched():
    """torch.backends flags are process-wide: one thread's switch changes every other thread's kernels,
    and inductor reads them once per process. openk2 sets none, but for one measured exception: oneDNN
    off during one- and two-row eager decode steps (`engine/decode.py` `_OneDNNOff`: ~2x an eager bf16
    step on CPU, and ATen offers no per-call choice between its own bf16 kernel and oneDNN's)."""
    found = {f"{path.relative_to(ROOT).as_posix()}:{getattr(top, 'name', '<module>')}"
             for path in sorted(ROOT.rglob("*.py")) for top in ast.parse(path.read_text()).body
             for node in ast.walk(top) if _switches_backend(node)}
    assert found <= {"engine/decode.py:_OneDNNOff"}, found


def test_core_import_is_light():
    code = ("import sys, openk2, openk2.model, openk2.checkpoint, openk2.engine; "
            "print(sorted(m for m in ('transformers', 'fastapi', 'datasets', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_jail_needs_only_the_standard_library():
    """jail.py runs as `python -I -S jail.py`, before any sandbox exists: no site-packages, no openk2."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    mods = {m.split(".")[0] for m in _imports(ROOT / "agent" / "jail.py")}
    assert mods <= stdlib, mods - stdlib


def test_the_command_line_starts_without_torch():
    """`openk2 --help` and `openk2 envs list` answer at once: building every subcommand's parser loads
    no torch (each command imports what it runs)."""
    code = ("import contextlib, io, sys, openk2.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    openk2.cli.main(['envs', 'list'])\n"
            "print(sorted(m for m in ('torch', 'tqdm', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
