"""The one way generated code runs: a contained `python -I` subprocess.

Layers, each covering what the others cannot:
- a fresh empty temp dir as cwd and HOME, a minimal environment (no parent variables), `python -I -B`;
- rlimits (CPU seconds, address space, file size, open files, processes, no core dumps);
- when we are root: its own unused uid per run, so RLIMIT_NPROC (not enforced for root) contains a fork bomb,
  the kernel refuses `/proc/<pid>/environ` of other users, and after the run every process of that uid is
  killed (including any that escaped the process group);
- its own network namespace when the kernel lets us make one (probed once), so there is no network at all;
- when the interpreter lives under a directory the sandbox uid cannot enter (a pyenv under /root, mode 0700),
  a private mount namespace with a tmpfs over that directory holding only the interpreter's tree, so the
  candidate sees nothing else there;
- an audit hook installed by a trusted bootstrap before the candidate's first line: blocks sockets, writes and
  deletes outside the temp dir, `/proc/*/environ`, starting other programs and ctypes. Audit hooks cannot be
  removed, but they are a tripwire, not a wall: the uid, rlimits and namespace are the walls;
- a wall timeout that SIGKILLs the whole process group (`start_new_session`).

Bad outcomes are results (`ok=False` with a `reason`), never exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "run_python_async", "network_isolation", "isolation"]

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
_UID_BASE, _UID_COUNT = 610_000, 4096  # unused uids, one per concurrent run; nothing else on the host owns them
_UID_LOCKS = Path(tempfile.gettempdir()) / "slmshift-sandbox-uids"
_VIOLATION = "SandboxViolation"


class SandboxLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_s: float = Field(default=10.0, gt=0, description="Wall-clock timeout; the process group is then killed.")
    cpu_s: int = Field(default=5, ge=1, description="RLIMIT_CPU in seconds.")
    memory_mb: int = Field(default=1024, ge=64, description="RLIMIT_AS (address space) in MiB.")
    file_mb: int = Field(default=16, ge=1, description="RLIMIT_FSIZE in MiB; also caps captured stdout/stderr.")
    nproc: int = Field(default=16, ge=1, description="Processes (and threads) the run may have at once.")
    nofile: int = Field(default=64, ge=16, description="RLIMIT_NOFILE.")
    output_chars: int = Field(default=8000, ge=100, description="Tail of stdout/stderr kept in the result.")


class SandboxResult(BaseModel):
    ok: bool = Field(description="Exit status 0 within every limit.")
    returncode: int | None
    reason: str = Field(description="'ok', or why the run failed, in one line.")
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    timed_out: bool = False


# The bootstrap runs as the interpreter's first code (`-c`): apply limits while still privileged, enter the
# network namespace, drop to the sandbox uid, install the audit hook, then run the candidate as __main__.
_BOOTSTRAP = r'''
import ast, os, resource, sys
_cfg = ast.literal_eval(sys.argv[1])
for _name, _v in _cfg["rlimits"].items():
    # CPU: soft below hard, so SIGXCPU (a clear reason) comes before SIGKILL
    resource.setrlimit(getattr(resource, _name), (_v, _v + 1 if _name == "RLIMIT_CPU" else _v))
if _cfg["unshare"]:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)

    def _ok(r, what):
        if r != 0:
            sys.exit("sandbox: " + what + " failed: " + os.strerror(ctypes.get_errno()))

    _ok(_libc.unshare(_cfg["unshare"]), "unshare")
    if _cfg["expose"]:
        # A private mount namespace: a tmpfs over each directory the sandbox uid cannot traverse (e.g. /root),
        # holding only the interpreter's own tree bound back in. Hides the rest, so a secret there stays unseen.
        _ok(_libc.mount(None, b"/", None, 16384 | (1 << 18), None), "making mounts private")
        for _top, _targets in _cfg["expose"]:
            _staged = []
            for _i, _t in enumerate(_targets):
                _s = os.path.join(_cfg["stage"], str(_i))
                os.mkdir(_s)
                _ok(_libc.mount(_t.encode(), _s.encode(), None, 4096 | 16384, None), "binding " + _t)
                _staged.append((_s, _t))
            _ok(_libc.mount(b"tmpfs", _top.encode(), b"tmpfs", 0, b"mode=0755,size=64k"), "tmpfs on " + _top)
            for _s, _t in _staged:
                os.makedirs(_t)
                _ok(_libc.mount(_s.encode(), _t.encode(), None, 8192, None), "moving " + _t)
    del _libc, ctypes
    for _m in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
        del sys.modules[_m]  # so the candidate's `import ctypes` is a real import, which the hook sees
if _cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(_cfg["gid"])
    os.setuid(_cfg["uid"])
_root = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

class SandboxViolation(PermissionError):
    pass

def _inside(p):
    if isinstance(p, int):
        return True  # an already-open descriptor: it was checked when opened
    try:
        p = os.fsdecode(p)
    except TypeError:
        return False
    real = os.path.realpath(os.path.join(_root, p))
    return real == _root or real.startswith(_root + os.sep)

def _deny(what):
    raise SandboxViolation(what)

_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                "os.link", "os.symlink", "os.rename", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
_BLOCKED = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
            "os.kill", "os.killpg", "ctypes.", "pty.", "sys._current_frames")

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes)):
            p = os.fsdecode(path)
            if p.startswith("/proc/") and p.rstrip("/").rsplit("/", 1)[-1] in ("environ", "mem", "maps"):
                _deny("reading " + p + " is not allowed")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE)
            if writing and not _inside(p):
                _deny("writing " + p + " outside the sandbox directory")
    elif event in _PATH_EVENTS:
        for p in args[:2]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                _deny(event + " on " + os.fsdecode(p) + " outside the sandbox directory")
    elif event == "import" and args[0] in ("ctypes", "_ctypes"):
        _deny("importing ctypes is not allowed")
    elif event.startswith(_BLOCKED):
        _deny(event + " is not allowed")

sys.dont_write_bytecode = True
del _cfg, _name, _v, ast
sys.addaudithook(_hook)
sys.argv = sys.argv[2:]
with open(sys.argv[0], "rb") as _f:  # compile + exec rather than runpy: its imports cost ~3 ms a run
    _code = compile(_f.read(), sys.argv[0], "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": __builtins__})
'''


def _exposures() -> list[tuple[str, list[str]]]:
    """Directories the interpreter needs that an unprivileged uid cannot reach: for each topmost
    non-traversable ancestor (e.g. /root, mode 0700), the interpreter trees below it."""
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, exe_dir)}
    needed |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    groups: dict[str, set[str]] = {}
    for target in needed:
        parts = Path(target).parts
        for k in range(1, len(parts)):
            anc = str(Path(*parts[:k]))
            if not os.stat(anc).st_mode & 0o001:
                groups.setdefault(anc, set()).add(target)
                break
    out = []
    for top, targets in sorted(groups.items()):
        # keep outermost targets only: a bind of /a/b already carries /a/b/c
        keep = sorted(t for t in targets if not any(t != o and t.startswith(o + os.sep) for o in targets))
        out.append((top, keep))
    return out


class _Plan(BaseModel):
    unshare: int = 0
    expose: list[tuple[str, list[str]]] = []
    drop_uid: bool = False
    note: str = ""


def _probe(plan: _Plan) -> bool:
    r = _run("import json, hashlib, math, collections\nprint('ok')", SandboxLimits(wall_s=15, cpu_s=10), plan)
    return r.ok and r.stdout.strip() == "ok"


@functools.cache
def isolation() -> _Plan:
    """What this host allows, probed once per process, strongest first: own uid + network namespace (+ a
    mount namespace when the interpreter lives under a directory the uid cannot enter), then weaker ones.
    Without root an unprivileged user namespace may still give a private network."""
    root = os.geteuid() == 0
    expose = _exposures() if root else []
    tries = [_Plan(unshare=_CLONE_NEWNET | (_CLONE_NEWNS if expose else 0), expose=expose, drop_uid=root)]
    if root:
        no_net = "no network namespace: sockets blocked by the audit hook only"
        if expose:
            tries.append(_Plan(unshare=_CLONE_NEWNS, expose=expose, drop_uid=True, note=no_net))
        tries.append(_Plan(drop_uid=True, note=no_net))
        tries.append(_Plan(note="runs as root: process limit and uid separation unavailable"))
    else:
        tries = [_Plan(unshare=_CLONE_NEWUSER | _CLONE_NEWNET),
                 _Plan(note="no network namespace: sockets blocked by the audit hook only")]
    for plan in tries:
        if _probe(plan):
            return plan
    return tries[-1]


def network_isolation() -> bool:
    """True when sandboxed runs get their own, empty, network namespace."""
    return bool(isolation().unshare & _CLONE_NEWNET)


def _proc_uid(pid_dir: Path) -> int | None:
    """Real uid of a process. Not the owner of /proc/<pid>: a process that changed uid is non-dumpable, and
    its /proc entries then belong to root."""
    try:
        with open(pid_dir / "status", "rb") as f:
            status = f.read()
        return int(status.split(b"\nUid:", 1)[1].split(None, 1)[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid_dir: Path) -> bool:
    """False for zombies: dead, holding nothing but a pid slot until their (new) parent reaps them."""
    try:
        return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes_of(uid: int) -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir()
            if d.name.isdigit() and _proc_uid(d) == uid and _alive(d)]


def _kill_all(pgid: int, uid: int | None) -> None:
    if pgid > 0:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is None:
        return
    # Processes that left the group (setsid) still carry the run's uid; a fork bomb may race us, so repeat.
    for _ in range(50):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _exited_within(pid: int, seconds: float) -> bool:
    """Block until process `pid` exits (True) or `seconds` pass (False), without polling."""
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def _tail(path: Path, n: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * n))
            return f.read().decode("utf-8", "replace")[-n:]
    except OSError:
        return ""


def _reason(rc: int, stderr: str, timed_out: bool, limits: SandboxLimits) -> str:
    if timed_out:
        hit = f" (it kept hitting the process limit of {limits.nproc}: a fork bomb?)" \
            if "BlockingIOError" in stderr else ""
        return f"wall timeout: still running after {limits.wall_s:g} s; process group killed{hit}"
    if rc == 0:
        return "ok"
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    violation = next((ln for ln in reversed(lines) if _VIOLATION + ":" in ln), None)
    if violation:
        return "blocked by sandbox: " + violation.rsplit(_VIOLATION + ":", 1)[1].strip()
    if rc < 0:
        try:
            sig = signal.Signals(-rc)
        except ValueError:
            return f"killed by signal {-rc}"
        what = {signal.SIGXCPU: f"CPU time limit ({limits.cpu_s} s) exceeded",
                signal.SIGXFSZ: f"file size limit ({limits.file_mb} MiB) exceeded",
                signal.SIGKILL: f"killed (CPU limit of {limits.cpu_s} s or out of memory)",
                signal.SIGSEGV: "crashed (segmentation fault; often the memory limit)"}.get(sig)
        return what or f"killed by {sig.name}"
    if "MemoryError" in last:
        return f"memory limit ({limits.memory_mb} MiB) exceeded: MemoryError"
    if "File too large" in last:
        return f"file size limit ({limits.file_mb} MiB) exceeded: {last[:200]}"
    if "BlockingIOError" in stderr and "fork" in stderr:
        return f"process limit ({limits.nproc}) reached: {last[:200]}"
    if "Network is unreachable" in stderr or "Operation not permitted" in last:
        return "blocked by sandbox: " + last[:200]
    return f"exit status {rc}: {last[:300] or 'no error output'}"


@contextlib.contextmanager
def _lease_uid() -> Iterator[int]:
    """An unused uid held for one run, across every process on the host (team actors run sandboxes side by
    side): an flock on a per-uid file, which the kernel releases even if this process dies."""
    _UID_LOCKS.mkdir(mode=0o700, exist_ok=True)
    start = random.randrange(_UID_COUNT)
    for k in range(_UID_COUNT):
        uid = _UID_BASE + (start + k) % _UID_COUNT
        fd = os.open(_UID_LOCKS / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            # The file's byte says whether a run is in progress: "1" left behind means its process died mid-way
            # and may have left some of the uid's processes running. (Skipping the sweep otherwise saves a
            # /proc scan per run; every finished run has swept its own.)
            if os.pread(fd, 1, 0) == b"1":
                _kill_all(-1, uid)
            os.pwrite(fd, b"1", 0)
            yield uid
            os.pwrite(fd, b"0", 0)
        finally:
            os.close(fd)
        return
    raise OSError(f"all {_UID_COUNT} sandbox uids are busy")


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a Python program inside the sandbox and wait for it (blocking; see `run_python_async`)."""
    return _run(code, limits or SandboxLimits(), isolation())


def _run(code: str, limits: SandboxLimits, plan: _Plan) -> SandboxResult:
    if not plan.drop_uid:
        return _run_as(code, limits, plan, None)
    try:
        with _lease_uid() as uid:
            return _run_as(code, limits, plan, uid)
    except OSError as e:
        return SandboxResult(ok=False, returncode=None, reason=f"sandbox could not start: {e}")


def _run_as(code: str, limits: SandboxLimits, plan: _Plan, uid: int | None) -> SandboxResult:
    gid = None
    if uid is not None:
        gid = 65534  # nogroup
        nproc = limits.nproc
    else:  # RLIMIT_NPROC counts all of this user's processes: allow ours plus the run's share
        nproc = len(_processes_of(os.getuid())) + limits.nproc + 16
    mib = 1024 * 1024
    cfg = {"rlimits": {"RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": limits.memory_mb * mib,
                       "RLIMIT_FSIZE": limits.file_mb * mib, "RLIMIT_NOFILE": limits.nofile,
                       "RLIMIT_NPROC": nproc, "RLIMIT_CORE": 0},
           "unshare": plan.unshare, "expose": plan.expose, "uid": uid, "gid": gid}
    work = Path(tempfile.mkdtemp(prefix="slmshift-sbx-"))   # candidate's cwd (chowned to its uid)
    outs = Path(tempfile.mkdtemp(prefix="slmshift-sbx-out-"))  # captured output, never visible to it
    cfg["stage"] = str(outs)
    try:
        prog = work / "main.py"
        prog.write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, gid)
            os.chown(prog, uid, gid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        t0 = time.perf_counter()
        timed_out = False
        with (outs / "stdout").open("wb") as fo, (outs / "stderr").open("wb") as fe:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOTSTRAP, repr(cfg), str(prog)],
                                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True, close_fds=True)
            # wait on a pidfd, not wait(timeout=): that polls with sleeps of up to 50 ms, which dominated short
            # runs; a timer thread costs ~2 ms to start
            timed_out = not _exited_within(proc.pid, limits.wall_s)
            if timed_out:
                _kill_all(proc.pid, uid)
            rc = proc.wait()
            _kill_all(proc.pid, uid)  # children the candidate left behind
        wall = time.perf_counter() - t0
        stdout, stderr = _tail(outs / "stdout", limits.output_chars), _tail(outs / "stderr", limits.output_chars)
        reason = _reason(rc, stderr, timed_out, limits)
        return SandboxResult(ok=rc == 0 and not timed_out, returncode=rc, reason=reason, stdout=stdout,
                             stderr=stderr, wall_s=wall, timed_out=timed_out)
    except OSError as e:  # the host could not start the run: a failed run, not a crash of the caller
        return SandboxResult(ok=False, returncode=None, reason=f"sandbox could not start: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(outs, ignore_errors=True)


async def run_python_async(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """`run_python` off the event loop, so an actor's other episodes keep running meanwhile."""
    return await asyncio.to_thread(run_python, code, limits)
