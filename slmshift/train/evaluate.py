"""Generate and grade held-out calls: zero-shot candidates (S4) and base vs adapter (S5) use this one path.

Outputs are generated greedily by the real `hf` engine in batches and graded by the scenario's own checker
(`Scenario.grade_call`, rebuilt from the run's config). Where a scenario cannot grade a call offline, the
output is compared with the logged output (normalised exact match) and the result says so.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.scorers import outcome
from slmshift.platform.types import LMRequest, ModelSpec, OutputConstraint

__all__ = ["CallGrade", "EvalResult", "ScenarioGrader", "grader_for_run", "evaluate", "exact_match",
           "served_max_tokens", "DEFAULT_MAX_TOKENS"]

# What a call that names no budget is served with (LMRequest's default, e.g. `session.call` without max_tokens): the
# budget of a held-out call whose own is recorded neither in the log nor by its scenario's options (a gateway call
# logged before S1 records carried max_tokens).
DEFAULT_MAX_TOKENS: int = LMRequest.model_fields["max_tokens"].default


@dataclass(frozen=True)
class CallGrade:
    valid: bool
    correct: bool
    reason: str = ""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", (text or "").strip())


def exact_match(target: str, output: str, expect: str = "text") -> CallGrade:
    """Normalised exact match with the logged output; JSON compared as parsed values where both parse."""
    if not (output or "").strip():
        return CallGrade(False, False, "empty output")
    if expect == "json":
        try:
            same = json.loads(output) == json.loads(target)
            return CallGrade(True, same, "" if same else "differs from the logged output")
        except ValueError:
            pass
    ok = _norm(output) == _norm(target)
    return CallGrade(True, ok, "" if ok else "differs from the logged output")


class ScenarioGrader:
    """Grades (row, output) with the row's scenario checker, else by exact match with the logged output.

    `by` counts how each call was graded: 'scenario' or 'logged-output match'.
    """

    def __init__(self, scenarios: dict[str, Any] | None = None):
        self.scenarios = scenarios or {}
        self.by: dict[str, int] = {}

    def __call__(self, row: dict[str, Any], output: str) -> CallGrade:
        sc = self.scenarios.get(str(row.get("scenario", "")))
        verdict = None
        if sc is not None:
            try:
                ctx = row.get("context")
                verdict = sc.grade_call(str(row.get("task_id", "")), str(row.get("call_kind", "")), output,
                                        context=json.loads(ctx) if isinstance(ctx, str) and ctx else None)
            except Exception as e:  # a checker tripping on model output is a wrong answer, not a crash
                verdict = CallGrade(False, False, f"checker error: {type(e).__name__}: {str(e)[:120]}")
        if verdict is None:
            self.by["logged-output match"] = self.by.get("logged-output match", 0) + 1
            return exact_match(str(row.get("target", "")), output, str(row.get("expect", "text")))
        self.by["scenario"] = self.by.get("scenario", 0) + 1
        # a checker that cannot tell right from wrong (correct None, e.g. a turn's summary) grades by validity, as
        # routing's paired outcomes do
        return CallGrade(bool(verdict.valid), bool(outcome(verdict.correct, verdict.valid)), str(verdict.reason or ""))

    @property
    def method(self) -> str:
        if not self.by:
            return "none yet"
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.by.items()))


def grader_for_run(run_dir: str | Path) -> ScenarioGrader:
    """Rebuild the run's scenarios from its config.yaml so their checkers can grade offline."""
    import yaml

    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.config import ScenarioSpec
    from slmshift.platform.scenario import scenario_class

    from slmshift.platform.storage import join, read_text

    try:
        text = read_text(join(str(run_dir), "config.yaml"))
    except OSError:  # no config.yaml (a log from elsewhere): logged-output match grades
        return ScenarioGrader()
    try:
        raw = yaml.safe_load(text) or {}
        seed = int((raw.get("experiment") or {}).get("seed", 0))
        scenarios = {}
        for s in raw.get("scenarios") or []:
            spec = ScenarioSpec.model_validate(s)
            scenarios[spec.label] = scenario_class(spec.kind)(spec, spec.seed if spec.seed is not None else seed)
    except Exception:  # an unreadable config only costs us the scenario checker; exact match still works
        return ScenarioGrader()
    return ScenarioGrader(scenarios)


@dataclass
class EvalResult:
    """Per-row verdicts and rates for one model (and adapter) on a set of held-out calls."""

    model: str
    adapter: str | None
    n: int
    valid_rate: float
    correct_rate: float
    tokens_in: int = 0
    tokens_out: int = 0
    wall_s: float = 0.0
    errors: int = 0
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("verdicts")
        return d


def served_max_tokens(rows: pd.DataFrame, scenarios: dict[str, Any] | None = None) -> list[int]:
    """Each call's generation budget as it was served, never from its logged answer (unknown when serving): the row's
    own `max_tokens` where the log recorded it, else its scenario's budget for its call kind (`Scenario.token_budget`,
    the run's config rebuilt by `grader_for_run`), else DEFAULT_MAX_TOKENS."""
    scenarios = scenarios or {}
    out = []
    for r in rows.to_dict("records"):
        if pd.notna(r.get("max_tokens")):
            out.append(int(r["max_tokens"]))
            continue
        sc = scenarios.get(str(r.get("scenario", "")))
        budget = sc.token_budget(str(r.get("call_kind", ""))) if sc is not None else None
        out.append(int(budget) if budget else DEFAULT_MAX_TOKENS)
    return out


def _requests(rows: pd.DataFrame, adapter: str | None, max_tokens: list[int]) -> list[LMRequest]:
    reqs = []
    for i, (r, mt) in enumerate(zip(rows.to_dict("records"), max_tokens)):
        reqs.append(LMRequest(
            experiment_id="convert-eval", episode_id=str(r.get("episode_id", "")), call_index=i,
            scenario=str(r.get("scenario", "")), role=str(r.get("role", "")), call_kind=str(r.get("call_kind", "")),
            task_id=str(r.get("task_id", "")), messages=json.loads(r["messages"]),
            # the call's logged constraint, enforced as the SLM tier is served by default (constrain: slm)
            constraint=OutputConstraint.model_validate_json(r["constraint"]) if isinstance(r.get("constraint"), str)
            else OutputConstraint(format=r.get("expect") or "text"),
            max_tokens=mt, temperature=0.0, adapter=adapter))
    return reqs


async def _generate_all(engine: Any, reqs: list[LMRequest], batch_size: int, advance: Callable[[int], None]) -> list:
    """Every request's response, in order. A continuous-batching engine gets them all at once: its scheduler keeps
    its rows full, refilling each as another finishes, where batches of `batch_size` waited for their slowest row
    before the next could start. Other engines get batches of `batch_size`."""
    if getattr(engine, "continuous", False):
        async def one(req: LMRequest) -> Any:
            (resp,) = await engine.generate([req])
            advance(1)
            return resp

        return list(await asyncio.gather(*(one(r) for r in reqs)))
    out = []
    for start in range(0, len(reqs), batch_size):
        out += await engine.generate(reqs[start:start + batch_size])
        advance(len(reqs[start:start + batch_size]))
    return out


def evaluate(rows: pd.DataFrame, spec: ModelSpec, adapter: str | None,
             scenario_grader: Callable[[dict[str, Any], str], CallGrade], *, engine: Any = None,
             batch_size: int = 16, max_new_tokens: int | None = None, progress: Any = None,
             desc: str | None = None) -> EvalResult:
    """Generate every row's output greedily with `HFEngine(spec)` (or `engine`), grade each, return rates.

    Each call gets the budget it was served with (`served_max_tokens`; the grader's scenarios supply per-kind
    budgets), capped at `max_new_tokens` when given. Not the logged answer's length: serving has no reference answer,
    so a budget derived from it would grade outputs that serving would not produce.
    """
    from slmshift.serve.engines.base import get_engine_class

    t0 = time.perf_counter()
    if rows.empty:
        return EvalResult(spec.name, adapter, 0, 0.0, 0.0)
    if engine is None:
        engine = get_engine_class(spec.backend)(spec)
    budgets = served_max_tokens(rows, getattr(scenario_grader, "scenarios", None))
    if max_new_tokens is not None:
        budgets = [min(b, max_new_tokens) for b in budgets]
    reqs = _requests(rows, adapter, budgets)
    records = rows.to_dict("records")
    what = desc or (f"evaluating {spec.name}" + (f" + {adapter}" if adapter else ""))
    task = progress.add_task(what, total=len(reqs)) if progress is not None else None
    verdicts: list[dict[str, Any]] = []
    tokens_in = tokens_out = errors = 0
    first_error = ""
    advance = (lambda n: progress.advance(task, n)) if task is not None else (lambda n: None)
    for rec, resp in zip(records, asyncio.run(_generate_all(engine, reqs, batch_size, advance))):
        if resp.error:
            errors += 1
            first_error = first_error or resp.error
            g = CallGrade(False, False, f"engine error: {resp.error[:160]}")
        else:
            g = scenario_grader(rec, resp.text)
        tokens_in += resp.tokens_in
        tokens_out += resp.tokens_out
        # task_id: promotion's bootstrap resamples tasks, keeping a task's correlated calls together
        verdicts.append({"record_id": rec.get("record_id"), "task_id": str(rec.get("task_id") or ""),
                         "output": resp.text, "valid": g.valid, "correct": g.correct, "reason": g.reason})
    if errors == len(reqs):  # nothing was generated: a setup problem, not a model that answered badly
        raise SlmshiftError(f"evaluating {spec.name!r}{' with adapter ' + repr(adapter) if adapter else ''} failed for "
                            f"every call: {first_error}")
    n = len(verdicts)
    return EvalResult(
        model=spec.name, adapter=adapter, n=n,
        valid_rate=sum(v["valid"] for v in verdicts) / n, correct_rate=sum(v["correct"] for v in verdicts) / n,
        tokens_in=tokens_in, tokens_out=tokens_out, wall_s=round(time.perf_counter() - t0, 3), errors=errors,
        verdicts=verdicts)
