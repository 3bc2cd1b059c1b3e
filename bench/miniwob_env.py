"""MiniWoB++ environment throughput and memory: slmshift's browser actors against the bare miniwob gym API.

The same scripted workload runs both ways in one run: episodes of a few tasks, each played to the end by the
DOM solver (`slmshift.scenarios.cradle.teacher`), so every step is a real action in real headless Chromium.

- baseline: one process drives one miniwob gymnasium env per task directly (`gym.make("miniwob/<task>-v1")`,
  `env.unwrapped.create_action`, `env.step`), as a user of the miniwob package would;
- slmshift: 1, 2 and 4 `MiniWoBBrowser` Ray actors (one Chromium each, switching task by navigation), driven
  concurrently from the driver through Ray calls, as a team actor drives them.

Browser start-up and each task page's first load are excluded from both timings. Reported: env steps/s (total
and per browser), the ratio per browser against the baseline (target >= 0.8x), and memory as PSS: for the
baseline, its one browser per task; for actors, each browser (chromedriver + Chromium, one tab per task) and the
actor's own Python process. One actor serves every task by switching tabs, which the baseline (one env per
task) never pays for. Everything runs at nice 15, Ray's worker niceness. On a machine with fewer cores than
browsers, per-browser speed falls with contention.

Run: .venv/bin/python bench/miniwob_env.py [--episodes 20] [--sizes 1,2,4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ray

from slmshift.scenarios.cradle.actions import Action
from slmshift.scenarios.cradle.browser import browser_actor_class, browser_paths, flatten
from slmshift.scenarios.cradle.teacher import solve

TASKS = ["click-button", "enter-text", "click-checkboxes", "login-user"]
MAX_STEPS = 10


def workload(episodes: int, offset: int = 0) -> list[tuple[str, int]]:
    return [(TASKS[i % len(TASKS)], offset + i) for i in range(episodes)]


def pss_mb(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.Error:
            pass
    return total / 1024**2


def tree(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return []


# -- baseline: the miniwob gymnasium API in this process ------------------------------------------------

def baseline(episodes: int, rounds: int) -> tuple[float, float]:
    import gymnasium as gym
    import miniwob  # noqa: F401  (registers the envs)

    chrome, driver = browser_paths()
    os.environ.setdefault("MINIWOB_CHROME_BINARY", chrome)
    os.environ.setdefault("MINIWOB_CHROMEDRIVER", driver)
    envs = {t: gym.make(f"miniwob/{t}-v1") for t in TASKS}
    try:
        def play(task: str, seed: int) -> int:
            env = envs[task]
            obs, info = env.reset(seed=seed, options={"record_screenshots": False})
            page = {"utterance": obs["utterance"], "fields": [list(f) for f in obs["fields"]],
                    "elements": flatten(info["root_dom"])}
            done: list[Action] = []
            for n in range(1, MAX_STEPS + 1):
                plan = solve(task, page, done)
                done.append(plan.action)
                a = plan.action
                u = env.unwrapped
                if a.kind == "click":
                    act = u.create_action("CLICK_ELEMENT", ref=a.args[0])
                else:  # the workload's fields start empty: focus-and-type is what both sides run
                    act = u.create_action("FOCUS_ELEMENT_AND_TYPE_TEXT", ref=a.args[0], text=a.args[1])
                obs, reward, term, _, info = env.step(act)
                if term:
                    return n
                page = {"utterance": obs["utterance"], "fields": [list(f) for f in obs["fields"]],
                        "elements": flatten(info["root_dom"])}
            return MAX_STEPS

        for task in TASKS:  # warm-up
            play(task, 10_000)
        rates = []
        for r in range(rounds):
            t0, steps = time.perf_counter(), 0
            for task, seed in workload(episodes, 1000 * r):
                steps += play(task, seed)
            rates.append(steps / (time.perf_counter() - t0))
        pids = sum((tree(e.unwrapped.instance.driver.service.process.pid) for e in envs.values()), [])
        return statistics.median(rates), pss_mb(pids)  # all the browsers the workload needs (one per task)
    finally:
        for e in envs.values():
            e.close()


def in_process(episodes: int, rounds: int) -> float:
    """`MiniWoBBrowser` without Ray: separates the cost of one browser switching tabs from Ray's."""
    from slmshift.scenarios.cradle.browser import MiniWoBBrowser

    b = MiniWoBBrowser()
    try:
        def play(task: str, seed: int) -> int:
            page, done = b.reset(task, seed), []
            for k in range(1, MAX_STEPS + 1):
                plan = solve(task, page, done)
                done.append(plan.action)
                out = b.step(*plan.action.env_args())
                if out["done"]:
                    return k
                page = out
            return MAX_STEPS

        for task in TASKS:
            play(task, 10_000)
        rates = []
        for r in range(rounds):
            t0 = time.perf_counter()
            steps = sum(play(t, s) for t, s in workload(episodes, 1000 * r))
            rates.append(steps / (time.perf_counter() - t0))
        return statistics.median(rates)
    finally:
        b.close()


# -- slmshift: browser actors driven through Ray --------------------------------------------------------

def actors(n: int, episodes: int, rounds: int) -> tuple[float, float, float]:
    import asyncio

    Browser = browser_actor_class(0.1)
    pool = [Browser.remote() for _ in range(n)]
    for task in TASKS:  # start Chromium and open each task's page once (not timed), as the baseline's envs are
        ray.get([b.reset.remote(task, 10_000) for b in pool])

    async def play(b, task: str, seed: int) -> int:
        page, done = await b.reset.remote(task, seed), []
        for k in range(1, MAX_STEPS + 1):
            plan = solve(task, page, done)
            done.append(plan.action)
            out = await b.step.remote(*plan.action.env_args())
            if out["done"] or out["crashed"]:
                return k
            page = out
        return MAX_STEPS

    async def run_all(offset: int) -> int:
        async def one(i, b):
            return sum([await play(b, t, s) for t, s in workload(episodes, offset + 100 * i)])
        return sum(await asyncio.gather(*(one(i, b) for i, b in enumerate(pool))))

    try:
        rates = []
        for r in range(rounds):
            t0 = time.perf_counter()
            steps = asyncio.run(run_all(1000 * r))
            rates.append(steps / (time.perf_counter() - t0))
        browser_pids, actor_pids = [], []
        for b in pool:
            browser_pids += ray.get(b.pids.remote())
            actor_pids.append(ray.get(b.__ray_call__.remote(lambda self: os.getpid())))
        return statistics.median(rates), pss_mb(browser_pids) / n, pss_mb(actor_pids) / n
    finally:
        for b in pool:
            ray.kill(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=20, help="episodes per browser per round")
    p.add_argument("--sizes", default="1,2,4", help="browser actor counts")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    browser_paths()
    # Ray runs its workers (and so their Chromium) at nice 15; the baseline runs at the same niceness, so on a
    # busy machine both compete for the CPU alike, as browsers and team actors do in a real run.
    os.nice(max(0, 15 - os.nice(0)))
    sizes = [int(s) for s in args.sizes.split(",")]
    base_rate, base_mem = baseline(args.episodes, args.rounds)
    wrapper_rate = in_process(args.episodes, args.rounds)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    try:
        rows = [(n, *actors(n, args.episodes, args.rounds)) for n in sizes]
    finally:
        ray.shutdown()
    print(f"\n[miniwob] tasks {', '.join(TASKS)}; {args.episodes} episodes per browser per round, "
          f"{args.rounds} rounds (median); {os.cpu_count()} CPUs")
    print(f"  miniwob gym API, 1 process          : {base_rate:6.1f} steps/s   {len(TASKS)} browsers (one env per "
          f"task), {base_mem:5.0f} MB PSS in all, {base_mem / len(TASKS):4.0f} MB each "
          f"({1024 * len(TASKS) / base_mem:.1f} browsers/GB)")
    print(f"  MiniWoBBrowser in-process (no Ray)  : {wrapper_rate:6.1f} steps/s   1 browser, tabs   "
          f"(ratio {wrapper_rate / base_rate:.2f}x)")
    for n, rate, browser_mb, actor_mb in rows:
        per = rate / n
        print(f"  slmshift, {n} browser actor(s)       : {rate:6.1f} steps/s   {per:5.1f} per browser "
              f"(ratio {per / base_rate:.2f}x, target >= 0.8x)   {browser_mb:4.0f} MB browser + "
              f"{actor_mb:4.0f} MB actor "
              f"process each ({1024 / (browser_mb + actor_mb):.1f} browsers/GB; each serves all {len(TASKS)} tasks)")


if __name__ == "__main__":
    main()
