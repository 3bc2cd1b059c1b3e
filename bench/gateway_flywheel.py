"""The flywheel on gateway traffic alone, end to end, as a user runs it:

1. `slmshift gateway scenarios/gateway-flywheel.yaml`: a workload-file teacher (scenarios/workloads/agent-desk.jsonl)
   answers as the LLM tier; every call is also sent to the packaged SmolLM2-135M as a shadow.
2. The OpenAI Agents SDK (Responses API, its default) runs every session of the workload file as an agent with real
   Python tools: each session is a question, two dependent tool calls and a final answer (3 model calls).
3. `slmshift convert RUN_DIR` (S2-S5) and `slmshift tune RUN_DIR` (S6) on that run alone.
4. With `--iterations 2` (or more), the flywheel turns again on sessions no earlier iteration saw (each workload's
   next `--per-workload` sessions): the gateway serves the last tune's policy with the adapters in force
   (`registry:`; an earlier adapter stays for a task the last convert promoted none for, as in `slmshift loop`),
   every call shadowed on the other tier, so the SLM side of each call is its cluster's adapter; then
   `slmshift convert --incumbent` (a new adapter must beat the one in force on its task) and `slmshift tune`.

Prints one JSON summary per iteration (calls logged, kept by S2, clusters, adapter gain in agreement with intervals
by session, the tuned policy's predicted SLM share, wall time per stage) and writes them to OUT/summary.json.

    .venv/bin/python bench/gateway_flywheel.py --out /tmp/flywheel [--iterations 2] [--per-workload 24]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import hashlib
import json
import operator
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLMSHIFT = [str(Path(sys.executable).with_name("slmshift"))]


# ---------------------------------------------------------------- the agent's tools (a small deterministic world)

def _h(*parts: str) -> int:
    return int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:8], 16)


def find_city_code(city: str) -> str:
    """Look up the weather service's code for a city."""
    return f"{city[:3].upper()}-{100 + _h('city', city) % 900}"


def get_forecast(code: str) -> str:
    """Current conditions for a weather service city code, as JSON."""
    sky = ["light rain", "clear skies", "broken clouds", "fog", "snow showers", "a thunderstorm"]
    return json.dumps({"temp_c": -5 + _h("t", code) % 36, "summary": sky[_h("s", code) % len(sky)]})


def lookup_order(order_id: str) -> str:
    """An order's status, carrier and tracking number, as JSON."""
    carriers = ["DHL", "UPS", "PostNord", "FedEx"]
    return json.dumps({"status": ["shipped", "in transit", "out for delivery"][_h("st", order_id) % 3],
                       "carrier": carriers[_h("c", order_id) % 4], "tracking": f"TR{_h('tr', order_id) % 10**8:08d}"})


def track_shipment(carrier: str, tracking_number: str) -> str:
    """Where a parcel is and when it should arrive, as JSON."""
    places = ["Leipzig hub", "Rotterdam depot", "Oslo terminal", "Lyon sorting centre", "the local depot"]
    return json.dumps({"location": places[_h("l", carrier, tracking_number) % 5],
                       "eta": f"2026-12-{10 + _h('e', tracking_number) % 18:02d}"})


def get_exchange_rate(base: str, quote: str) -> str:
    """Today's exchange rate from one currency to another, as JSON."""
    return json.dumps({"rate": round(0.5 + (_h("r", base, quote) % 15000) / 10000, 4)})


_OPS = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers and + - * /), rounded to 2 decimals."""
    def ev(n: ast.AST) -> float:
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        raise ValueError("only numbers and + - * / are allowed")
    try:
        return f"{ev(ast.parse(expression, mode='eval').body):.2f}"
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return f"error: {e}"


TOOLS = {"travel-desk": [find_city_code, get_forecast], "order-support": [lookup_order, track_shipment],
         "expense-helper": [get_exchange_rate, calculate]}
INSTRUCTIONS = {"travel-desk": "You are a travel desk assistant. Answer weather questions with the tools.",
                "order-support": "You are an order support agent. Look orders up and track them with the tools.",
                "expense-helper": "You help with expense reports. Convert currencies with the tools."}


# ---------------------------------------------------------------- driving the gateway

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited ({proc.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit("the gateway was not ready in time")


async def run_agents(url: str, sessions: list[dict], concurrency: int, max_tokens: int) -> dict:
    import agents
    import openai

    agents.set_tracing_disabled(True)  # its exporter would call api.openai.com
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=2)
    agents.set_default_openai_client(client, use_for_tracing=False)
    sem = asyncio.Semaphore(concurrency)
    stats = {"sessions": 0, "turns": 0, "tool_calls": 0, "errors": [], "answers_with_tool_results": 0}

    async def one(s: dict) -> None:
        wid = s["workload"]
        agent = agents.Agent(name=wid, instructions=INSTRUCTIONS[wid], model="router:agent",
                             tools=[agents.function_tool(f) for f in TOOLS[wid]],
                             model_settings=agents.ModelSettings(max_tokens=max_tokens, extra_headers={
                                 "X-Workload-Id": wid, "X-Session-Id": s["session"]}))
        async with sem:
            try:
                res = await agents.Runner.run(agent, s["question"], max_turns=6)
            except Exception as e:  # counted and shown, not hidden
                stats["errors"].append(f"{s['session']}: {type(e).__name__}: {str(e)[:200]}")
                return
        calls = [i for i in res.new_items if i.type == "tool_call_item"]
        outputs = [str(i.output) for i in res.new_items if i.type == "tool_call_output_item"]
        stats["sessions"] += 1
        stats["turns"] += len(res.raw_responses)
        stats["tool_calls"] += len(calls)
        # the last tool result's values reach the final answer only through both tool calls
        last = json.loads(outputs[-1]) if outputs and outputs[-1].startswith("{") else outputs[-1] if outputs else ""
        vals = [str(v) for v in last.values()] if isinstance(last, dict) else [last]
        stats["answers_with_tool_results"] += all(v in str(res.final_output) for v in vals if v)

    await asyncio.gather(*(one(s) for s in sessions))
    await client.close()  # inside the loop: closed by the loop's end instead, it printed "Event loop is closed"
    return stats


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Where the run, convert, tune and summary go.")
    ap.add_argument("--config", default=str(ROOT / "scenarios/gateway-flywheel.yaml"))
    ap.add_argument("--per-workload", type=int, default=24, help="Sessions per workload id in each iteration: "
                    "iteration k runs each workload's sessions (k-1)*N+1 .. k*N of the file.")
    ap.add_argument("--iterations", type=int, default=1, help="Turns of the flywheel, each on new sessions (the "
                    "file has 48 per workload: 2 turns at the default --per-workload).")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96, help="The agent's max_tokens (the SLM shadow's budget).")
    ap.add_argument("--steps", type=int, default=0, help="LoRA steps per cluster for convert (0, the default: "
                    "convert's own choice by the cluster's rows and tokens).")
    ap.add_argument("--lr", type=float, default=0.0, help="LoRA learning rate for convert (0: convert's default, "
                    "1e-3; the old 2e-4 left this workload's adapters undertrained, BENCHMARKS.md 2026-12-06).")
    ap.add_argument("--batch-size", type=int, default=4, help="LoRA examples per step (4: two clusters' workers "
                    "side by side fit a 2-core, 23 GB machine shared with other work; 8 was killed for memory).")
    ap.add_argument("--accumulate", action="store_true", help="Each iteration's convert also trains on every "
                    "earlier iteration's calls (`convert --train-also`; held-out calls stay the iteration's own).")
    ap.add_argument("--skip-run", help="An existing gateway run dir: only convert and tune it (as iteration 1).")
    ap.add_argument("--stages", default="convert,tune,tune-workloads",
                    help="What follows the run: convert, tune (one policy), tune-workloads (one per workload id).")
    args = ap.parse_args()
    from slmshift.loop import carry_adapters

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    cfg = yaml.safe_load(Path(args.config).read_text())
    wfile = ROOT / next(m["source"] for m in cfg["models"] if m["backend"] == "workload")
    by: dict[str, list] = {}
    for line in wfile.read_text().splitlines():
        if line.strip() and line[0] != "#":
            s = json.loads(line)
            by.setdefault(s["workload"], []).append(s)
    summary: dict = {"teacher": "desk-teacher (workload-file teacher: scenarios/workloads/agent-desk.jsonl)",
                     "slm": "smollm2-135m (packaged, hf, CPU)", "iterations": []}
    registry = policy = None
    earlier: list[str] = []  # earlier iterations' run dirs: training rows for --accumulate
    for it in range(1, args.iterations + 1):
        part = {w: ss[(it - 1) * args.per_workload:it * args.per_workload] for w, ss in by.items()}
        if any(len(ss) < args.per_workload for ss in part.values()):
            raise SystemExit(f"{wfile} has fewer than {it * args.per_workload} sessions per workload for iteration "
                             f"{it}; lower --per-workload")
        sessions = [s for group in zip(*part.values()) for s in group]  # round-robin over workloads
        idir = out / f"iter-{it}"
        idir.mkdir(exist_ok=True)
        done = idir / "summary.json"
        if done.is_file():  # an iteration that finished in an earlier launch is not run again
            summ = json.loads(done.read_text())
        else:
            icfg = args.config if it == 1 else next_config(cfg, registry, policy, idir)
            summ = iteration(args, icfg, sessions, idir, incumbent=registry,
                             skip_run=args.skip_run if it == 1 else None,
                             train_also=earlier if args.accumulate else [])
            done.write_text(json.dumps(summ, indent=1, default=str))
        summary["iterations"].append(summ)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        run_dir = Path(summ["run_dir"])
        earlier.append(str(run_dir))
        # in force next: this convert's promoted adapters, plus earlier ones for tasks it promoted none for (the loop's
        # rule: an adapter that lost, or was not retrained, stays served)
        in_force, carried = carry_adapters(str(registry) if registry else None, run_dir / "convert",
                                           idir / "registry.json")
        summ["in_force"], summ["carried"] = in_force, carried
        registry = Path(in_force) if in_force else None
        if it < args.iterations:
            if registry is None:
                raise SystemExit(f"iteration {it} promoted no adapter: nothing for iteration {it + 1} to serve")
            policy = run_dir / "tune" / "policy.yaml"
    print(json.dumps(summary, indent=1, default=str))


def next_config(cfg: dict, registry: Path, policy_file: Path, idir: Path) -> str:
    """The next iteration's gateway config: the SLM serves the promoted adapters (`registry:`); the `agent` policy
    is the one tune chose, with the registry (its SLM calls and its shadows' SLM side use their cluster's adapter)
    and every call shadowed on the other tier, so the next tune learns from the adapter in force."""
    import yaml

    from slmshift.platform.config import read_policy_file

    pol = read_policy_file({"file": str(policy_file)})
    pol.update(name="agent", registry=str(registry), shadow="both")
    doc = {**cfg, "models": [{**m, "registry": str(registry)} if m.get("tier") == "slm" else m
                             for m in cfg["models"]],
           "router": {**cfg["router"], "policies": [pol]}}
    path = idir / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def iteration(args: argparse.Namespace, config: str, sessions: list[dict], out: Path, incumbent: Path | None,
              skip_run: str | None, train_also: list[str]) -> dict:
    summary: dict = {"config": config, "sessions_run": f"{sessions[0]['session']}..{sessions[-1]['session']}"
                     if sessions else "", "wall_s": {}}
    if skip_run:
        run_dir = skip_run
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        log = out / "gateway.log"
        t0 = time.perf_counter()
        proc = subprocess.Popen(SLMSHIFT + ["gateway", config, "--port", str(port), "--storage",
                                            str(out / "runs")], cwd=ROOT, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "400"})
        try:
            wait_ready(url, proc)
            summary["wall_s"]["gateway_start"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            summary["agents"] = asyncio.run(run_agents(url, sessions, args.concurrency, args.max_tokens))
            summary["wall_s"]["agents"] = round(time.perf_counter() - t0, 1)
        finally:
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGINT)  # the gateway drains its log, shadows included, then exits
            proc.wait(timeout=1800)
            summary["wall_s"]["drain"] = round(time.perf_counter() - t0, 1)
        m = re.search(r"calls logged in (\S+?)/interactions/", log.read_text())
        if not m:
            raise SystemExit(f"no run dir in {log}")
        run_dir = m.group(1)
    summary["run_dir"] = run_dir
    stages = set(args.stages.split(","))
    if "convert" in stages:
        # gateway calls carry no episode outcome or grade: S2 keeps the valid ones (never a placeholder)
        summary["wall_s"]["convert"] = round(timed(SLMSHIFT + ["convert", run_dir, "--rule", "valid",
                                                               *(["--steps", str(args.steps)] if args.steps else []),
                                                               *(["--lr", str(args.lr)] if args.lr else []),
                                                               *(["--incumbent", str(incumbent)] if incumbent else []),
                                                               *[a for r in train_also for a in ("--train-also", r)],
                                                               "--batch-size", str(args.batch_size),
                                                               "--no-progress"], out / "convert.log"), 1)
    if "tune" in stages:
        summary["wall_s"]["tune"] = round(timed(SLMSHIFT + ["tune", run_dir, "--no-progress", "--time-budget", "120"],
                                                out / "tune.log"), 1)
    if "tune-workloads" in stages:  # a policy per workload id, as gateway.workloads serves them
        for wid in sorted({s["workload"] for s in sessions}):
            summary["wall_s"][f"tune {wid}"] = round(timed(
                SLMSHIFT + ["tune", run_dir, "--workload", wid, "--no-progress", "--time-budget", "60"],
                out / f"tune-{wid}.log"), 1)
    summary.update(collect(run_dir))
    return summary


def collect(run_dir: str) -> dict:
    """The figures the issue asks for, read back from what convert and tune wrote."""
    from slmshift.platform.log import read_interactions

    df = read_interactions(run_dir, include_shadow=True)
    shadow = df["shadow"].astype(bool)
    out: dict = {"calls_logged": int((~shadow).sum()), "shadow_records": int(shadow.sum()),
                 "workloads": int(df.loc[~shadow, "scenario"].nunique()),
                 "sessions": int(df.loc[~shadow, "episode_id"].nunique()),
                 "valid_teacher": float(df.loc[~shadow, "valid"].eq(True).mean()),
                 "valid_slm_shadow": float(df.loc[shadow, "valid"].eq(True).mean()) if shadow.any() else None}
    out["slm_agreement"] = agreement_by(df)
    rep = Path(run_dir) / "convert" / "report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        out["convert"] = {k: r.get(k) for k in ("counts", "grading", "timings", "promoted")}
        out["clusters"] = [{"label": c.get("label"), "size": c.get("size"), "train/val": f"{c.get('n_train')}/"
                            f"{c.get('n_val')}", "sessions": dict(Counter(str(v.get("task_id", "")).split("-")[0]
                                                                          for v in c.get("before_verdicts") or [])),
                            "before": (c.get("before") or {}).get("correct_rate"),
                            "after": (c.get("after") or {}).get("correct_rate"), "status": c.get("status"),
                            "promoted": c.get("promoted")} for c in r.get("clusters", [])]
    for tune in sorted(Path(run_dir).glob("tune*/metrics.json")):
        t = json.loads(tune.read_text())
        out[tune.parent.name] = {k: t.get(k) for k in ("chosen", "quality", "rows", "split", "notes") if k in t}
    return out


def agreement_by(df) -> dict:
    """Each call's SLM answer (primary or shadow) graded by agreement with the teacher's answer to the same call, by
    workload and adapter, with a 95% interval resampling sessions: on a second iteration, the adapters in force on
    sessions they never saw."""
    from slmshift.train.evaluate import agreement
    from slmshift.train.promotion import paired_interval

    df = df[~df["id"].astype(str).str.contains(r":try\d+$")]
    call = df["shadow_of"].where(df["shadow"].astype(bool), df["id"]).astype(str)
    out: dict = {}
    for _, g in df.assign(call=call).groupby("call"):
        llm, slm = g[g["tier"] == "llm"], g[g["tier"] == "slm"]
        if llm.empty or slm.empty:
            continue
        t, s = llm.iloc[0], slm.iloc[0]
        if t["valid"] != True:  # noqa: E712  (a missing verdict is not a reference either)
            continue
        key = f"{t['scenario']} / {s['adapter'] if isinstance(s['adapter'], str) and s['adapter'] else 'base'}"
        ok = bool(s["valid"]) and agreement(str(t["output"]), str(s["output"]), str(t["expect"])).correct
        out.setdefault(key, []).append((str(t["episode_id"]), ok))
    res = {}
    for key, calls in out.items():
        mean, low, high = paired_interval([False] * len(calls), [ok for _, ok in calls], [e for e, _ in calls])
        res[key] = {"calls": len(calls), "agree": sum(ok for _, ok in calls),
                    "agreement": f"{mean:.2f} [{low:.2f}, {high:.2f}]", "sessions": len({e for e, _ in calls})}
    return res


if __name__ == "__main__":
    main()
