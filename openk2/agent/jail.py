"""The sandbox launcher: `python -I -S jail.py CONFIG_JSON` runs one command confined (see sandbox.py).

Stdlib only, as it runs before anything is confined (it must not import openk2). It dies with the agent,
makes and joins the run's cgroups, unshares user, mount, network, pid, IPC and UTS namespaces, mounts a tmpfs
root holding the system and Python read-only, the workspace read-write (nosuid) at its own path, a private
/tmp and a /proc with the machine-wide knobs frozen or hidden, chroots there, sets rlimits and execs the
command with a clean environment; with "root": null (no namespaces here) it skips the namespaces and mounts.
Exits 125 if the setup failed, 127 if the command was not found. Not here: output, timeouts (sandbox.py); seccomp.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import warnings  # noqa: F401  os.execvpe imports it lazily, and after the chroot there may be no stdlib

# CLONE_NEWUSER, NEWNS, NEWNET, NEWPID, and NEWIPC, NEWUTS: SysV shm and the hostname are the machine's otherwise
NAMESPACES = 0x10000000 | 0x20000 | 0x40000000 | 0x20000000 | 0x08000000 | 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 262144
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYSTEM = ["/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc/ld.so.cache", "/etc/alternatives"]
DEVICES = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
# ref: runc's readonlyPaths and maskedPaths. The command's uid outside is root's if the agent is root: it could
# write /proc/sys/kernel/core_pattern (then a crash runs a workspace file as host root) or /proc/sysrq-trigger
PROC_READ_ONLY = ["sys", "sysrq-trigger", "irq", "bus", "fs", "asound"]
PROC_HIDDEN = ["kcore", "keys", "timer_list", "sched_debug", "latency_stats", "acpi", "scsi"]
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def call(result: int, what: str) -> None:
    if result != 0:
        raise OSError(err := ctypes.get_errno(), f"{what}: {os.strerror(err)}")


def enter_namespaces(libc, cpu_s: int) -> None:
    """Unshare, map our uid to 1000 inside, and fork: only the child, pid 1 of the new namespace, returns."""
    uid, gid = os.getuid(), os.getgid()
    call(libc.unshare(NAMESPACES), "unshare")
    # NOTE: uid 1000 inside, not 0, so the command's exec drops every capability and cannot undo the mounts.
    # Outside it is still our uid, root's if the agent is root: it may write any root-owned file it can see
    for name, text in ("setgroups", "deny"), ("uid_map", f"1000 {uid} 1"), ("gid_map", f"1000 {gid} 1"):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    if (pid := os.fork()) == 0:  # killing the launcher (the wall-clock timeout) ends pid 1 and the namespace
        return call(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    _, status, usage = os.wait4(pid, 0)
    if (code := os.waitstatus_to_exitcode(status)) >= 0:
        sys.exit(code)
    sig = signal.Signals(-code)
    if sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime >= cpu_s:
        sig = signal.SIGXCPU  # pid 1 ignores SIGXCPU, so the CPU limit ends it with the hard limit's SIGKILL
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig != signal.SIGKILL:  # the memory cgroup's OOM killer, or a `kill -9`: no handler to reset
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)  # die the same way, so the caller reads the signal in our status


def build_root(libc, cfg: dict) -> None:
    """Mount the sandbox's view of the machine on a tmpfs at cfg["root"] and chroot there."""
    def mount(src, dst, fstype, flags, data=None):
        args = [s.encode() if s else None for s in (src, dst, fstype, data)]
        call(libc.mount(*args[:3], ctypes.c_ulong(flags), args[3]), f"mount {dst}")

    root, kinds = cfg["root"], {"/tmp": "tmpfs", "/proc": "proc", **dict.fromkeys(DEVICES, "dev")}
    kinds |= {p: "ro" for p in SYSTEM + cfg["binds"] if os.path.exists(p)} | {cfg["workspace"]: "rw"}
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates back to the machine
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path in sorted(kinds, key=lambda p: p.rstrip("/").count("/")):  # parents first: a workspace in /tmp
        dst, source, kind = root + path, os.path.realpath(path), kinds[path]
        if kind in ("tmpfs", "proc") or os.path.isdir(source):
            os.makedirs(dst, exist_ok=True)
        else:  # a file is bound over an empty one
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        if kind in ("tmpfs", "proc"):  # a fresh /proc shows only the new pid namespace
            mount(kind, dst, kind, MS_NOSUID | MS_NODEV, f"size={cfg['file_mb']}m" if kind == "tmpfs" else None)
        else:
            mount(source, dst, None, MS_BIND | MS_REC)
        if kind in ("ro", "rw"):  # add nosuid, nodev; keep the source's flags, which a user namespace may not clear
            kept = os.statvfs(source).f_flag & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            mount(None, dst, None, MS_BIND | MS_REMOUNT | kept | MS_NOSUID | MS_NODEV | MS_RDONLY * (kind == "ro"))
    for name in PROC_READ_ONLY + PROC_HIDDEN:  # after the fresh /proc: see PROC_READ_ONLY
        if not os.path.exists(path := f"{root}/proc/{name}"):
            continue
        if name in PROC_HIDDEN and os.path.isdir(path):  # hidden: an empty read-only tmpfs over it
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
        else:  # the entry itself (or, hidden, /dev/null) bound over it read-only
            mount("/dev/null" if name in PROC_HIDDEN else path, path, None, MS_BIND)
            mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)


def set_limits(cfg: dict) -> None:
    def limit(kind, soft, hard=None):
        old = resource.getrlimit(kind)[1]  # a hard limit can only be lowered; -1 is unlimited
        resource.setrlimit(kind, tuple(v if old < 0 else min(v, old) for v in (soft, soft if hard is None else hard)))

    limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU, then SIGKILL a second later
    limit(resource.RLIMIT_AS, cfg["memory_mb"] << 20)
    limit(resource.RLIMIT_FSIZE, cfg["file_mb"] << 20)
    limit(resource.RLIMIT_CORE, 0)
    if cfg["root"]:  # counted per user namespace; outside one it would count all of the user's processes
        limit(resource.RLIMIT_NPROC, cfg["processes"])


def join_cgroups(cfg: dict) -> None:
    """Make the run's cgroups (v1: a pids and a memory one; v2: one for both), limit them and join them."""
    mem = cfg["memory_mb"] << 20  # v1's memsw and v2's swap.max: no swapping past the limit either
    for cgroup in cfg["cgroups"]:
        os.mkdir(cgroup)
        for name, value in [("pids.max", cfg["processes"]), ("memory.max", mem), ("memory.swap.max", 0),
                            ("memory.limit_in_bytes", mem), ("memory.memsw.limit_in_bytes", mem),
                            ("cgroup.procs", os.getpid())]:  # v2's files, v1's, then join
            if os.path.exists(f"{cgroup}/{name}"):
                with open(f"{cgroup}/{name}", "w") as f:
                    f.write(str(value))


def main(cfg: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # NOTE: die with the agent (strictly, with the thread that started us), not outlive it as init's child
    call(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")  # kept across the exec in unsafe mode
    if os.getppid() != cfg["parent"]:  # the agent died before the prctl
        sys.exit(125)
    join_cgroups(cfg)  # before unshare, while we may still write to the machine's cgroup tree
    if cfg["root"]:
        enter_namespaces(libc, cfg["cpu_s"])
        build_root(libc, cfg)
    call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    os.chdir(cfg["workspace"])
    set_limits(cfg)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these, and exec would keep them ignored
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvpe(cfg["argv"][0], cfg["argv"], {**ENV, "HOME": cfg["workspace"]})
    except OSError as e:
        sys.stderr.write(f"sandbox: {cfg['argv'][0]}: {e.strerror}\n")
        sys.exit(127)


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except OSError as e:
        sys.stderr.write(f"sandbox setup failed: {e}\n")
        sys.exit(125)
