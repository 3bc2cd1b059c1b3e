"""MetaGPT episodes per second with simulated engines on both tiers (zero latency), at 1, 8 and 64 concurrent
teams (a team = one episode's five roles; they run as coroutines inside `--actors` team actors, as the runner
does), through the full stack (team actors -> call pipeline -> router -> Serve -> simulated engine -> S1 log, and
the sandbox for every test run). The baseline, measured in the same run, is 1 team: the ratio shows how
throughput scales with concurrency.

Run: .venv/bin/python bench/metagpt_episodes.py [--teams 1 8 64] [--episodes 128] [--actors 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
from ray import serve

import slmshift.scenarios  # noqa: F401  (registers "metagpt")
from slmshift.agents.team import TeamActor
from slmshift.platform.config import ScenarioSpec
from slmshift.platform.policies import policy_spec
from slmshift.platform.log import InteractionLog
from slmshift.platform.scenario import scenario_class
from slmshift.platform.types import ModelSpec
from slmshift.serve.deployment import deploy_models

PROFILE = {"accuracy": {"code": 0.7, "default": 0.95}, "latency_base_s": 0.0}  # zero latency: measures overhead


def models() -> list[ModelSpec]:
    common = {"backend": "simulated", "resources": {"num_cpus": 0.5}, "max_ongoing_requests": 512,
              "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.0}, "profile": PROFILE}
    return [ModelSpec(name="teacher", tier="llm", params=7e10, **common),
            ModelSpec(name="student", tier="slm", params=1.35e8, **common)]


def run_arm(teams: int, actors: int, episodes: int, handles, specs, log, tag: str) -> tuple[float, float]:
    actors = min(actors, teams)
    spec = ScenarioSpec(kind="metagpt", episodes=episodes, teams=actors, concurrency=-(-teams // actors),
                        options={"debug_rounds": 1})
    cls = scenario_class("metagpt")
    tasks = cls(spec, 0).tasks()
    policy = policy_spec(kind="call_kind", name="per-role", map={"prd": "slm", "tasks": "slm", "summary": "slm",
                                                                "tests": "slm"})
    team_actors = [TeamActor.options(max_concurrency=spec.concurrency).remote(
        cls, spec, 0, "bench", policy, specs, handles, {m.name: m.params for m in specs}, log) for _ in range(actors)]
    ray.get([a.__ray_ready__.remote() for a in team_actors])
    t0 = time.perf_counter()
    results = ray.get([team_actors[i % actors].run_episode.remote(t, f"{tag}/{i}") for i, t in enumerate(tasks)])
    wall = time.perf_counter() - t0
    ray.get([a.drain.remote() for a in team_actors])
    for a in team_actors:
        ray.kill(a)
    return len(results) / wall, sum(r.success for r in results) / len(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teams", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--episodes", type=int, default=128, help="episodes per measurement (at least 2x the teams)")
    p.add_argument("--actors", type=int, default=2, help="team actors the concurrent teams are spread over")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        specs = models()
        handles = deploy_models(specs, available_cpus=2)
        log = InteractionLog.remote(tempfile.mkdtemp(prefix="slmshift-bench-mg-"))
        run_arm(1, 1, 2, handles, specs, log, "warmup")
        rows = [(t,) + run_arm(t, args.actors, max(args.episodes, 2 * t), handles, specs, log, f"t{t}")
                for t in args.teams]
        counts = ray.get(log.close.remote())
        base = rows[0][1]
        print(f"\nMetaGPT episodes, simulated engines (zero latency) on both tiers, per-role routing, "
              f"{args.actors} team actors; {counts['interactions']} S1 records written")
        for teams, eps, pass1 in rows:
            print(f"  {teams:3d} teams: {eps:7.2f} episodes/s   pass@1 {pass1:.2f}   "
                  f"x{eps / base:.2f} vs {rows[0][0]} team(s)")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
