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

Task coverage (`--coverage`): how many of miniwob's registered tasks run end to end outside the DOM solver.
  env:   every registered task in one `MiniWoBBrowser` (as a browser actor runs it), played by a seeded random
         agent that writes actions in the scenario's grammar (click a ref on the page, type a word of the
         task's fields into a field, press Enter): did it start, take steps, end with the task's reward, crash?
  stack: `run_experiment` with a real-model arm only (the tiny random hf model the tests build) on every task the
         grammar supports (`tasks: all`): did each episode start and finish without an error?
Run: .venv/bin/python bench/miniwob_env.py --coverage [--steps 12] [--no-stack]
"""

from __future__ import annotations

import argparse
import json
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


# -- coverage: every registered task -----------------------------------------------------------------------

def random_action(page: dict, rng) -> Action:
    """A seeded random agent's next action, in the grammar the scenario's models write."""
    from slmshift.scenarios.cradle.actions import TEXT_MAX_LEN

    els = [e for e in page["elements"] if e["ref"] > 0 and e["tag"] not in ("body", "html", "div", "form")]
    fields = [e for e in els if e["tag"].startswith("input_") and e["tag"] not in ("input_checkbox", "input_radio")
              or e["tag"] in ("textarea", "select")]
    words = [v for _, v in page["fields"] if v] or page["utterance"].split() or ["x"]
    r = rng.random()
    if fields and r < 0.35:
        return Action("type", (rng.choice(fields)["ref"], str(rng.choice(words))[:TEXT_MAX_LEN]))
    if r < 0.42:
        return Action("press", ("Enter",))
    return Action("click", (rng.choice(els or page["elements"])["ref"],))


def coverage_env(tasks: list[str], steps: int, seed: int = 0) -> list[dict]:
    import random

    from slmshift.scenarios.cradle.browser import MiniWoBBrowser

    rng, rows = random.Random(seed), []
    b = MiniWoBBrowser(episode_max_s=120)
    try:
        for task in tasks:
            row = {"task": task, "started": False, "steps": 0, "done": False, "reward": 0.0, "error": None}
            t0 = time.perf_counter()
            try:
                page = b.reset(task, seed)
                row["started"] = True
                for _ in range(steps):
                    out = b.step(*random_action(page, rng).env_args())
                    if out["crashed"]:
                        raise RuntimeError(out["reason"])
                    row["steps"] += 1
                    if out["done"]:
                        row["done"], row["reward"] = True, out["reward"]
                        break
                    page = out
            except Exception as e:  # a crash is what this counts; keep going with a fresh browser
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                b.close()
                b = MiniWoBBrowser(episode_max_s=120)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"  {task:32s} started={row['started']!s:5} steps={row['steps']:2d} done={row['done']!s:5} "
                  f"reward={row['reward']:+.2f} {row['error'] or ''}", flush=True)
    finally:
        b.close()
    return rows


def coverage_stack(tasks: list[str]) -> dict:
    import tempfile
    from pathlib import Path

    from slmshift.platform.config import load_config
    from slmshift.platform.log import read_episodes, read_interactions
    from slmshift.platform.scenario import scenario_options
    from slmshift.runner import run_experiment
    from slmshift.serve.tiny import build_tiny_llama

    import slmshift.scenarios  # noqa: F401

    tmp = Path(tempfile.mkdtemp(prefix="slmshift-cov-"))
    tiny = build_tiny_llama(tmp / "tiny")
    import socket

    with socket.socket() as sock:  # a shared host may hold Ray's default dashboard port, which Ray binds anyway
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yaml = (f"experiment: {{name: coverage, seed: 0, storage: {tmp}}}\n"
            f"ray: {{dashboard: false, dashboard_port: {port}}}\n"
            f"models:\n  - {{name: tiny, tier: slm, backend: hf, source: {tiny}, resources: {{num_cpus: 1}}}}\n"
            "router: {policies: [{kind: slm, name: real-model}]}\n"
            f"scenarios:\n  - kind: cradle\n    episodes: {len(tasks)}\n    teams: 1\n    concurrency: 2\n"
            f"    options: {{tasks: {json.dumps(tasks)}, max_steps: 2, modules: [action_planning], browsers_per_team: 2, "
            "action_max_tokens: 8, skills: false}\n")
    (tmp / "cov.yaml").write_text(yaml)
    t0 = time.perf_counter()
    res = run_experiment(load_config(tmp / "cov.yaml", scenario_options()))
    wall = time.perf_counter() - t0
    ep, df = read_episodes(res.run_dir), read_interactions(res.run_dir)
    ep = ep.assign(task=ep.task_id.str.split("#").str[0])
    calls = df.groupby("episode_id").size()
    ok = ep[ep["error"].isna()]
    return {"episodes": len(ep), "tasks": ep.task.nunique(), "finished": len(ok),
            "with_calls": int((ep.episode_id.map(calls).fillna(0) > 0).sum()),
            "errors": ep[ep["error"].notna()][["task", "error"]].values.tolist(), "wall_s": wall}


def coverage(steps: int, stack: bool, only: list[str] | None = None, env: bool = True) -> None:
    from slmshift.scenarios.cradle.catalog import UNSUPPORTED, all_tasks, supported_tasks
    from slmshift.scenarios.cradle.teacher import TASKS as SOLVED

    tasks = only or list(all_tasks())
    print(f"[coverage] {len(tasks)} registered miniwob tasks; {len(UNSUPPORTED)} need an action the grammar lacks; "
          f"DOM solver: {len(SOLVED)}")
    rows = coverage_env(tasks, steps) if env else []
    sup = [r for r in rows if r["task"] not in UNSUPPORTED]
    for name, group in (("supported", sup), ("unsupported", [r for r in rows if r["task"] in UNSUPPORTED])):
        print(f"  env, {name:11s}: {len(group)} tasks: started {sum(r['started'] for r in group)}, took steps "
              f"{sum(r['steps'] > 0 for r in group)}, ended with the task's reward {sum(r['done'] for r in group)} "
              f"(won {sum(r['reward'] > 0 for r in group)}), crashed {sum(r['error'] is not None for r in group)}; "
              f"{sum(r['wall_s'] for r in group):.0f} s")
    crashed = [(r["task"], r["error"]) for r in rows if r["error"]]
    if crashed:
        print("  crashed:", crashed)
    if stack:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        st = coverage_stack([t for t in tasks if t in supported_tasks()])
        print(f"  stack (tiny hf model, every supported task): {st['finished']}/{st['episodes']} episodes finished "
              f"without an error on {st['tasks']} tasks, {st['with_calls']} made model calls; {st['wall_s']:.0f} s; "
              f"errors: {st['errors'] or 'none'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=20, help="episodes per browser per round")
    p.add_argument("--sizes", default="1,2,4", help="browser actor counts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--coverage", action="store_true", help="task coverage instead of throughput")
    p.add_argument("--steps", type=int, default=12, help="coverage: random actions per task at most")
    p.add_argument("--no-stack", action="store_true", help="coverage: skip the run_experiment part")
    p.add_argument("--no-env", action="store_true", help="coverage: skip the random-agent part")
    p.add_argument("--tasks", default="", help="coverage: comma-separated tasks (default: every registered one)")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    browser_paths()
    if args.coverage:
        coverage(args.steps, not args.no_stack, [t for t in args.tasks.split(",") if t] or None, not args.no_env)
        return
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
