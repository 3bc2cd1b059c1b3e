"""`slmshift loop`: the paper's S6 loop as one command, measured.

Per iteration: collect (episodes on training tasks no earlier collect ran; a `loop.shadow_rate` sample of whole
episodes shadowed on the other tier)
-> convert (S2-S5 on the collected log) -> tune (Ray Tune over router policies on the paired outcomes) -> verify
(fresh episodes on held-out tasks: always-LLM against the tuned policy serving the new adapters). The next
iteration collects with the tuned router and adapters; an adapter stays in force until a later iteration promotes
a new one for its task (`carry_adapters`). Every stage writes under LOOP_DIR/iter-N/ and marks itself
done in LOOP_DIR/state.json, so `--resume LOOP_DIR` continues from the last finished stage (an interrupted run stage
resumes its own run). The loop ends with LOOP_DIR/report.md and report.html: the paper's case-study table
(arXiv 2506.02153, Appendix B) re-done as a measurement.

LOOP_DIR may be a storage URI (s3://, gs://): the loop then works in a local mirror of it (`platform/storage.py`)
and uploads the mirror whenever the state changes, stage outputs before state.json, so a stage the URI's state calls
done has its files there; `--resume URI` downloads it first.

The next iteration's experiment is built as an ExperimentConfig transform (models + policies), never as YAML text.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from slmshift.platform.config import ExperimentConfig, LoopSection, read_policy_file
from slmshift.platform.errors import SlmshiftError
from slmshift.loop_report import BEFORE_ARM, STAGES, write_report
from slmshift.platform.policies import policy_spec

class LoopState:
    """LOOP_DIR/state.json: per iteration and stage, its status, outputs and wall time; rewritten atomically, then
    `sync` (a URI loop dir's upload) runs."""

    def __init__(self, loop_dir: Path, sync: Any = None):
        self.path = loop_dir / "state.json"
        self.sync = sync or (lambda: None)
        self.doc: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"iterations": {}}

    def stage(self, it: int, name: str) -> dict[str, Any]:
        return self.doc["iterations"].setdefault(str(it), {}).setdefault(name, {"status": "pending"})

    def update(self, it: int, name: str, **fields: Any) -> None:
        self.stage(it, name).update(fields)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        tmp.replace(self.path)
        self.sync()


def split_tasks(cfg: ExperimentConfig, loop: LoopSection, iterations: int = 1) -> dict[str, dict[str, Any]]:
    """Per scenario, disjoint seeded sets of verify and training task ids from one pool, and the pool's coverage of
    `iterations` collects on fresh tasks each. For `family#instance` ids (MiniWoB's task types) half of the verify
    tasks come from whole families no collect sees (about a third of the families, a few instances each: intervals
    resample families, so they need several), the rest are new instances spread over the trained families; the
    table shows new-family and in-distribution rows apart. The pool is drawn larger by the held-out families' share,
    so training keeps its size."""
    from slmshift.platform.scenario import scenario_class
    from slmshift.train.routing.pairs import family

    out = {}
    for spec in cfg.scenarios:
        seed = cfg.experiment.seed if spec.seed is None else spec.seed
        n_collect, n_verify_eps = loop.episodes(spec.label)
        pool_n = iterations * n_collect + n_verify_eps
        sc = scenario_class(spec.kind)

        def draw(n: int) -> list[str]:
            tasks = sc(spec.model_copy(update={"episodes": n}), seed).tasks()
            ids = list(dict.fromkeys(str(t.id) for t in tasks))  # scenarios may cycle tasks when episodes exceed them
            np.random.default_rng(loop.seed).shuffle(ids)
            return ids

        ids = draw(pool_n)
        n_verify = max(1, round(len(ids) * n_verify_eps / pool_n))
        if n_verify >= len(ids):
            raise SlmshiftError(f"scenario {spec.label!r} has only {len(ids)} distinct tasks: too few to hold out "
                                f"verify tasks. Fix: widen its task options or lower loop.verify_episodes "
                                f"(or loop.scenario_episodes.{spec.label}.verify).")
        fams = list(dict.fromkeys(family(t) for t in ids))
        if any("#" in t for t in ids) and len(fams) > 1:
            n_new = min(len(fams) - 1, max(1, round(len(fams) / 3)))
            ids = draw(math.ceil(pool_n * len(fams) / (len(fams) - n_new)))  # the new families' share comes extra
            new = set(fams[:n_new])
            per = math.ceil((n_verify // 2) / n_new)
            held = [t for f in fams[:n_new] for t in [t for t in ids if family(t) == f][:per]][: n_verify // 2]
            trained = [[t for t in ids if family(t) == f] for f in fams[n_new:]]
            spread = [t for row in itertools.zip_longest(*trained) for t in row if t is not None]  # round-robin
            verify = held + spread[: n_verify - len(held)]
            held_out = set(verify)
            train = [t for t in ids if family(t) not in new and t not in held_out]
        else:
            verify, train = ids[:n_verify], ids[n_verify:]
        out[spec.label] = {"verify": verify, "train": train}
    return out


def pool_warnings(split: dict[str, dict[str, Any]], loop: LoopSection, iterations: int) -> list[str]:
    """What the pool cannot give: fresh collect tasks in every iteration after the first."""
    out = []
    for label, s in split.items():
        n = loop.episodes(label)[0]
        if iterations > 1 and len(s["train"]) < iterations * n:
            out.append(f"scenario {label!r}: {len(s['train'])} training tasks for {iterations} x {n} collect "
                       "episodes on fresh tasks: an iteration that runs out re-runs tasks earlier collects ran, which "
                       "an adapter in force may have been trained on (its pairs are then in-sample for that adapter). "
                       "Fix: widen the scenario's tasks or lower loop.collect_episodes.")
    return out


def only_scenarios(cfg: ExperimentConfig, labels: list[str]) -> ExperimentConfig:
    """The experiment narrowed to the scenarios called `labels` (`slmshift loop --scenario`: one row of the table)."""
    have = [s.label for s in cfg.scenarios]
    if unknown := [x for x in labels if x not in have]:
        raise SlmshiftError(f"--scenario {', '.join(unknown)}: no such scenario in the experiment. Fix: pick from "
                            f"{', '.join(have)}.")
    loop = cfg.loop or LoopSection()
    eps = {k: v for k, v in loop.scenario_episodes.items() if k in labels}
    return cfg.model_copy(update={"scenarios": [s for s in cfg.scenarios if s.label in labels],
                                  "loop": loop.model_copy(update={"scenario_episodes": eps})})


def perfect_teacher(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every simulated LLM-tier model right on every call (`--teacher perfect`): the conservative bound of the table,
    with no random teacher failures for an SLM to replace. The report prints the profile it ran with."""
    models = [m.model_copy(update={"profile": m.profile.model_copy(update={"accuracy": {"default": 1.0}})})
              if m.backend == "simulated" and m.tier == "llm" else m for m in cfg.models]
    if models == list(cfg.models):
        raise SlmshiftError("--teacher perfect: the experiment has no simulated LLM-tier model to make perfect. Fix: "
                            "drop --teacher (a real teacher is measured as it is).")
    return cfg.model_copy(update={"models": models,
                                  "experiment": cfg.experiment.model_copy(
                                      update={"name": f"{cfg.experiment.name}-perfect-teacher"})})


def _models_with_adapters(cfg: ExperimentConfig, registry: str | None) -> list:
    """The experiment's models, the SLM serving the promoted adapters of `registry` (if any) trained on its source.
    S4 chooses a base per cluster: for each other base a promoted adapter was trained on, a deployment like the SLM
    (its resources and hf options) with that source, the registered candidate's name and price, and the registry."""
    if not registry:
        return list(cfg.models)
    from slmshift.platform.artifacts import AdapterRegistryFile, same_source
    from slmshift.train.candidates import candidate_for_source

    slm = next(m for m in cfg.models if m.tier == "slm")
    models = [m.model_copy(update={"registry": registry}) if m is slm else m for m in cfg.models]
    # a registry not written yet (or unreadable) adds no deployment; loading the SLM's adapters then says what is wrong
    doc = AdapterRegistryFile.read(registry) if Path(registry).is_file() else AdapterRegistryFile()
    bases = dict.fromkeys(e.base_model for e in doc.entries if e.promoted)
    for base in bases:
        if any(m.tier == "slm" and same_source(base, m.source) for m in models):
            continue
        c = candidate_for_source(base)
        name = c.name if all(m.name != c.name for m in models) else f"{c.name}-tuned"
        models.append(slm.model_copy(update={"name": name, "source": base, "params": c.params, "price": c.price,
                                             "registry": registry, "adapters": {}}))
    return models


def collect_config(cfg: ExperimentConfig, loop: LoopSection, split: dict, policy: Any, registry: str | None,
                   it: int, collected: dict[str, set[str]] | None = None,
                   verified: dict[str, set[str]] | None = None) -> ExperimentConfig:
    """Collect on training tasks no earlier collect ran, where the pool still has enough: an adapter in force was
    trained on earlier collects' tasks, so its answers there are memorised, not a measurement. Never on a task an
    earlier verify measured: it must stay unseen for the next verify. A scenario whose fresh tasks ran out re-runs
    collected ones (`pool_warnings` says so up front)."""
    collected, verified = collected or {}, verified or {}
    scenarios = []
    for s in cfg.scenarios:
        n, done = loop.episodes(s.label)[0], collected.get(s.label, set())
        fresh = [t for t in split[s.label]["train"] if t not in done]
        skip = set(s.exclude_tasks) | set(split[s.label]["verify"]) | verified.get(s.label, set())
        scenarios.append(s.model_copy(update={"episodes": n,
                                              "exclude_tasks": sorted(skip | (done if len(fresh) >= n else set()))}))
    arm = policy.model_copy(update={"name": f"collect-{it}", "shadow": "both", "shadow_rate": loop.shadow_rate,
                                    "constrain": loop.constrain, "shadow_attempts": loop.slm_attempts_max})
    return cfg.model_copy(update={"models": _models_with_adapters(cfg, registry), "scenarios": scenarios,
                                  "router": cfg.router.model_copy(update={"policies": [arm]})})


def verify_config(cfg: ExperimentConfig, loop: LoopSection, seen: dict[str, set[str]], tuned: Any,
                  registry: str | None, before: Any = None) -> ExperimentConfig:
    """Always-LLM against the tuned policy on held-out tasks; `before` (the same router on the base SLM, iteration 1
    only, when adapters were promoted) measures the paper table's "before conversion" row on the same tasks."""
    scenarios = [s.model_copy(update={"episodes": loop.episodes(s.label)[1],
                                      "exclude_tasks": sorted(set(s.exclude_tasks) | seen.get(s.label, set()))})
                 for s in cfg.scenarios]
    arms = [policy_spec(kind="llm", name="all-llm"), tuned.model_copy(update={"name": "tuned", "shadow": "none"})]
    if before is not None:
        arms.append(before.model_copy(update={"name": BEFORE_ARM, "shadow": "none"}))
    arms = [a.model_copy(update={"constrain": loop.constrain}) for a in arms]
    return cfg.model_copy(update={"models": _models_with_adapters(cfg, registry), "scenarios": scenarios,
                                  "router": cfg.router.model_copy(update={"policies": arms})})


def tuned_policy(policy_file: str, registry: str | None) -> Any:
    """The tuned point as a policy spec whose SLM calls, and the SLM side of its shadows, serve their cluster's
    promoted adapter: whatever kind tune chose (random or llm too), the next collect's shadows are the adapters in
    force, so the next tune learns from them rather than from the base SLM again."""
    data = read_policy_file({"file": policy_file})
    if registry:
        data["registry"] = registry
    return policy_spec(data)


def carry_adapters(previous: str | None, convert_dir: Path, out: Path) -> tuple[str | None, list[str]]:
    """The registry in force after an iteration's convert: its own promoted adapters, plus the earlier registry's
    promoted adapters for the tasks it promoted none for. Returns (registry path or None, carried labels).

    Without this, an iteration whose retrained adapter lacks the evidence to be promoted would serve the base SLM
    again, while its tune learned thresholds from collect's shadows, which the earlier adapter answered. Each
    iteration re-clusters, so an old adapter is mapped to the new cluster whose centroid is nearest to its own (same
    call kind, cosine >= SAME_TASK_MIN_SIMILARITY: `registry.same_task_adapters`); an old task with no such cluster
    is not carried."""
    from slmshift.train.registry import AdapterRegistry, same_task_adapters

    own = AdapterRegistry.load(convert_dir / "registry.json") if (convert_dir / "registry.json").is_file() else None
    own_path = str(own.path) if own and own.promoted() else None
    if not previous or not (convert_dir / "clusters").is_dir():
        return own_path or previous, []
    prev = AdapterRegistry.load(previous)
    taken = {e.cluster for e in own.promoted()} if own else set()
    reg = AdapterRegistry.create(out, convert_dir.resolve() / "clusters")
    src = next((x for x in reversed(prev.root.parts) if x.startswith("iter-")), "an earlier iteration")
    for e in own.entries if own else []:
        reg.add(e.model_copy(update={"adapter_dir": str(own.adapter_path(e))}))
    carried = []
    for best, e in sorted(same_task_adapters(prev, convert_dir / "clusters").items()):
        if best in taken:
            continue
        if any(x.label == e.label and x.cluster != best for x in reg.entries):
            continue  # the new clustering gave the name to another task: serving both under one name is ambiguous
        reg.add(e.model_copy(update={"cluster": best, "adapter_dir": str(prev.adapter_path(e)),
                                     "reason": e.reason if e.reason.startswith("carried") else
                                     f"carried from {src}: {e.reason}"}))
        carried.append(e.label)
    if not carried:
        return own_path, []
    return str(reg.save()), carried


def earlier_collects(loop: LoopSection, state: LoopState, it: int) -> list[str]:
    """The earlier iterations' collect runs that iteration `it`'s convert also trains on (`convert.accumulate`)."""
    if not loop.convert.accumulate:
        return []
    return [r for k in range(1, it) if (r := state.stage(k, "collect").get("run_dir"))]


def convert_options(loop: LoopSection) -> Any:
    """The loop's typed `convert:` section as ConvertOptions."""
    from slmshift.train.convert import ConvertOptions

    c, d = loop.convert, ConvertOptions()
    return ConvertOptions(
        candidates=c.candidates, licenses=c.licenses, max_memory_mb=c.max_memory_mb,
        min_train_rows=c.min_train_rows, min_promotion_tasks=c.min_promotion_tasks,
        max_clusters=loop.max_clusters, progress=False, constrain=loop.constrain != "none",
        curate=d.curate.model_copy(update={"rule": c.rule, "seed": loop.seed}),
        cluster=d.cluster.model_copy(update={"k_min": c.k_min, "k_max": c.k_max, "seed": loop.seed}),
        lora=d.lora.model_copy(update={"rank": c.lora_rank, "alpha": c.lora_alpha, "steps": c.lora_steps,
                                       "learning_rate": c.lora_lr, "batch_size": c.batch_size, "seed": loop.seed,
                                       "activation_checkpointing": c.activation_checkpointing,
                                       "precision": c.precision}))


# Measured on this project's 2-core CPU machine, quiet (BENCHMARKS.md 2026-12-06 night: the four-scenario
# scenarios/paper-table.yaml iteration, 131 min; and the small profile's two iterations): wall seconds per shadowed
# packaged-SmolLM2 call during collect (concurrent shadows share the engine's batches; longer outputs and prompts
# cost more), model calls per episode, and the clusters S5 trains per scenario (the rest too small, or aced by the
# base SLM).
SLM_CALL_S = {"operator": 0.8, "metagpt": 3.7, "cradle": 1.7, "operator_multiturn": 4.1}
CALLS_PER_EPISODE = {"operator": 2, "metagpt": 7, "cradle": 9, "operator_multiturn": 17}
TRAINED_CLUSTERS = {"operator": 2, "metagpt": 4, "cradle": 4, "operator_multiturn": 1}
# convert's S4 answers for held-out calls collect did not answer, plus each adapter's grading, per held-out call:
# 1,046 s over ~530 held-out calls on the four-scenario collect
EVAL_S_PER_ROW = 2.0
# One LoRA step of 8 rows on 2 threads, scaled by the batch size, by the precision it computes in: float32 with
# activations recomputed took 36-40 s on MetaGPT's design and tests rows; bf16 autocast with activations kept, where
# the CPU does bf16 natively, 4.3-16 s by the rows' length (147-768 tokens), 11 s on average over the 11 clusters the
# four-scenario paper-table collect trained; float32 in proportion. Each trained cluster also pays Ray Train's start,
# the model load and checkpoints (~20 s) and its val-loss sample (16 held-out rows, 7-35 s).
LORA_STEP_S = {"float32": 23.0, "bfloat16": 11.0}
AUTO_STEPS_GUESS = 30  # steps: auto sizes each cluster only once its rows exist; the paper table's got 20-45, mean 30
LORA_CLUSTER_S = 60.0
# verify: the tuned arm sent 14-43% of its calls to the SLM (0.2 comes within ~20% of the measured walls), plus
# each arm's start per scenario
VERIFY_SLM_SHARE, VERIFY_ARM_S = 0.2, 20.0


def estimate_minutes(cfg: ExperimentConfig, loop: LoopSection, iterations: int) -> float:
    """A rough wall-time estimate for a 2-core CPU machine from measured stage costs (above); other engines than
    the packaged SmolLM2 on `hf` count as fast, simulated calls as free."""
    slm = next((m for m in cfg.models if m.tier == "slm"), None)
    scale = 1.0 if slm is not None and slm.backend == "hf" and str(slm.source).startswith("packaged") else 0.1
    # per scenario: (calls per episode, seconds per SLM call, collect episodes, verify episodes)
    scen = [(CALLS_PER_EPISODE.get(s.kind, 4), SLM_CALL_S.get(s.kind, 3.0) * scale, *loop.episodes(s.label))
            for s in cfg.scenarios]
    collect = sum(nc * calls * loop.shadow_rate * call_s for calls, call_s, nc, _ in scen)
    val_rows = 0.15 * sum(nc * calls for calls, _, nc, _ in scen)  # ~60% of calls curated, a quarter held out
    tuned = sum(TRAINED_CLUSTERS.get(s.kind, 3) for s in cfg.scenarios)
    tuned = min(tuned, loop.max_clusters or tuned)
    steps = AUTO_STEPS_GUESS if loop.convert.lora_steps == "auto" else loop.convert.lora_steps
    from slmshift.train.precision import resolved_precision

    step_s = LORA_STEP_S[resolved_precision(loop.convert.precision, "cpu")]
    convert = EVAL_S_PER_ROW * scale * val_rows + tuned * (steps * step_s * loop.convert.batch_size / 8
                                                           + LORA_CLUSTER_S)
    # the tuned arm's SLM calls, twice in iteration 1 (its before-conversion arm); all-LLM is simulated
    verify = sum(nv * calls * VERIFY_SLM_SHARE * call_s + VERIFY_ARM_S for calls, call_s, _, nv in scen)
    total = iterations * (collect + convert + loop.tune_time_budget_s + 60) + (iterations + 1) * verify
    return total / 60


def _run(cfg: ExperimentConfig, storage: str, state: LoopState, it: int, stage: str, console: Any,
         address: str | None) -> str:
    from slmshift.runner import run_experiment

    prev = state.stage(it, stage).get("run_dir")
    result = run_experiment(cfg, address=address, storage=storage, console=console,
                            resume=prev if prev and Path(prev, "config.yaml").is_file() else None)
    state.update(it, stage, run_dir=result.run_dir)  # before anything else: an interrupted run resumes this one
    if result.interrupted:
        raise KeyboardInterrupt
    return result.run_dir


def run_loop(cfg: ExperimentConfig, *, iterations: int, loop_dir: str | None = None, console: Any = None,
             address: str | None = None) -> str:
    """Run (or resume, when `loop_dir` holds a state.json) the loop; returns LOOP_DIR (a path or URI). Raises
    SlmshiftError when a stage fails, after recording it in the state and the report."""
    from rich.console import Console

    from slmshift.platform.storage import check, download, is_uri, join, mirror_dir, upload

    console = console or Console()
    loop = cfg.loop or LoopSection()
    if loop_dir is None:
        root = check(cfg.experiment.storage, "experiment.storage")
        loop_dir = join(root, f"{cfg.experiment.name}-loop-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}")
    else:
        loop_dir = check(loop_dir, "--resume")
    ld = mirror_dir(loop_dir) if is_uri(loop_dir) else Path(loop_dir)
    if is_uri(loop_dir):
        n = download(loop_dir, ld)
        console.print(f"loop dir {loop_dir}: working copy {ld}" + (f" ({n} file(s) downloaded)" if n else ""),
                      soft_wrap=True)
    ld.mkdir(parents=True, exist_ok=True)
    state = LoopState(ld, (lambda: upload(ld, loop_dir)) if is_uri(loop_dir) else None)
    if "config" not in state.doc:
        state.doc["config"] = cfg.model_dump(mode="json")
        state.doc["split"] = split_tasks(cfg, loop, iterations)
        state.update(0, "setup", status="done")
    split = state.doc["split"]
    for w in pool_warnings(split, loop, iterations):
        console.print(f"[yellow]note:[/] {w}", soft_wrap=True, highlight=False)
    console.print(f"[bold]slmshift loop[/] {iterations} iteration(s) -> {loop_dir}  (rough estimate on 2 CPU cores: "
                  f"{estimate_minutes(cfg, loop, iterations):.0f} min)", soft_wrap=True)
    policy, registry = policy_spec(kind="llm"), None
    seen: dict[str, set[str]] = {k: set() for k in split}  # tasks collected so far (verify never runs them)
    verified: dict[str, set[str]] = {k: set() for k in split}  # tasks verified so far (collect never runs them)
    import ray

    from slmshift.platform.cluster import start_ray

    # One Ray for every stage (runs, Ray Train, Ray Tune reuse it): start-up is paid once, not four times an iteration.
    info = start_ray(cfg.ray, address, log_to_driver=False)
    console.print(f"{'embedded local Ray' if info.embedded else f'Ray cluster at {info.address}'}; dashboard: "
                  f"{info.dashboard_url or 'off'}", soft_wrap=True)
    # SIGTERM (a scheduler, `kill`) stops the loop like Ctrl-C: stages marked, report written, resume printed. A
    # collect/verify run installs its own handlers meanwhile and ends its episodes gracefully first.
    on_term = None
    if threading.current_thread() is threading.main_thread():
        on_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        for it in range(1, iterations + 1):
            idir = ld / f"iter-{it}"
            idir.mkdir(exist_ok=True)
            for stage in STAGES:
                st = state.stage(it, stage)
                if st["status"] == "done":
                    console.print(f"iter {it} · {stage}: done earlier, skipped")
                else:
                    t0 = time.perf_counter()
                    if "reason" in st:  # a rerun: the last attempt's failure is history, not this attempt's reason
                        st.setdefault("earlier_failures", []).append(st.pop("reason"))
                    state.update(it, stage, status="running", started=time.time())
                    console.rule(f"iter {it} · {stage}")
                    out = _stage(stage, it, cfg, loop, split, seen, policy, registry, idir, state, console, address,
                                 verified)
                    state.update(it, stage, status="done", wall_s=round(time.perf_counter() - t0, 1), **out)
                st = state.stage(it, stage)
                if stage == "collect":
                    seen = _seen_tasks(st["run_dir"], seen)
                elif stage == "verify" and st.get("run_dir"):
                    verified = _seen_tasks(st["run_dir"], verified)
                elif stage == "convert":
                    registry = st.get("registry")
                elif stage == "tune":
                    policy = tuned_policy(st["policy_file"], registry)
            (idir / "config.json").write_text(json.dumps(
                {"policy": policy.model_dump(mode="json"), "registry": registry}, indent=2))
    except KeyboardInterrupt:
        for i, stages in state.doc["iterations"].items():
            for name, v in stages.items():
                if v.get("status") == "running":
                    state.update(int(i), name, status="interrupted")
        write_report(ld, state)
        state.sync()
        if info.embedded:
            ray.shutdown()
        console.print(f"interrupted: finished stages are kept. Resume with: slmshift loop --resume {loop_dir}")
        raise
    except (SlmshiftError, Exception) as e:
        running = [(int(i), s) for i, stages in state.doc["iterations"].items() for s, v in stages.items()
                   if v.get("status") == "running"]
        for i, s in running:
            state.update(i, s, status="failed", reason=f"{type(e).__name__}: {str(e)[:500]}")
        write_report(ld, state)
        state.sync()
        if info.embedded:
            ray.shutdown()
        raise SlmshiftError(f"loop stopped at {running[-1][1] if running else 'a stage'}: {e}. The stage is recorded "
                            f"in {loop_dir}/report.md. Fix the cause, then: slmshift loop CONFIG --resume {loop_dir}") from None
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    write_report(ld, state)
    state.sync()
    if info.embedded:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return loop_dir


def _seen_tasks(run_dir: str, seen: dict[str, set[str]]) -> dict[str, set[str]]:
    from slmshift.platform.log import read_episodes

    eps = read_episodes(run_dir)
    out = {k: set(v) for k, v in seen.items()}
    for scenario, g in eps.groupby("scenario"):
        out.setdefault(scenario, set()).update(g["task_id"])
    return out


def _stage(stage: str, it: int, cfg: ExperimentConfig, loop: LoopSection, split: dict, seen: dict, policy: Any,
           registry: str | None, idir: Path, state: LoopState, console: Any, address: str | None,
           verified: dict | None = None) -> dict[str, Any]:
    if stage == "collect":
        return {"run_dir": _run(collect_config(cfg, loop, split, policy, registry, it, seen, verified), str(idir),
                                state, it, stage, console, address)}
    if stage == "convert":
        from slmshift.train.convert import convert

        # a new adapter must beat the one in force for its task, not just the base
        rep = convert(state.stage(it, "collect")["run_dir"], str(idir / "convert"),
                      convert_options(loop).model_copy(update={"incumbent": registry,
                                                               "train_also": earlier_collects(loop, state, it)}),
                      console=console)
        # A convert dir's registry is relative to it; the one in force (with carried adapters) is iter-N/registry.json.
        in_force, carried = carry_adapters(registry, Path(rep.local_dir or rep.out_dir), idir / "registry.json")
        if carried:
            console.print(f"S5 carried: {', '.join(carried)} (promoted earlier; no new adapter for the task)")
        return {"registry": in_force, "carried": carried, "convert_dir": rep.out_dir,
                "clusters": [{k: c.get(k) for k in ("id", "label", "call_kind", "n_train", "n_val", "promoted",
                                                    "status", "interval")}
                             | {"before": (c.get("before") or {}).get("correct_rate"),
                                "after": (c.get("after") or {}).get("correct_rate")} for c in rep.clusters]}
    if stage == "tune":
        from slmshift.train.routing.pairs import paired_from_run
        from slmshift.train.routing.tune import TuneOptions, tune_routing

        run_dir = state.stage(it, "collect")["run_dir"]
        conv = state.stage(it, "convert").get("convert_dir")
        clusters = str(Path(conv) / "clusters") if conv and Path(conv, "clusters").is_dir() else None
        table = paired_from_run(run_dir, clusters_dir=clusters)
        res = tune_routing(table, str(idir / "tune"), TuneOptions(budget=loop.budget, seed=loop.seed,
                                                                  time_budget_s=loop.tune_time_budget_s),
                           console=console)
        return {"policy_file": res.policy_file, "chosen": _jsonable(res.chosen)}
    if stage == "verify":
        tuned = tuned_policy(state.stage(it, "tune")["policy_file"], registry)
        before = tuned_policy(state.stage(it, "tune")["policy_file"], None) if it == 1 and registry else None
        return {"run_dir": _run(verify_config(cfg, loop, seen, tuned, registry, before), str(idir), state, it,
                                stage, console, address)}
    raise AssertionError(stage)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def load_loop_dir(loop_dir: str) -> ExperimentConfig:
    """The config a loop dir (a path or URI) was started with (for --resume)."""
    from slmshift.platform.storage import check, join, read_text

    try:
        doc = json.loads(read_text(join(check(loop_dir, "--resume", write=False), "state.json")))
    except FileNotFoundError:
        raise SlmshiftError(f"{loop_dir}: not a loop directory (no state.json). Fix: pass the LOOP_DIR that "
                            "`slmshift loop` printed.") from None
    return ExperimentConfig.model_validate(doc["config"])

