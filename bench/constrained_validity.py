"""SmolLM2-135M zero-shot, with and without each call's output constraint, side by side in one run: validity as each
scenario's own parser scores it, and correctness as the benchmark's checker scores it.

Call kinds: the operator's intent and function_call (BFCL simple, multiple, parallel: the quickstart's categories;
the call sees every function, as after an unusable intent), and cradle's action_planning (MiniWoB pages from the
15 declared tasks, the first page of each seed, no notes, no examples: an SLM-only arm's first step). The same
requests run through one in-process hf engine (continuous scheduler), once with `constrained` off and once on.
Intervals: 95% percentile bootstrap over tasks (BFCL task / MiniWoB task), 2,000 resamples.

Each call kind prints its two rows as soon as they are done (cheap kinds first).

MetaGPT's call kinds (`--metagpt-run RUN_DIR --kinds prd,design,tasks,code`): the calls of a MetaGPT collect run as S2
keeps them (the teacher's calls of episodes that passed, so each prompt carries a clean upstream: the PRD a design
call reads, the design a code call reads), up to `--n` per kind, a task's calls together; the same grader as convert
(`grader_for_run`: pydantic schemas for prd/tasks, the design check, HumanEval's tests in the sandbox for code),
generated with each call's logged constraint off and on (`train/evaluate.py`, as S4 does).

Run: .venv/bin/python bench/constrained_validity.py [--n 60] [--pages 60] [--kinds intent,...] [--json out.json]
     .venv/bin/python bench/constrained_validity.py --metagpt-run RUN_DIR --kinds prd,design,tasks,code --n 50
"""

from __future__ import annotations

import os

# Passive OpenMP waiting, as hf replicas get (deployment.app_for): spinning threads crawl on busy shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from slmshift.platform.types import LMRequest, ModelSpec  # noqa: E402

SOURCE = "packaged:smollm2-135m"


def _req(i: int, kind: str, messages: list[dict], max_tokens: int, constraint) -> LMRequest:
    return LMRequest(experiment_id="bench", episode_id=f"{kind}{i}", call_index=0, scenario="bench", role="r",
                     call_kind=kind, messages=messages, max_tokens=max_tokens, constraint=constraint)


def bfcl_cases(n: int) -> list[tuple[str, LMRequest, object]]:
    """(group, request, grade(text) -> (valid, correct)) for the intent and function_call calls of n tasks."""
    from slmshift.scenarios.bfcl import call_messages, grade_calls, grade_intent, intent_messages, load_tasks
    from slmshift.scenarios.bfcl.constraints import call_constraint, intent_constraint

    out = []
    for i, t in enumerate(load_tasks(["simple", "multiple", "parallel"], n=n, seed=0)):
        def grade_i(text, t=t):
            g = grade_intent(t, text)
            return g.valid, g.correct

        def grade_c(text, t=t):
            g = grade_calls(t, text)
            return g.valid, g.correct

        out.append((t.id, _req(i, "intent", intent_messages(t), 48, intent_constraint(t)), grade_i))
        out.append((t.id, _req(i, "function_call", call_messages(t), 128, call_constraint(t)), grade_c))
    return out


def cradle_cases(pages: int) -> list[tuple[str, LMRequest, object]]:
    from slmshift.scenarios.cradle import prompts
    from slmshift.scenarios.cradle.actions import action_constraint
    from slmshift.scenarios.cradle.browser import MiniWoBBrowser
    from slmshift.scenarios.cradle.observe import clickable_refs, render
    from slmshift.scenarios.cradle.teacher import TASKS, solve

    browser = MiniWoBBrowser()
    out = []
    try:
        seeds = range(1, 1 + -(-pages // len(TASKS)))
        for seed in seeds:
            for task in TASKS:
                if len(out) >= pages:
                    break
                obs = browser.reset(task, seed)
                refs, expected = clickable_refs(obs), str(solve(task, obs, []).action)
                messages = prompts.action_messages(render(obs, 30), "", [], [])

                def grade(text, refs=refs, expected=expected):
                    v = prompts.check_action(text, refs, expected)
                    return v.valid, v.correct

                out.append((task, _req(len(out), "action_planning", messages, 24, action_constraint(refs)), grade))
    finally:
        browser.close()
    return out


METAGPT_KINDS = ("prd", "design", "tasks", "code", "tests", "debug", "summary")


def metagpt_calls(run_dir: str) -> tuple[object, object]:
    """(the run's MetaGPT calls as S2 keeps them, its grader as convert builds it): read once, used by every kind."""
    from slmshift.platform.log import read_interactions
    from slmshift.train.curate import curate
    from slmshift.train.evaluate import grader_for_run

    rows = curate(read_interactions(run_dir)).rows
    return rows[rows["scenario"] == "metagpt"], grader_for_run(run_dir)


def metagpt_kind(engine, calls: tuple, kind: str, n: int, constrained: bool) -> tuple[dict, dict, int, int]:
    """(valid, correct) by task for up to n of `metagpt_calls`' calls of `kind`, and tokens out, errors."""
    import pandas as pd

    from slmshift.scenarios.metagpt.schemas import constraint_for
    from slmshift.train.evaluate import evaluate

    rows, grader = calls
    rows = rows[rows["call_kind"] == kind]
    tasks = sorted(rows["task_id"].unique())
    random.Random(0).shuffle(tasks)  # a fixed sample of tasks, the same for both runs of a kind
    keep, picked = [], 0
    for t in tasks:  # whole tasks until n calls
        if picked >= n:
            break
        mine = rows[rows["task_id"] == t]
        keep.append(mine)
        picked += len(mine)
    sel = pd.concat(keep).head(n) if keep else rows.iloc[:0]
    # the kind's constraint as the scenario declares it today (a collect from before constraints logged none)
    sel = sel.assign(constraint=constraint_for(kind).model_dump_json())
    ev = evaluate(sel, engine.spec, None, grader, engine=engine, constrained=constrained, desc=f"metagpt {kind}")
    valid: dict[str, list[bool]] = {}
    correct: dict[str, list[bool]] = {}
    for v in ev.verdicts:
        valid.setdefault(v["task_id"], []).append(bool(v["valid"]))
        correct.setdefault(v["task_id"], []).append(bool(v["correct"]))
    return valid, correct, ev.tokens_out, ev.errors


def bootstrap(groups: dict[str, list[bool]], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Share of True over all items, with a 95% interval resampling groups (tasks)."""
    keys = sorted(groups)
    total = [sum(groups[k]) for k in keys], [len(groups[k]) for k in keys]
    point = sum(total[0]) / sum(total[1])
    rng = random.Random(seed)
    draws = []
    for _ in range(reps):
        pick = [rng.randrange(len(keys)) for _ in keys]
        draws.append(sum(total[0][j] for j in pick) / max(1, sum(total[1][j] for j in pick)))
    draws.sort()
    return point, draws[int(0.025 * reps)], draws[int(0.975 * reps) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60, help="BFCL tasks (each gives one intent and one function call)")
    ap.add_argument("--pages", type=int, default=60, help="MiniWoB pages for action planning (0: skip)")
    ap.add_argument("--kinds", default="intent,action_planning,function_call", help="call kinds, in this order")
    ap.add_argument("--json", help="write the rows here too (after each call kind)")
    ap.add_argument("--metagpt-run", help="a MetaGPT collect run: its curated calls for the MetaGPT kinds")
    args = ap.parse_args()

    from slmshift.serve.engines.hf import HFEngine

    print(f"started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    kinds = args.kinds.split(",")
    if any(k in METAGPT_KINDS for k in kinds) and not args.metagpt_run:
        ap.error("MetaGPT call kinds need --metagpt-run RUN_DIR (a collect run with MetaGPT calls)")
    mg = metagpt_calls(args.metagpt_run) if any(k in METAGPT_KINDS for k in kinds) else None
    cases = (bfcl_cases(args.n) if {"intent", "function_call"} & set(kinds) else []) + \
        (cradle_cases(args.pages) if args.pages and "action_planning" in kinds else [])
    engine = HFEngine(ModelSpec(name="slm", tier="slm", backend="hf", source=SOURCE,
                                hf={"threads": 2, "max_input_tokens": 4096}, batching={"max_batch_size": 32}))
    rows = []
    for kind in kinds:  # cheap kinds first: each prints as soon as both of its runs are done
        mine = [c for c in cases if c[1].call_kind == kind]
        for constrained in (False, True):
            t0 = time.perf_counter()
            valid: dict[str, list[bool]] = {}
            correct: dict[str, list[bool]] = {}
            if kind in METAGPT_KINDS:
                valid, correct, tokens_out, errors = metagpt_kind(engine, mg, kind, args.n, constrained)
            else:
                reqs = [q.model_copy(update={"constrained": constrained}) for _, q, _ in mine]
                out = asyncio.run(engine.generate(reqs))
                for (group, _, grade), r in zip(mine, out):
                    v, c = grade(r.text) if r.error is None else (False, False)
                    valid.setdefault(group, []).append(bool(v))
                    correct.setdefault(group, []).append(bool(c))
                tokens_out, errors = sum(r.tokens_out for r in out), sum(r.error is not None for r in out)
            wall = time.perf_counter() - t0
            row = {"call_kind": kind, "constrained": constrained, "n": sum(map(len, valid.values())),
                   "tasks": len(valid), "valid": [round(x, 3) for x in bootstrap(valid)],
                   "correct": [round(x, 3) for x in bootstrap(correct)], "tokens_out": tokens_out, "errors": errors,
                   "wall_s": round(wall, 1), "at": time.strftime("%H:%M UTC", time.gmtime())}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    print(json.dumps(engine.stats()), flush=True)


if __name__ == "__main__":
    main()
