"""Generate and grade held-out calls: zero-shot candidates (S4) and base vs adapter (S5) use this one path.

Outputs are generated greedily by the real `hf` engine in batches and graded by the scenario's own checker
(`Scenario.grade_call`, rebuilt from the run's config). Where no scenario can grade a call (gateway traffic, a log
from elsewhere), the output is graded by **agreement** with the logged answer (the teacher's, for an LLM-served
call), and every figure built on it is labelled agreement, never correctness (`agreement`):

- tool calls (`{"tool_calls": [{name, arguments}]}`, a bare `{name, arguments}` or a list of them, or Python call
  syntax `f(a=1)` read with `ast`, never evaluated): the same multiset of (name, arguments), arguments compared as
  parsed JSON values (an argument sent as a JSON string is parsed first; 2 == 2.0, key order ignored);
- JSON (either side an object or array, or the call asked for JSON): equal as parsed values;
- text: token F1 (SQuAD's measure: lower-cased word tokens, numbers such as 15.81 kept whole, F1 of the token
  multisets) of at least TEXT_AGREEMENT_F1 = 0.8, and the same numbers (every token with a digit: amounts, dates,
  codes), since one wrong figure in a short answer would otherwise still reach 0.8.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.scorers import outcome
from slmshift.platform.types import LMRequest, ModelSpec, OutputConstraint

__all__ = ["CallGrade", "EvalResult", "ScenarioGrader", "grader_for_run", "evaluate", "exact_match", "agreement",
           "token_f1", "parse_tool_calls", "served_max_tokens", "DEFAULT_MAX_TOKENS", "TEXT_AGREEMENT_F1", "AGREEMENT"]

# What a call that names no budget is served with (LMRequest's default, e.g. `session.call` without max_tokens): the
# budget of a held-out call whose own is recorded neither in the log nor by its scenario's options (a gateway call
# logged before S1 records carried max_tokens).
DEFAULT_MAX_TOKENS: int = LMRequest.model_fields["max_tokens"].default


AGREEMENT = "agreement"  # how a call no scenario grades is graded: agreement with the logged answer
TEXT_AGREEMENT_F1 = 0.8  # text agrees when its token F1 with the logged answer reaches this


@dataclass(frozen=True)
class CallGrade:
    valid: bool
    correct: bool
    reason: str = ""
    by: str = "scenario"  # 'scenario' (its checker: correctness) or AGREEMENT (with the logged answer)


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


def _strip_fence(text: str) -> str:
    return (text or "").strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()


def _json(text: str) -> tuple[bool, object]:
    try:
        return True, json.loads(_strip_fence(text))
    except ValueError:
        return False, None


def parse_tool_calls(text: str) -> list[tuple[str, object]] | None:
    """The (name, arguments) pairs of a tool-call answer, arguments as parsed JSON values; None when the text is not
    one. Untrusted text: JSON, or Python call syntax whose arguments are literals (`ast.literal_eval`)."""
    ok, doc = _json(text)
    if ok:
        items = doc.get("tool_calls", [doc]) if isinstance(doc, dict) else doc
        if not isinstance(items, list) or not items:
            return None
        calls = []
        for it in items:
            if not (isinstance(it, dict) and isinstance(it.get("name"), str) and set(it) <= {"name", "arguments",
                                                                                          "id", "type"}):
                return None
            args = it.get("arguments", {})
            if isinstance(args, str):
                good, args = _json(args) if args.strip() else (True, {})
                if not good:
                    return None
            calls.append((it["name"], args))
        return calls
    try:
        tree = ast.parse(_strip_fence(text), mode="eval").body
        nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
        calls = []
        for n in nodes:
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.args):
                return None
            calls.append((n.func.id, {k.arg: ast.literal_eval(k.value) for k in n.keywords if k.arg}))
        return calls or None
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


TOKEN = re.compile(r"\w+(?:[.,:]\w+)*")


def token_f1(reference: str, output: str) -> float:
    """SQuAD's token F1: lower-cased word tokens (a number such as 15.81 stays one token), F1 of the two multisets."""
    ref, out = TOKEN.findall((reference or "").lower()), TOKEN.findall((output or "").lower())
    if not ref or not out:
        return float(ref == out)
    same = sum((Counter(ref) & Counter(out)).values())
    if same == 0:
        return 0.0
    p, r = same / len(out), same / len(ref)
    return 2 * p * r / (p + r)


def _canon(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _same_values(a: object, b: object) -> bool:
    return a == b  # parsed JSON: dicts ignore key order, 2 == 2.0


def agreement(target: str, output: str, expect: str = "text") -> CallGrade:
    """Does `output` agree with the logged answer `target`? See the module docstring for the measure."""
    if not (output or "").strip():
        return CallGrade(False, False, "empty output", AGREEMENT)
    want, got = parse_tool_calls(target), parse_tool_calls(output)
    if want is not None:
        if got is None:
            return CallGrade(True, False, "the logged answer is a tool call; this output is not", AGREEMENT)
        same = sorted(map(_canon, [list(c) for c in want])) == sorted(map(_canon, [list(c) for c in got])) or (
            len(want) == len(got) and all(n1 == n2 and _same_values(a1, a2) for (n1, a1), (n2, a2) in zip(want, got)))
        names = lambda cs: [n for n, _ in cs]  # noqa: E731
        why = "" if same else ("different functions called: " f"{names(got)} vs {names(want)}"
                               if sorted(names(got)) != sorted(names(want)) else "same functions, different arguments")
        return CallGrade(True, same, why, AGREEMENT)
    if got is not None:
        return CallGrade(True, False, "a tool call where the logged answer is not one", AGREEMENT)
    t_ok, t_val = _json(target)
    o_ok, o_val = _json(output)
    if expect == "json" or (t_ok and isinstance(t_val, (dict, list))):
        if not o_ok:
            return CallGrade(expect != "json", False, "not JSON where the logged answer is", AGREEMENT)
        same = _same_values(t_val, o_val)
        return CallGrade(True, same, "" if same else "JSON values differ from the logged answer", AGREEMENT)
    f1 = token_f1(target, output)
    if f1 < TEXT_AGREEMENT_F1:
        return CallGrade(True, False, f"token F1 {f1:.2f} < {TEXT_AGREEMENT_F1} with the logged answer", AGREEMENT)
    want_n, got_n = _numbers(target), _numbers(output)
    if want_n != got_n:
        return CallGrade(True, False, f"token F1 {f1:.2f} but different numbers: {sorted(got_n.elements())} vs "
                         f"{sorted(want_n.elements())}", AGREEMENT)
    return CallGrade(True, True, "", AGREEMENT)


def _numbers(text: str) -> Counter:
    return Counter(t for t in TOKEN.findall((text or "").lower()) if any(ch.isdigit() for ch in t))


class ScenarioGrader:
    """Grades (row, output) with the row's scenario checker, else by exact match with the logged output.

    `by` counts how each call was graded: 'scenario' (correctness) or 'agreement' (with the logged answer).
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
        if verdict is None:  # no scenario can grade it: agreement with the logged answer, labelled so
            self.by[AGREEMENT] = self.by.get(AGREEMENT, 0) + 1
            return agreement(str(row.get("target", "")), output, str(row.get("expect", "text")))
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
        d["measure"] = self.measure
        return d

    @property
    def measure(self) -> str:
        """What `correct_rate` measures: 'agreement' (every call graded by agreement with the logged answer),
        'accuracy' (the scenario's checker), or 'accuracy + agreement' where both graded."""
        return measure_of(self.verdicts)


def measure_of(verdicts: list[dict[str, Any]]) -> str:
    by = {v.get("by", "scenario") for v in verdicts} - {""}  # '': an engine error, graded by nothing
    return AGREEMENT if by == {AGREEMENT} else "accuracy + agreement" if AGREEMENT in by else "accuracy"


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


def _requests(rows: pd.DataFrame, adapters: list[str | None], max_tokens: list[int], constrained: bool = True
              ) -> list[LMRequest]:
    reqs = []
    for i, (r, mt, adapter) in enumerate(zip(rows.to_dict("records"), max_tokens, adapters)):
        reqs.append(LMRequest(
            experiment_id="convert-eval", episode_id=str(r.get("episode_id", "")), call_index=i,
            scenario=str(r.get("scenario", "")), role=str(r.get("role", "")), call_kind=str(r.get("call_kind", "")),
            task_id=str(r.get("task_id", "")), messages=json.loads(r["messages"]),
            # the call's logged constraint, enforced as the SLM tier is served by default (constrain: slm)
            constraint=OutputConstraint.model_validate_json(r["constraint"]) if isinstance(r.get("constraint"), str)
            else OutputConstraint(format=r.get("expect") or "text"),
            max_tokens=mt, temperature=0.0, adapter=adapter, constrained=constrained))
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
             desc: str | None = None, constrained: bool = True) -> EvalResult:
    """Generate every row's output greedily with `HFEngine(spec)` (or `engine`), grade each, return rates.

    Each call gets the budget it was served with (`served_max_tokens`; the grader's scenarios supply per-kind
    budgets), capped at `max_new_tokens` when given. Not the logged answer's length: serving has no reference answer,
    so a budget derived from it would grade outputs that serving would not produce. `constrained`: the engine holds
    each call to its logged output constraint, as the SLM tier is served under `constrain: slm` (the default).
    """
    return evaluate_parts([(None, rows, adapter)], spec, scenario_grader, engine=engine, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, progress=progress, desc=desc, constrained=constrained)[None]


def evaluate_parts(parts: list[tuple[Any, pd.DataFrame, str | None]], spec: ModelSpec,
                   scenario_grader: Callable[[dict[str, Any], str], CallGrade], *, engine: Any = None,
                   batch_size: int = 16, max_new_tokens: int | None = None, progress: Any = None,
                   desc: str | None = None, constrained: bool = True) -> dict[Any, EvalResult]:
    """`evaluate` for several (key, rows, adapter) parts on one model: a continuous-batching engine gets every part's
    calls in one pass, each row with its part's adapter (peft's mixed batches), so no part waits for another's tail;
    other engines take each part on its own, in batches of `batch_size`. Each part's `wall_s` is its pass's."""
    from slmshift.serve.engines.base import get_engine_class

    t0 = time.perf_counter()
    live = [p for p in parts if not p[1].empty]
    out = {key: EvalResult(spec.name, adapter, 0, 0.0, 0.0) for key, rows, adapter in parts if rows.empty}
    if not live:
        return out
    if engine is None:
        engine = get_engine_class(spec.backend)(spec)
    if len(live) > 1 and not getattr(engine, "continuous", False):
        for p in live:
            out.update(evaluate_parts([p], spec, scenario_grader, engine=engine, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, progress=progress, desc=desc,
                                      constrained=constrained))
        return out
    rows = pd.concat([r for _, r, _ in live], ignore_index=True)
    adapters = [a for _, r, a in live for _ in range(len(r))]
    budgets = served_max_tokens(rows, getattr(scenario_grader, "scenarios", None))
    if max_new_tokens is not None:
        budgets = [min(b, max_new_tokens) for b in budgets]
    reqs = _requests(rows, adapters, budgets, constrained)
    records = rows.to_dict("records")
    only = live[0][2] if len(live) == 1 else None
    what = desc or (f"evaluating {spec.name}" + (f" + {only}" if only else ""))
    task = progress.add_task(what, total=len(reqs)) if progress is not None else None
    verdicts: list[dict[str, Any]] = []
    errors = 0
    first_error = ""
    advance = (lambda n: progress.advance(task, n)) if task is not None else (lambda n: None)
    for rec, resp in zip(records, asyncio.run(_generate_all(engine, reqs, batch_size, advance))):
        if resp.error:
            errors += 1
            first_error = first_error or resp.error
            g = CallGrade(False, False, f"engine error: {resp.error[:160]}", by="")
        else:
            g = scenario_grader(rec, resp.text)
        # task_id: promotion's bootstrap resamples tasks, keeping a task's correlated calls together
        verdicts.append({"record_id": rec.get("record_id"), "task_id": str(rec.get("task_id") or ""),
                         "output": resp.text, "valid": g.valid, "correct": g.correct, "reason": g.reason,
                         "by": g.by, "tokens_in": resp.tokens_in, "tokens_out": resp.tokens_out,
                         "error": bool(resp.error)})
    if errors == len(reqs):  # nothing was generated: a setup problem, not a model that answered badly
        named = ", ".join(repr(a) for a in dict.fromkeys(a for a in adapters if a))
        raise SlmshiftError(f"evaluating {spec.name!r}{' with adapter(s) ' + named if named else ''} failed for "
                            f"every call: {first_error}")
    wall = round(time.perf_counter() - t0, 3)
    start = 0
    for key, part, adapter in live:
        vs, start = verdicts[start:start + len(part)], start + len(part)
        n = len(vs)
        out[key] = EvalResult(
            model=spec.name, adapter=adapter, n=n,
            valid_rate=sum(v["valid"] for v in vs) / n, correct_rate=sum(v["correct"] for v in vs) / n,
            tokens_in=sum(v.pop("tokens_in") for v in vs), tokens_out=sum(v.pop("tokens_out") for v in vs),
            wall_s=wall, errors=sum(v.pop("error") for v in vs), verdicts=vs)
    return out
