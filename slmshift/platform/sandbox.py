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

Success needs a positive signal, never exit status alone: a run is `ok` only when the program (or, with
`run_tests`, the trusted tests) reached its last line, proven by a per-run random token that the bootstrap
writes to a pipe only the host reads. The token is never in the program text, argv, the environment or a
file, so `os._exit(0)`, `sys.exit(0)`, `raise SystemExit` or an `atexit` trick before the end is a failure.
`run_tests` goes further for grading: the code under test runs in a forked process of its own and the tests
call its functions over a pipe with plain data, so the code cannot exit the tests early, redefine `check`,
patch the tests' builtins or modules, return an object that equals everything, or see the tests at all.

Bad outcomes are results (`ok=False` with a `reason`), never exceptions.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import functools
import os
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "run_python_async", "run_tests", "run_tests_async",
           "network_isolation", "isolation"]

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
    ok: bool = Field(description="Reached the end (see `reached_end`) with exit status 0 within every limit.")
    reached_end: bool = Field(default=False, description="The program's last line (run_python) or the tests' "
                              "last line (run_tests) ran: the run's secret end marker came back.")
    returncode: int | None = Field(description="Exit status; negative: killed by that signal; None: no start.")
    reason: str = Field(description="'ok', or why the run failed, in one line.")
    stdout: str = Field(default="", description="Tail of standard output.")
    stderr: str = Field(default="", description="Tail of standard error.")
    wall_s: float = Field(default=0.0, description="Wall time of the run in seconds.")
    timed_out: bool = Field(default=False, description="Killed by the wall timeout.")


# The bootstrap runs as the interpreter's first code (`-c`): apply limits while still privileged, enter the
# network namespace, drop to the sandbox uid, install the audit hook, then run the program. It keeps nothing
# in its module globals that the program could use against it: the hook and its helpers live in a closure.
#
# Proof of completion: the host puts a fresh random token in a pipe (never in the program text, argv, the
# environment or a file). In `run` mode the bootstrap reads it into a value-stack temporary of its own frame
# (not a local: `f_locals` cannot show it; gc introspection is blocked) and writes it to the end-marker pipe
# only after the program's last statement returned. In `tests` mode the untrusted code runs in a forked child
# that closes both pipes before its first line; the parent runs only the trusted tests, calling the child's
# functions over pipes with plain data, and alone can write the token.
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
        for _g, (_top, _targets) in enumerate(_cfg["expose"]):
            _staged = []
            for _i, _t in enumerate(_targets):
                _s = os.path.join(_cfg["stage"], str(_g) + "-" + str(_i))  # made by the host, once
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


def _install_hook(root, hidden):
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "os.link", "os.symlink", "os.rename", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
    # gc introspection would reach the bootstrap's frames (and a token on their value stack)
    blocked = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
               "os.kill", "os.killpg", "ctypes.", "pty.", "sys._current_frames", "gc.get_objects",
               "gc.get_referrers", "gc.get_referents")
    realpath, join, fsdecode, sep = os.path.realpath, os.path.join, os.fsdecode, os.sep

    class SandboxViolation(PermissionError):
        pass

    SandboxViolation.__qualname__ = "SandboxViolation"

    def under(p, tops):
        real = realpath(join(root, p))
        return any(real == t or real.startswith(t + sep) for t in tops)

    def inside(p):
        if isinstance(p, int):
            return True  # an already-open descriptor: it was checked when opened
        try:
            return under(fsdecode(p), (root,))
        except TypeError:
            return False

    def deny(what):
        raise SandboxViolation(what)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)):
                p = fsdecode(path)
                if p.startswith("/proc/") and p.rstrip("/").rsplit("/", 1)[-1] in ("environ", "mem", "maps"):
                    deny("reading " + p + " is not allowed")
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write)
                if writing and not inside(p):
                    deny("writing " + p + " outside the sandbox directory")
                if hidden and under(p, hidden):
                    deny("reading " + p + " is not allowed (hidden from this run)")
        elif event in path_events:
            for p in args[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                    deny(event + " on " + fsdecode(p) + " outside the sandbox directory")
        elif event == "import" and args[0] in ("ctypes", "_ctypes"):
            deny("importing ctypes is not allowed")
        elif event.startswith(blocked):
            deny(event + " is not allowed")

    sys.addaudithook(hook)


_install_hook(os.path.realpath(os.getcwd()), tuple(_cfg["hide"]))
del _install_hook, _name, _v
sys.dont_write_bytecode = True
sys.set_int_max_str_digits(0)
sys.argv = sys.argv[2:]
_SECRET, _MARK, _FUNCS, _CAP = _cfg["secret_fd"], _cfg["mark_fd"], _cfg["functions"], _cfg["cap"]
del _cfg


def _take(fd):
    data = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    return data


def _code():
    with open(sys.argv[0], "rb") as f:  # compile + exec rather than runpy: its imports cost ~3 ms a run
        return compile(f.read(), sys.argv[0], "exec")


def _main_globals():
    return {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": __builtins__}


def _end(token, _ran):
    os.write(_MARK, token)


def _send(fd, data):
    data = len(data).to_bytes(8, "little") + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd, cap):
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                return None
            buf += chunk
        return buf

    head = exactly(8)
    if head is None:
        return None
    n = int.from_bytes(head, "little")
    if n > cap:
        raise ValueError("a reply of " + str(n) + " bytes is over the output limit")
    return exactly(n)


def _literal(x, depth=0):
    """Plain data as Python literal text, for ast.literal_eval on the trusted side."""
    t = type(x)
    if depth > 200:
        raise ValueError("the value is nested too deeply")
    if x is None or t in (bool, int, str, bytes, complex):
        return repr(x)
    if t is float:
        if x != x:
            raise ValueError("the function returned NaN")
        return repr(x) if x - x == 0 else ("1e999" if x > 0 else "-1e999")
    if t in (list, tuple, set, frozenset):
        items = [_literal(v, depth + 1) for v in x]
        if t is list:
            return "[" + ", ".join(items) + "]"
        if t is tuple:
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        return "{" + ", ".join(items) + "}" if items else "set()"
    if t is dict:
        return "{" + ", ".join(_literal(k, depth + 1) + ": " + _literal(v, depth + 1) for k, v in x.items()) + "}"
    raise TypeError("the function returned a " + t.__name__ + ", which is not plain data "
                    "(None, bool, int, float, complex, str, bytes, list, tuple, set, dict)")


def _flush():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


def _serve(rfd, wfd):
    """The untrusted side: load the code, then answer calls until the trusted side hangs up."""
    import marshal

    def failed(kind, e):
        try:
            sys.__excepthook__(type(e), e, e.__traceback__)
            return repr((kind, type(e).__name__, str(e)[:500]))
        except BaseException:
            return repr((kind, "Exception", "an exception that cannot be shown"))

    g = _main_globals()
    try:
        exec(_code(), g)
        hello = repr(("ready",))
    except BaseException as e:
        hello = failed("load-error", e)
    _send(wfd, hello.encode())
    while True:
        msg = _recv(rfd, 1 << 30)
        if msg is None:
            _flush()
            os._exit(0)
        try:
            name, args, kwargs = marshal.loads(msg)
            out = "('ok', " + _literal(g[name](*args, **kwargs)) + ")"
        except BaseException as e:
            out = failed("err", e)
        _send(wfd, out.encode())


def _tests(cap):
    """The trusted side: fork the code's process, then run the tests with its functions as proxies."""
    import builtins
    import marshal

    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(_SECRET)
        os.close(_MARK)
        os.close(req_w)
        os.close(resp_r)
        try:
            _serve(req_r, resp_w)
        finally:
            os._exit(1)
    os.close(req_r)
    os.close(resp_w)
    token, tests = _take(_SECRET).split(b"\n", 1)

    class CandidateError(Exception):
        """The code under test failed in a way that is not an ordinary exception of its own."""

    CandidateError.__qualname__ = "CandidateError"

    def died():
        import signal
        import time

        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            raise CandidateError("the code under test closed its channel in the middle of a call")
        if os.WIFSIGNALED(status):  # die the same way, so the run's reason names the limit it hit
            _flush()
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            signal.raise_signal(os.WTERMSIG(status))
        raise CandidateError("the code under test ended its own process (exit status "
                             + str(os.waitstatus_to_exitcode(status)) + ") before returning: an early exit "
                             "is a failure")

    def reply():
        data = _recv(resp_r, cap)
        if data is None:
            died()
        try:
            value = ast.literal_eval(data.decode("utf-8"))
            kind = value[0]
        except Exception:
            raise CandidateError("the code under test sent a malformed reply") from None
        if kind == "err":
            exc = getattr(builtins, str(value[1]), None)
            if isinstance(exc, type) and issubclass(exc, Exception):
                try:
                    err = exc(value[2])
                except Exception:
                    err = None
                if err is not None:
                    raise err
            raise CandidateError(str(value[1]) + ": " + str(value[2]))
        return kind, value

    hello = []

    def loaded():
        if not hello:
            kind, value = reply()
            if kind != "ready":
                raise CandidateError(("the code under test failed to load: " + str(value[1]) + ": "
                                     + str(value[2]))[:300])
            hello.append(True)

    def proxy(name):
        def call(*args, **kwargs):
            loaded()
            try:
                msg = marshal.dumps((name, args, kwargs))
            except ValueError:
                raise TypeError(name + "() takes only plain data when tested in the sandbox") from None
            _send(req_w, msg)
            kind, value = reply()
            if kind != "ok":
                raise CandidateError("the code under test sent a malformed reply")
            return value[1]

        call.__name__ = call.__qualname__ = name
        return call

    g = {"__name__": "__main__", "__file__": "tests.py", "__builtins__": builtins}
    g.update({n: proxy(n) for n in _FUNCS})
    exec(compile(tests, "tests.py", "exec"), g)
    loaded()  # the code must have loaded, even if the tests never called it
    os.close(req_w)
    os.write(_MARK, token)


if _FUNCS is None:
    # Arguments are evaluated in order: the token sits on this frame's value stack while the program runs.
    _end(_take(_SECRET), exec(_code(), _main_globals()))
else:
    _tests(_CAP)
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


def _status_uid(pid: str) -> int | None:
    """`_proc_uid` on raw syscalls: the sweep after every run reads every process's status (was ~20 ms a run
    with pathlib on a host of ~120 processes)."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
    except OSError:
        return None
    try:
        status = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    i = status.find(b"\nUid:")
    if i < 0:
        return None
    try:
        return int(status[i + 5:i + 64].split(None, 1)[0])
    except (ValueError, IndexError):
        return None


def _processes_of(uid: int) -> list[int]:
    return [int(n) for n in os.listdir("/proc")
            if n.isdigit() and _status_uid(n) == uid and _alive(Path("/proc") / n)]


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


def _tail(f, n: int) -> str:
    try:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * n))
        return f.read().decode("utf-8", "replace")[-n:]
    except OSError:
        return ""


_stage_lock = threading.Lock()
_stages: dict[tuple[int, ...], str] = {}


def _stage(expose: list[tuple[str, list[str]]]) -> str:
    """Empty mount points for the interpreter trees a private mount namespace binds back in: one directory per
    process, reused by every run (each run mounts on them in its own namespace), so no run makes or removes
    directories for them (directory operations cost milliseconds on a busy disk)."""
    shape = tuple(len(targets) for _, targets in expose)
    with _stage_lock:
        if shape not in _stages:
            d = tempfile.mkdtemp(prefix="slmshift-sbx-stage-")
            for g, n in enumerate(shape):
                for i in range(n):
                    os.mkdir(os.path.join(d, f"{g}-{i}"))
            atexit.register(shutil.rmtree, d, ignore_errors=True)
            _stages[shape] = d
        return _stages[shape]


def _reason(rc: int, stderr: str, timed_out: bool, limits: SandboxLimits, reached_end: bool = True,
            tests: bool = False) -> str:
    if timed_out:
        hit = f" (it kept hitting the process limit of {limits.nproc}: a fork bomb?)" \
            if "BlockingIOError" in stderr else ""
        return f"wall timeout: still running after {limits.wall_s:g} s; process group killed{hit}"
    if rc == 0 and reached_end:
        return "ok"
    if rc == 0:
        what = "the tests" if tests else "the program"
        return (f"ended early: exit status 0 before {what} reached the last line (no end marker); an early exit "
                "(sys.exit, os._exit, SystemExit) is a failure")
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


def run_python(code: str, limits: SandboxLimits | None = None, *, hide: Sequence[str] = ()) -> SandboxResult:
    """Run `code` as a Python program inside the sandbox and wait for it (blocking; see `run_python_async`).

    `ok` only when the program ran to its last line (not merely exited 0). `hide`: paths (files or
    directories) the program may not open, e.g. a benchmark's answer key installed with its package.
    """
    return _run(code, limits or SandboxLimits(), isolation(), hide=hide)


def run_tests(code: str, tests: str, functions: Sequence[str], limits: SandboxLimits | None = None, *,
              hide: Sequence[str] = ()) -> SandboxResult:
    """Grade untrusted `code` with trusted `tests`, never in one process (blocking; see `run_tests_async`).

    `code` runs as `__main__` in a process of its own; `tests` run in another (both inside the sandbox, same
    limits each) where every name in `functions` is bound to a proxy that calls the code's function of that
    name. Arguments and results cross as plain data (None, bool, numbers, str, bytes, list, tuple, set,
    dict); an exception in the code is re-raised in the tests as the same builtin type (others as
    CandidateError). `ok` only when the tests ran to their last line and the code loaded. The code never sees
    the tests' text, names or state: it cannot end them early or change what they compare.
    """
    names = list(functions)
    if not names or not all(n.isidentifier() for n in names):
        raise ValueError(f"functions must be a non-empty list of identifiers, got {names!r}")
    return _run(code, limits or SandboxLimits(), isolation(), tests=tests, functions=names, hide=hide)


def _run(code: str, limits: SandboxLimits, plan: _Plan, tests: str | None = None,
         functions: list[str] | None = None, hide: Sequence[str] = ()) -> SandboxResult:
    if not plan.drop_uid:
        return _run_as(code, limits, plan, None, tests, functions, hide)
    try:
        with _lease_uid() as uid:
            return _run_as(code, limits, plan, uid, tests, functions, hide)
    except OSError as e:
        return SandboxResult(ok=False, returncode=None, reason=f"sandbox could not start: {e}")


def _secret_pipe(data: bytes) -> int:
    """A pipe already holding `data` and closed for writing; returns the read end (for the child)."""
    r, w = os.pipe()
    try:
        if len(data) > 65536:  # the default capacity; writing more would block before the child reads
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, len(data))
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    except OSError:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def _read_marker(fd: int) -> bytes:
    try:
        return os.read(fd, 256)  # non-blocking: what the run wrote before it ended, or nothing
    except BlockingIOError:
        return b""


def _run_as(code: str, limits: SandboxLimits, plan: _Plan, uid: int | None, tests: str | None = None,
            functions: list[str] | None = None, hide: Sequence[str] = ()) -> SandboxResult:
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
           "unshare": plan.unshare, "expose": plan.expose, "uid": uid, "gid": gid,
           "functions": functions if tests is not None else None, "cap": limits.file_mb * mib,
           "hide": sorted({os.path.realpath(h) for h in hide})}
    token = secrets.token_hex(16).encode()  # the end marker: fresh per run, known only to the host and the bootstrap
    secret = token + (b"\n" + tests.encode("utf-8") if tests is not None else b"")
    fds: list[int] = []
    work = Path(tempfile.mkdtemp(prefix="slmshift-sbx-"))   # candidate's cwd (chowned to its uid)
    try:
        cfg["stage"] = _stage(plan.expose) if plan.expose else ""
        secret_r = _secret_pipe(secret)
        fds.append(secret_r)
        mark_r, mark_w = os.pipe()
        fds += [mark_r, mark_w]
        os.set_blocking(mark_r, False)
        cfg["secret_fd"], cfg["mark_fd"] = secret_r, mark_w
        prog = work / "main.py"
        prog.write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, gid)
            os.chown(prog, uid, gid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        t0 = time.perf_counter()
        timed_out = False
        # captured output: unnamed files (O_TMPFILE), never visible to the run, nothing to remove afterwards
        with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOTSTRAP, repr(cfg), str(prog)],
                                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True, close_fds=True, pass_fds=(secret_r, mark_w))
            for fd in (secret_r, mark_w):  # the child holds them now; keeping ours would hide EOF
                os.close(fd)
                fds.remove(fd)
            # wait on a pidfd, not wait(timeout=): that polls with sleeps of up to 50 ms, which dominated short
            # runs; a timer thread costs ~2 ms to start
            timed_out = not _exited_within(proc.pid, limits.wall_s)
            if timed_out:
                _kill_all(proc.pid, uid)
            rc = proc.wait()
            _kill_all(proc.pid, uid)  # children the candidate left behind
            wall = time.perf_counter() - t0
            stdout, stderr = _tail(fo, limits.output_chars), _tail(fe, limits.output_chars)
        reached = _read_marker(mark_r) == token
        reason = _reason(rc, stderr, timed_out, limits, reached, tests is not None)
        return SandboxResult(ok=rc == 0 and not timed_out and reached, reached_end=reached, returncode=rc,
                             reason=reason, stdout=stdout, stderr=stderr, wall_s=wall, timed_out=timed_out)
    except OSError as e:  # the host could not start the run: a failed run, not a crash of the caller
        return SandboxResult(ok=False, returncode=None, reason=f"sandbox could not start: {e}")
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(work, ignore_errors=True)


async def run_python_async(code: str, limits: SandboxLimits | None = None, *,
                           hide: Sequence[str] = ()) -> SandboxResult:
    """`run_python` off the event loop, so an actor's other episodes keep running meanwhile."""
    return await asyncio.to_thread(functools.partial(run_python, code, limits, hide=hide))


async def run_tests_async(code: str, tests: str, functions: Sequence[str], limits: SandboxLimits | None = None, *,
                          hide: Sequence[str] = ()) -> SandboxResult:
    """`run_tests` off the event loop."""
    return await asyncio.to_thread(functools.partial(run_tests, code, tests, functions, limits, hide=hide))
