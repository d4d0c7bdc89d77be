"""The code sandbox (openk2/agent/sandbox.py, jail.py): what runs inside sees the workspace and nothing
else of the machine, has no network and no secrets, and whatever it does (connect, fork-bomb, allocate,
spin, sleep, flood stdout) ends with a clear result while the caller keeps running. Isolation tests
skip where this machine cannot make namespaces; the refusal mode is tested everywhere."""

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
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
def test_fork_bomb_is_stopped(tmp_path, argv, monkeypatch):
    sandbox = isolated(tmp_path, wall_s=3, processes=32)
    if "processes NOT limited" in sandbox.describe():
        pytest.skip("root without a writable pids cgroup: nothing here would bound a fork bomb")
    marker, cgroups, launcher = f"bomb-{uuid.uuid4().hex}", [], Sandbox._launcher
    monkeypatch.setattr(Sandbox, "_launcher", lambda self, argv, root, groups=(): cgroups.extend(groups)
                        or launcher(self, argv, root, groups))  # the run's cgroups, to check they are gone
    start = time.monotonic()
    run = asyncio.run(sandbox.run([a.replace("MARKER", marker) for a in argv]))
    assert time.monotonic() - start < 10
    assert "process limit of 32 reached" in run.notes, run.text()
    assert live_processes(marker) == [], "processes of the bomb survived the run"
    assert cgroups and not any(c.exists() for c in cgroups), "the run's cgroups were not removed"
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
    assert "UNSAFE, not isolated: unshare: Operation not permitted" in unsafe.describe()
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


def test_unsafe_mode_still_isolates_where_namespaces_work(tmp_path_factory):
    """--unsafe-sandbox means "without isolation where it is unavailable", not "without isolation"."""
    workspace, elsewhere = tmp_path_factory.mktemp("ws"), tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "secret.txt").write_text("outside")
    unsafe = Sandbox(workspace, SMALL, unsafe=True)
    if reason := unsafe.isolation_error():
        pytest.skip(f"no namespaces here: {reason}")
    run = python(unsafe, f"import os\nprint(os.path.exists({str(elsewhere / 'secret.txt')!r}))")
    assert run.stdout == "False\n", run.text()
    assert "UNSAFE" not in unsafe.describe() and "no network" in unsafe.describe()


def test_machine_wide_proc_files_are_read_only_or_hidden(tmp_path):
    """Inside, our uid is root's when the agent is root: /proc/sys and friends must still refuse writes.
    Files are only opened for writing, never written (writing /proc/sysrq-trigger could reboot the host)."""
    sandbox = isolated(tmp_path)
    writable = [p for p in ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches",
                            "/proc/sysrq-trigger"] if os.path.exists(p)]
    hidden = [p for p in ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/acpi",
                          "/proc/scsi"] if os.path.exists(p)]
    code = f"""import os
for p in {writable!r}:  # opened for writing and closed at once: nothing is written
    try:
        os.close(os.open(p, os.O_WRONLY))
        print(p, "opened")
    except OSError as e:
        print(p, e.errno)
for p in {hidden!r}:  # an empty directory, or a file that reads as nothing or not at all
    try:
        print(p, len(os.listdir(p) if os.path.isdir(p) else open(p, "rb").read()))
    except OSError:
        print(p, 0)
"""
    run = python(sandbox, code)
    results = dict(line.rsplit(" ", 1) for line in run.stdout.splitlines())
    assert list(results) == writable + hidden, run.text()
    refusals = {str(errno.EROFS), str(errno.EACCES), str(errno.EPERM)}
    assert all(results[path] in refusals for path in writable), results
    assert all(results[path] == "0" for path in hidden), results


def test_ipc_and_hostname_are_private(tmp_path):
    sandbox = isolated(tmp_path)
    run = python(sandbox, "import os\nprint(os.readlink('/proc/self/ns/uts'), os.readlink('/proc/self/ns/ipc'))")
    inside = run.stdout.split()
    outside = [os.readlink(f"/proc/self/ns/{ns}") for ns in ("uts", "ipc")]
    assert len(inside) == 2 and inside[0] != outside[0] and inside[1] != outside[1], run.text()
    if not (shutil.which("ipcmk") and shutil.which("ipcs") and shutil.which("ipcrm")):
        pytest.skip("no ipcmk/ipcs/ipcrm here to make a SysV segment with")
    made = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"ipcmk failed: {made.stderr.strip()}")
    shmid = made.stdout.split()[-1]
    try:
        host = subprocess.run(["ipcs", "-m"], capture_output=True, text=True, check=True).stdout
        assert shmid in [line.split()[1] for line in host.splitlines() if line.startswith("0x")]
        run = asyncio.run(sandbox.run(["ipcs", "-m"]))
        assert run.exit_code == 0, run.text()
        assert shmid not in [line.split()[1] for line in run.stdout.splitlines() if line.startswith("0x")], run.stdout
    finally:
        subprocess.run(["ipcrm", "-m", shmid], capture_output=True, check=False)


def test_setuid_bits_do_not_outlive_the_run(tmp_path_factory):
    """As root, files made inside are root's on the machine: no setuid/setgid bit may stay on them, and
    the workspace is mounted nosuid meanwhile. A link to a setuid file elsewhere is left alone."""
    if os.getuid() != 0:
        pytest.skip("only a root agent leaves root-owned files")
    workspace, elsewhere = tmp_path_factory.mktemp("ws"), tmp_path_factory.mktemp("elsewhere")
    outside = elsewhere / "tool"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o4755)
    (workspace / "link").symlink_to(outside)
    code = ("import os\nos.makedirs('sub')\nfor name, mode in [('suid', 0o4755), ('sub/sgid', 0o2750)]:\n"
            "    open(name, 'w').write('#!/bin/sh\\n')\n    os.chmod(name, mode)\n"
            "    print(oct(os.stat(name).st_mode & 0o7777))\nprint(bool(os.statvfs('.').f_flag & os.ST_NOSUID))")
    run = python(isolated(workspace), code)
    assert run.stdout == "0o4755\n0o2750\nTrue\n", run.text()  # the bits were set inside
    assert stat.S_IMODE((workspace / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((workspace / "sub" / "sgid").stat().st_mode) == 0o750
    assert stat.S_IMODE(outside.stat().st_mode) == 0o4755


@pytest.mark.parametrize("namespaces", [True, False])
def test_killing_the_agent_ends_the_run(tmp_path, namespaces):
    """SIGKILL the agent mid-run: the launcher dies with it (PR_SET_PDEATHSIG), and with the launcher the
    namespace, or (without namespaces) the command, which kept the death signal across its exec."""
    if namespaces:
        isolated(tmp_path)
    marker = f"orphan-{uuid.uuid4().hex}"
    command = [sys.executable, "-c", f"open('started', 'w').close()\nimport time\ntime.sleep(60)  # {marker}"]
    agent = ("import asyncio\nfrom openk2.agent.sandbox import Sandbox\nlauncher = Sandbox._launcher\n"
             "Sandbox._launcher = lambda self, argv, root, cgroups=(): print(*cgroups, flush=True) or "
             "launcher(self, argv, root, cgroups)\n"  # tells us the run's cgroups, left behind: see below
             + ("" if namespaces else "Sandbox.isolation_error = lambda self: 'none here'\n")
             + f"asyncio.run(Sandbox({str(tmp_path)!r}, unsafe=True).run({command!r}))")
    proc = subprocess.Popen([sys.executable, "-c", agent], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)
        assert live_processes(marker), "the command's process is not visible"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while live_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_processes(marker) == [], "the run outlived its agent"
    finally:
        proc.kill()
        for pid in live_processes(marker):
            os.kill(pid, signal.SIGKILL)
        cgroups = proc.communicate()[0].split()  # left behind: a later Sandbox would remove them after 60 s
        for cgroup in cgroups:
            with contextlib.suppress(OSError):
                Path(cgroup).rmdir()
    assert cgroups or not cgroup_parent(), "the run's cgroups were not reported"


def test_stale_cgroups_are_removed(tmp_path):
    """An agent killed mid-run leaves its run's empty cgroup behind: the next Sandbox removes it, once it is
    old enough not to be a live run's that its launcher has not joined yet."""
    if not (parent := cgroup_parent()):
        pytest.skip("no writable pids cgroup here")
    stale, young = (parent / f"openk2-sandbox-test-{uuid.uuid4().hex}" for _ in range(2))
    try:
        stale.mkdir()
        young.mkdir()
        os.utime(stale, (time.time() - 120,) * 2)
        Sandbox(tmp_path, SMALL)
        assert not stale.exists() and young.exists()
    finally:
        for cgroup in (stale, young):
            if cgroup.exists():
                cgroup.rmdir()


def test_memory_limit_holds_for_all_processes_together(tmp_path, monkeypatch):
    """RLIMIT_AS bounds each process; a memory cgroup, where writable, bounds the run: two processes each
    touching 60% of the limit cannot both hold it."""
    sandbox = isolated(tmp_path, memory_mb=256, wall_s=20)
    if not cgroup_parent("memory"):
        assert "256 MB memory per process" in sandbox.describe()
        pytest.skip("no writable memory cgroup here")
    assert "256 MB memory in all" in sandbox.describe()
    code = ("import os, time\npid = os.fork()\nheld = b'x' * (154 << 20)\ntime.sleep(1)\n"
            "if pid:\n    print('child', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")
    run = python(sandbox, code)
    assert run.stdout == "child -9\n" or run.exit_code == -signal.SIGKILL, run.text()  # one of them was killed
    alone = python(sandbox, "held = b'x' * (154 << 20)\nprint('fine alone')")
    assert alone.stdout == "fine alone\n", alone.text()
    monkeypatch.setattr("openk2.agent.sandbox.cgroup_parent", lambda controller="pids": None)
    assert "256 MB memory per process" in Sandbox(tmp_path, replace(SMALL, memory_mb=256)).describe()
