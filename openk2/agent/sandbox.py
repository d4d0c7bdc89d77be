"""Code execution for the agent: `Sandbox.run` and the `run_python` / `run_shell` tools built on it.

Commands run through jail.py in fresh user, mount, network, pid, IPC and UTS namespaces (no network; the
workspace read-write as cwd, the rest read-only; a clean environment) under rlimits, pids and memory cgroups
where writable, a wall-clock timeout and an output cap. Without namespaces `run` refuses, unless `unsafe=True`
(--unsafe-sandbox): same limits, no isolation. Not here: mounts (jail.py), seccomp, GPUs, approval (CLI)."""

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from subprocess import PIPE
from typing import Annotated

from openk2.agent.tools import Tool, tool


@dataclass(frozen=True)
class Limits:
    wall_s: float = 30.0
    cpu_s: int = 30
    memory_mb: int = 1024  # per process (RLIMIT_AS: address space, reserved counts too); per run with a cgroup
    processes: int = 64  # threads count too
    output_bytes: int = 20_000  # per stream: what the model sees
    file_mb: int = 64  # the largest file written, and the size of the private /tmp


@dataclass
class Run:
    exit_code: int | None  # None: nothing ran; negative: killed by that signal
    stdout: str = ""
    stderr: str = ""
    notes: list[str] = field(default_factory=list)  # limits hit, truncation, refusal

    def text(self) -> str:
        """What the model reads: stdout, a [stderr] part, then one status line."""
        if (c := self.exit_code) is None:  # nothing ran: the notes say why
            return "\n".join(self.notes)
        status = [f"exit code {c}" if c >= 0 else f"signal {-c} ({signal.strsignal(-c)})"]
        parts = [self.stdout, self.stderr and f"[stderr]\n{self.stderr}", f"[{'; '.join(status + self.notes)}]"]
        return "\n".join(p.rstrip("\n") for p in parts if p)


def read(directory: Path, name: str) -> str:
    with contextlib.suppress(OSError):  # no such file
        return (directory / name).read_text()
    return ""


def cgroup_parent(controller: str = "pids") -> Path | None:
    """A writable cgroup to make a child per run in: cgroup v1's tree for `controller`, else v2's if delegated."""
    for _, controllers, own in (line.split(":", 2) for line in read(Path("/proc/self"), "cgroup").splitlines()):
        v1, v2 = controller in controllers.split(","), not controllers  # v2 needs it in subtree_control
        path = Path(f"/sys/fs/cgroup/{controller}" if v1 else "/sys/fs/cgroup", own[1:])
        if (v1 or v2 and controller in read(path, "cgroup.subtree_control").split()) and os.access(path, os.W_OK):
            return path
    return None


def strip_setid(workspace: Path) -> None:
    """Clear the setuid and setgid bits of the workspace's files. O_NOFOLLOW: never a planted link's target."""
    for path in (os.path.join(top, name) for top, _, names in os.walk(workspace) for name in names):
        with contextlib.suppress(OSError):  # lstat all, open the few flagged: cheap
            if stat.S_ISREG(mode := os.lstat(path).st_mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb", buffering=0) as f:
                    os.fchmod(f.fileno(), stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))


class Sandbox:
    """Runs commands confined to `workspace`; one per agent, reused across calls."""
    def __init__(self, workspace: str | Path, limits: Limits = Limits(), unsafe: bool = False):
        self.workspace, self.limits, self.unsafe = Path(workspace).resolve(), limits, unsafe
        self._isolation = None if sys.platform == "linux" else "namespaces are Linux-only"
        self._cgroups = {c: p for c in ("pids", "memory") if (p := cgroup_parent(c))}  # parents; one on v2
        self._jail = {"workspace": str(self.workspace), "binds": [sys.base_prefix, sys.prefix], **asdict(limits)}
        for stale in (c for p in {*self._cgroups.values()} for c in p.glob("openk2-sandbox-*")):
            with contextlib.suppress(OSError):  # left by an agent killed mid-run; rmdir takes only empty ones,
                if time.time() - stale.stat().st_mtime > 60:  # and a young one may be a run's not yet joined
                    stale.rmdir()

    def isolation_error(self) -> str | None:
        """None if namespaces work here, else a one-line reason; probed once, by running `true`."""
        if self._isolation is None:  # not probed yet; "" once they are known to work
            try:
                with tempfile.TemporaryDirectory(prefix="openk2-jail-") as root:
                    p = subprocess.run(self._launcher(["true"], root), capture_output=True, text=True, timeout=10)
                self._isolation = "" if p.returncode == 0 else (p.stderr.splitlines() or [f"exit {p.returncode}"])[-1]
            except (OSError, subprocess.SubprocessError) as e:  # no Python to launch, a probe that hangs
                self._isolation = f"the probe failed: {e}"
        return self._isolation or None

    def _launcher(self, argv: list[str], root: str | None, cgroups: set[Path] = frozenset()) -> list[str]:
        config = {**self._jail, "argv": argv, "root": root, "cgroups": [*map(str, cgroups)], "parent": os.getpid()}
        return [sys.executable, "-I", "-S", str(Path(__file__).with_name("jail.py")), json.dumps(config)]

    async def run(self, argv: list[str], stdin: bytes | None = None) -> Run:
        """Run `argv` confined; what the command does (fail, hang, fork, allocate) never raises here."""
        if (error := await asyncio.to_thread(self.isolation_error)) and not self.unsafe:  # unsafe: isolated if it can
            return Run(None, notes=[f"refused: code execution is disabled: this machine cannot isolate the sandbox "
                                    f"({error}); start the agent with --unsafe-sandbox to run code without isolation"])
        lim, cap, out, err, notes = self.limits, self.limits.output_bytes, bytearray(), bytearray(), []
        cgroups = {p / f"openk2-sandbox-{os.urandom(8).hex()}" for p in {*self._cgroups.values()}}  # made by jail

        async def drain(stream: asyncio.StreamReader, kept: bytearray) -> None:
            while chunk := await stream.read(1 << 16):  # read on past the cap: a full pipe would block the child
                kept += chunk[: cap + 1 - len(kept)]  # the byte past the cap marks a truncation

        with tempfile.TemporaryDirectory(prefix="openk2-jail-") as root:  # jail.py mounts the sandbox's / here
            proc = await asyncio.create_subprocess_exec(*self._launcher(argv, None if error else root, cgroups),
                                                        stdin=PIPE, stdout=PIPE, stderr=PIPE, start_new_session=True)
            tasks = [asyncio.ensure_future(x) for x in (drain(proc.stdout, out), drain(proc.stderr, err), proc.wait())]
            try:
                proc.stdin.write(stdin or b"")  # asyncio buffers it; the command need not read it
                proc.stdin.close()
                if (await asyncio.wait(tasks, timeout=lim.wall_s))[1]:  # still pending: out of time
                    notes.append(f"killed: wall-clock limit of {lim.wall_s:g} s")
            finally:
                forks_refused = any(read(c, "pids.events").split()[1:2] not in ([], ["0"]) for c in cgroups)  # "max N"
                await self._reap(proc, cgroups)
                await asyncio.wait(tasks, timeout=2)  # without a cgroup, an escaped process may hold a pipe open
                for task in tasks:
                    task.cancel()
        if os.getuid() == 0:  # then files made inside are root's: a setuid one would serve any local user
            await asyncio.to_thread(strip_setid, self.workspace)
        notes += [f"killed: CPU-time limit of {lim.cpu_s} s"] * (proc.returncode == -signal.SIGXCPU)
        notes += [f"process limit of {lim.processes} reached"] * forks_refused
        notes += [f"{name} truncated to {cap} bytes" for name, b in (("stdout", out), ("stderr", err)) if len(b) > cap]
        return Run(proc.returncode, *(b[:cap].decode(errors="replace") for b in (out, err)), notes)

    async def _reap(self, proc: asyncio.subprocess.Process, cgroups: set[Path]) -> None:
        """SIGKILL the process group and the cgroups (setsid leaves one, not the other), even after a normal exit,
        and remove the cgroups: retry, as a fork bomb may still be forking."""
        for _ in range(100):
            for pid in [-proc.pid, *(int(pid) for c in cgroups for pid in read(c, "cgroup.procs").split())]:
                with contextlib.suppress(OSError):  # -pid: the process group
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):  # rmdir fails while a process is left
                for cgroup in (c for c in cgroups if c.exists()):
                    cgroup.rmdir()
                return
            await asyncio.sleep(0.02)

    def describe(self) -> str:
        """What is enforced, in a line: for the CLI, and for the model after the tools' descriptions."""
        if (error := self.isolation_error()) and not self.unsafe:
            return f"Sandbox unavailable ({error}): code execution is refused."
        lim, limited = self.limits, "pids" in self._cgroups or (os.getuid() and not error)  # root ignores NPROC
        where = (f"UNSAFE, not isolated: {error}" if error else
                 "no network; the machine read-only and mostly hidden; the workspace and a private /tmp writable")
        memory = f"{lim.memory_mb} MB memory {'in all' if 'memory' in self._cgroups else 'per process'}"
        return (f"Sandbox ({where}), cwd {self.workspace}. Limits per call: {lim.wall_s:g} s wall clock, "
                f"{lim.cpu_s} s CPU, {memory}, {f'{lim.processes} processes' if limited else 'processes NOT limited'}, "
                f"{lim.file_mb} MB per file, {lim.output_bytes} bytes of output per stream.")

    def tools(self) -> list[Tool]:
        """`run_python` and `run_shell` on this sandbox; both need the user's approval."""
        @tool(needs_approval=True, timeout=self.limits.wall_s + 10)  # the sandbox's own timeout comes first
        async def run_python(code: Annotated[str, "the whole program; print what you want to see"]) -> str:
            """Run a Python program (the same Python and packages as the agent) and return its output."""
            return (await self.run([sys.executable, "-"], code.encode())).text()

        @tool(needs_approval=True, timeout=self.limits.wall_s + 10)
        async def run_shell(command: Annotated[str, "a /bin/sh command line"]) -> str:
            """Run a shell command and return its output."""
            return (await self.run(["/bin/sh", "-c", command])).text()

        return [replace(t, description=f"{t.description}\n{self.describe()}") for t in (run_python, run_shell)]
