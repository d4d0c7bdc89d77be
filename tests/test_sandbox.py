"""The code sandbox (openk2/agent/sandbox.py, jail.py): what runs inside sees the workspace and nothing
else of the machine, has no network and no secrets, and whatever it does (connect, fork-bomb, allocate,
spin, sleep, flood stdout) ends with a clear result while the caller keeps running. Isolation tests
skip where this machine cannot make namespaces; the refusal mode is tested everywhere."""

import asyncio
import socket
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

import openk2
from openk2.agent.sandbox import Limits, Sandbox, cgroup_parent

SMALL = Limits(wall_s=10, cpu_s=5, memory_mb=512, processes=32, output_bytes=2000)


def isolated(workspace: Path, **limits) -> Sandbox:
    """A sandbox with namespaces, or a skip saying why this machine has none."""
    sandbox = Sandbox(workspace, replace(SMALL, **limits))
    if reason := sandbox.isolation_error():
        pytest.skip(f"no namespaces here: {reason}")
    return sandbox


def python(sandbox: Sandbox, code: str):
    return asyncio.run(sandbox.run([sys.executable, "-"], code.encode()))


def test_python_runs_in_the_workspace(tmp_path):
    run = python(isolated(tmp_path), "import os\nprint('cwd', os.getcwd())\nopen('out.txt', 'w').write('made inside')")
    assert run.exit_code == 0 and run.notes == [], run.text()
    assert run.stdout == f"cwd {tmp_path.resolve()}\n"
    assert (tmp_path / "out.txt").read_text() == "made inside"
    assert run.text() == f"cwd {tmp_path.resolve()}\n[exit code 0]"


def test_no_network(tmp_path):
    sandbox = isolated(tmp_path)
    with socket.socket() as server:  # listening outside the sandbox, on the machine's loopback
        server.bind(("127.0.0.1", 0))
        server.listen()
        for host, port in [("1.1.1.1", 80), ("127.0.0.1", server.getsockname()[1])]:
            run = python(sandbox, f"import socket\nsocket.create_connection(({host!r}, {port}), timeout=3)")
            assert run.exit_code == 1, run.text()
            assert "Network is unreachable" in run.stderr, run.text()


def test_nothing_outside_the_workspace_is_visible(tmp_path_factory):
    workspace, elsewhere = tmp_path_factory.mktemp("ws"), tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "secret.txt").write_text("outside")
    home = Path.home()
    # the home directory may hold this Python (pyenv): those paths are bound read-only, nothing else of it
    python_dirs = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix)]
    home_files = [p for p in home.iterdir() if not any(d.is_relative_to(p) for d in python_dirs)][:20]
    hidden = [elsewhere / "secret.txt", Path("/etc/passwd"), Path(openk2.__file__).resolve(), *home_files]
    code = (f"import os, sys\nfor p in {[str(p) for p in hidden]!r}:\n    print(p, os.path.exists(p))\n"
            "try:\n    open(sys.prefix + '/written', 'w')\nexcept OSError as e:\n    print('prefix', e.strerror)\n"
            "import openk2")
    run = python(isolated(workspace), code)
    assert [line.split()[-1] for line in run.stdout.splitlines()[:-1]] == ["False"] * len(hidden), run.text()
    assert run.stdout.splitlines()[-1] == "prefix Read-only file system"
    assert "No module named 'openk2'" in run.stderr and run.exit_code == 1


def live_processes(marker: str) -> list[int]:
    """Pids of the processes whose command line holds `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("argv", [
    [sys.executable, "-c", "import os\n# MARKER\nwhile True:\n    os.fork()"],
    ["/bin/sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 60 # MARKER"],
])
def test_fork_bomb_is_stopped(tmp_path, argv):
    sandbox = isolated(tmp_path, wall_s=3, processes=32)
    if "processes NOT limited" in sandbox.describe():
        pytest.skip("root without a writable pids cgroup: nothing here would bound a fork bomb")
    marker = f"bomb-{uuid.uuid4().hex}"
    start = time.monotonic()
    run = asyncio.run(sandbox.run([a.replace("MARKER", marker) for a in argv]))
    assert time.monotonic() - start < 10
    assert "process limit of 32 reached" in run.notes, run.text()
    assert live_processes(marker) == [], "processes of the bomb survived the run"
    if cgroups := cgroup_parent():
        assert not list(cgroups.glob("openk2-sandbox-*")), "the run's cgroup was not removed"
    assert python(sandbox, "print('still fine')").stdout == "still fine\n"


def test_memory_limit(tmp_path):
    run = python(isolated(tmp_path, memory_mb=256), "x = bytearray(100 * 1024**2)\nprint('100 MB ok')\n"
                                                    "y = bytearray(2 * 1024**3)")
    assert run.stdout == "100 MB ok\n" and run.exit_code == 1
    assert "MemoryError" in run.stderr, run.text()


def test_cpu_and_wall_clock_limits(tmp_path):
    start = time.monotonic()
    spin = python(isolated(tmp_path, cpu_s=1), "while True:\n    pass")
    assert time.monotonic() - start < 6
    assert spin.notes == ["killed: CPU-time limit of 1 s"], spin.text()
    start = time.monotonic()
    sleep = python(isolated(tmp_path, wall_s=1.5), "import time\nprint('going to sleep')\ntime.sleep(100)")
    assert time.monotonic() - start < 5
    assert sleep.notes == ["killed: wall-clock limit of 1.5 s"]
    assert sleep.text() == "going to sleep\n[signal 9 (Killed); killed: wall-clock limit of 1.5 s]"


def test_output_is_capped_and_a_flood_does_not_hang(tmp_path):
    sandbox = isolated(tmp_path, output_bytes=1000, wall_s=20)
    run = python(sandbox, "import sys\nprint('x' * 5000)\nprint('e' * 10, file=sys.stderr)")
    assert run.stdout == "x" * 1000 and run.stderr == "e" * 10 + "\n"
    assert run.notes == ["stdout truncated to 1000 bytes"] and run.exit_code == 0
    start = time.monotonic()
    flood = python(sandbox, "import sys\nfor _ in range(50):\n    sys.stdout.write('y' * 2**20)\n"
                            "print('done', file=sys.stderr)")  # 50 MB
    assert time.monotonic() - start < 15
    assert flood.exit_code == 0 and flood.stderr == "done\n" and len(flood.stdout) == 1000


def test_environment_is_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret-key-123")
    run = python(isolated(tmp_path), "import os\nprint(dict(os.environ))")
    assert "secret-key-123" not in run.stdout and "OPENAI_API_KEY" not in run.stdout
    assert f"'HOME': '{tmp_path.resolve()}'" in run.stdout


def test_refusal_without_namespaces_and_the_unsafe_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret-key-123")
    # what a machine without user namespaces says
    monkeypatch.setattr(Sandbox, "isolation_error", lambda self: "unshare: Operation not permitted")
    refusing = Sandbox(tmp_path, SMALL)
    run_python = {t.name: t for t in refusing.tools()}["run_python"]
    text = asyncio.run(run_python.invoke({"code": "open('ran.txt', 'w').write('yes')"}))
    assert text.startswith("refused: code execution is disabled: this machine cannot isolate the sandbox "
                           "(unshare: Operation not permitted); start the agent with --unsafe-sandbox"), text
    assert not (tmp_path / "ran.txt").exists()
    assert "code execution is refused" in run_python.description

    unsafe = Sandbox(tmp_path, SMALL, unsafe=True)
    run = python(unsafe, "import os\nopen('ran.txt', 'w').write('yes')\n"
                         "print(os.getcwd(), 'OPENAI_API_KEY' in os.environ)")
    assert run.stdout == f"{tmp_path.resolve()} False\n" and (tmp_path / "ran.txt").read_text() == "yes"
    assert "UNSAFE" in unsafe.describe()
    spin = python(Sandbox(tmp_path, Limits(cpu_s=1, wall_s=5), unsafe=True), "while True:\n    pass")
    assert spin.notes == ["killed: CPU-time limit of 1 s"], spin.text()


def test_shell_tool_and_schemas(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    sandbox = isolated(tmp_path)
    tools = {t.name: t for t in sandbox.tools()}
    assert sorted(tools) == ["run_python", "run_shell"]
    for name, param in [("run_python", "code"), ("run_shell", "command")]:
        t = tools[name]
        assert t.needs_approval and t.timeout > sandbox.limits.wall_s
        assert t.parameters["required"] == [param] and list(t.parameters["properties"]) == [param]
        assert t.schema()["function"]["name"] == name and "no network" in t.description
    text = asyncio.run(tools["run_shell"].invoke({"command": "echo hi; ls; exit 3"}))
    assert text == "hi\nnotes.txt\n[exit code 3]"
    with pytest.raises(ValueError):
        asyncio.run(tools["run_shell"].invoke({"cmd": "ls"}))
