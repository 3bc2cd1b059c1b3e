"""The sandbox: canonical HumanEval solutions pass, wrong ones fail, hostile programs end as failed runs with a
clear reason and leave the host unharmed (no file outside the temp dir, no surviving process, no secret)."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slmshift.platform.sandbox import SandboxLimits, _alive, _proc_uid, isolation, network_isolation, run_python, run_python_async
from slmshift.scenarios.metagpt.data import check_program, load_problems

FAST = SandboxLimits(wall_s=4, cpu_s=2, memory_mb=512)


def _sandbox_processes() -> list[str]:
    """Processes still running under a sandbox uid, or (non-root) any python running a sandbox bootstrap."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            uid = _proc_uid(d)
        except OSError:
            continue
        if not _alive(d):
            continue  # zombies are dead; reaping orphans is PID 1's job
        if (os.geteuid() == 0 and uid is not None and uid >= 610_000) or "SandboxViolation" in cmd:
            out.append(f"{d.name} uid={uid} {cmd[:80]}")
    return out


def test_all_164_canonical_solutions_pass():
    problems = load_problems()
    assert len(problems) == 164
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda p: run_python(check_program(p, p.canonical_code)), problems))
    failed = [(p.id, r.reason) for p, r in zip(problems, results) if not r.ok]
    assert failed == []
    assert time.perf_counter() - t0 < 60
    assert all(r.reason == "ok" and r.returncode == 0 for r in results)


def test_wrong_solutions_fail_with_the_assertion():
    p = load_problems(["HumanEval/0"])[0]
    wrong = p.prompt + "    return not " + p.canonical_solution.strip().splitlines()[-1].split("return ", 1)[-1] + "\n"
    r = run_python(check_program(p, p.prompt + "    return False\n"), FAST)
    assert not r.ok and r.returncode == 1 and "AssertionError" in r.reason
    r = run_python(check_program(p, p.prompt + "    retrun False\n"), FAST)
    assert not r.ok and "SyntaxError" in r.reason
    assert not run_python(check_program(p, wrong), FAST).ok


def test_output_and_working_dir():
    r = run_python("import os\nopen('x.txt', 'w').write('hi')\nprint(open('x.txt').read(), os.listdir('.'))", FAST)
    assert r.ok and r.stdout.strip() == "hi ['main.py', 'x.txt']"
    # a fresh dir each run: the file is gone
    assert run_python("import os\nprint(os.listdir('.'))", FAST).stdout.strip() == "['main.py']"


def test_infinite_loop_hits_the_cpu_limit():
    # a generous wall limit, so that on a busy machine the CPU limit is still what stops it
    r = run_python("while True:\n    pass\n", SandboxLimits(wall_s=30, cpu_s=1))
    assert not r.ok and not r.timed_out and "CPU time limit" in r.reason


def test_sleeping_forever_hits_the_wall_timeout():
    r = run_python("import time\ntime.sleep(60)\n", SandboxLimits(wall_s=1.5))
    assert not r.ok and r.timed_out and "wall timeout" in r.reason and r.wall_s < 5


def test_fork_bomb_is_contained_and_leaves_no_process():
    r = run_python("import os\nwhile True:\n    os.fork()\n", SandboxLimits(wall_s=3, cpu_s=2, nproc=16))
    assert not r.ok and r.reason != "ok"
    assert "process limit" in r.reason or "wall timeout" in r.reason or "CPU" in r.reason
    time.sleep(0.2)
    assert _sandbox_processes() == []


def test_children_that_leave_the_process_group_are_killed_too():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n"
    r = run_python(code, FAST)
    assert r.ok  # the candidate itself exited fine...
    time.sleep(0.2)
    if os.geteuid() == 0:  # ...and its detached child did not outlive the run (found by its uid)
        assert _sandbox_processes() == []


def test_ten_gb_allocation_fails_cleanly():
    r = run_python("x = bytearray(10 * 1024**3)\nprint(len(x))\n", FAST)
    assert not r.ok and "memory limit" in r.reason


def test_writing_outside_the_temp_dir_is_blocked(tmp_path):
    target = Path("/tmp") / f"slmshift-escape-{os.getpid()}.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
                 f"import shutil\nshutil.copyfile('main.py', {str(target)!r})",
                 f"open('../{target.name}', 'w').write('x')",
                 f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})"):
        (tmp_path / "keep.txt").write_text("keep")
        r = run_python(code, FAST)
        assert not r.ok and r.reason.startswith("blocked by sandbox"), (code, r.reason)
        assert not target.exists() and (tmp_path / "keep.txt").exists()


def test_sockets_are_blocked():
    r = run_python("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\n", FAST)
    assert not r.ok and "socket" in r.reason and r.reason.startswith("blocked by sandbox")
    r = run_python("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n", FAST)
    assert not r.ok


@pytest.mark.skipif(os.geteuid() != 0 and not network_isolation(), reason="no network namespace on this host")
def test_network_namespace_has_no_interfaces_but_loopback():
    plan = isolation()
    assert network_isolation(), plan
    # read the interface table the kernel gives the sandbox (reading is allowed; sockets are not)
    r = run_python("print(open('/proc/net/dev').read())", FAST)
    assert r.ok
    names = {ln.split(":")[0].strip() for ln in r.stdout.splitlines()[2:] if ":" in ln}
    assert names == {"lo"}


def test_parent_environment_secrets_never_leak(monkeypatch):
    secret = "sk-test-" + "f" * 24
    monkeypatch.setenv("SLMSHIFT_FAKE_API_KEY", secret)
    probes = ["import os\nprint(dict(os.environ))",
              f"print(open('/proc/{os.getpid()}/environ').read())",
              "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
              "import os\nfor p in os.listdir('/proc'):\n    try:\n        print(open(f'/proc/{p}/environ', 'rb').read())\n"
              "    except Exception as e:\n        print(type(e).__name__)"]
    for code in probes:
        r = run_python(code, FAST)
        assert secret not in r.stdout + r.stderr, code
    assert "SLMSHIFT_FAKE_API_KEY" not in run_python(probes[0], FAST).stdout
    r = run_python(probes[1], FAST)
    assert not r.ok and "blocked by sandbox" in r.reason


def test_escape_hatches_are_blocked():
    for code, what in (("import subprocess\nsubprocess.run(['ls'])", "subprocess"),
                       ("import os\nos.system('ls')", "os.system"),
                       ("import ctypes", "ctypes"),
                       ("import os\nos.kill(1, 9)", "os.kill")):
        r = run_python(code, FAST)
        assert not r.ok and r.reason.startswith("blocked by sandbox") and what in r.reason, (code, r.reason)


def test_huge_output_is_capped():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", SandboxLimits(wall_s=5, file_mb=1))
    assert not r.ok and "file size limit" in r.reason and len(r.stdout) <= SandboxLimits().output_chars


async def _concurrent():
    t0 = time.perf_counter()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while time.perf_counter() - t0 < 1.0:
            ticks += 1
            await asyncio.sleep(0.05)

    results = await asyncio.gather(run_python_async("import time\ntime.sleep(1)\nprint('a')", FAST),
                                   run_python_async("print('b')", FAST), ticker())
    return results, ticks


def test_async_runs_off_the_event_loop():
    (a, b, _), ticks = asyncio.run(_concurrent())
    assert a.stdout.strip() == "a" and b.stdout.strip() == "b"
    assert ticks >= 10  # the loop kept running while a sandbox slept
