"""Sandbox overhead: all 164 HumanEval canonical solutions graded three ways, at the same concurrency,
alternating rounds in one run:

- plain:   HumanEval's one program (candidate + tests + `check(entry_point)`) under `subprocess.run`;
- sandbox: the same program through `slmshift.platform.sandbox.run_python` (ok only with the end marker);
- grading: `metagpt.data.grade_code`, what the scenario grades with: the tests in a trusted process calling the
           candidate in a forked one (`run_tests`).

Target: sandboxed and grading each <= 1.5x the plain wall time.

Run: .venv/bin/python bench/sandbox.py [--concurrency 2] [--rounds 3] [--n 164]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slmshift.platform.sandbox import isolation, run_python
from slmshift.scenarios.metagpt.data import check_program, grade_code, load_problems


def plain(program: str, tmp: Path, i: int) -> bool:
    f = tmp / f"p{i}.py"
    f.write_text(program)
    return subprocess.run([sys.executable, str(f)], capture_output=True, timeout=30).returncode == 0


def measure(fn, programs: list[str], concurrency: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        ok = sum(ex.map(fn, range(len(programs))))
    return time.perf_counter() - t0, ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=164, help="problems (all 164 for the real figure)")
    args = p.parse_args()
    problems = load_problems()[: args.n]
    programs = [check_program(pr, pr.canonical_code) for pr in problems]
    print(f"isolation: {isolation()}")
    tmp = Path(tempfile.mkdtemp(prefix="slmshift-bench-sbx-"))
    runs = {"plain": [], "sandbox": [], "grading": []}
    for _ in range(args.rounds):  # alternate, so machine noise hits both
        wall, ok = measure(lambda i: plain(programs[i], tmp, i), programs, args.concurrency)
        runs["plain"].append((wall, ok))
        wall, ok = measure(lambda i: run_python(programs[i]).ok, programs, args.concurrency)
        runs["sandbox"].append((wall, ok))
        wall, ok = measure(lambda i: grade_code(problems[i], problems[i].canonical_code).ok, programs, args.concurrency)
        runs["grading"].append((wall, ok))
    med = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    print(f"\n{len(programs)} canonical solutions, concurrency {args.concurrency}, {args.rounds} rounds (median)")
    for k in ("plain", "sandbox", "grading"):
        print(f"  {k:8s}: {len(programs) / med[k]:7.1f} runs/s   ({med[k]:.2f} s; passed {runs[k][-1][1]}/{len(programs)})")
    print(f"  ratio sandbox/plain wall time: {med['sandbox'] / med['plain']:.2f}x   (target <= 1.5x)")
    print(f"  ratio grading/plain wall time: {med['grading'] / med['plain']:.2f}x   (target <= 1.5x)")


if __name__ == "__main__":
    main()
