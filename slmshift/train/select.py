"""S4 select: measure every eligible candidate zero-shot on each cluster's validation calls; pick by quality per cost.

The rule, stated once (RULE, printed in the convert report), over the paper's four criteria:
- licence and footprint are gates: a candidate whose licence is not in `convert.licenses` or whose served memory
  exceeds `convert.max_memory_mb` is not evaluated (both default to no limit; the report lists it as excluded);
- capability and cost are weighed: quality is held-out accuracy (the scenario checker's verdict), plus a tenth of
  the valid-output rate so that, among models that are all wrong, one that at least answers in the right format ranks
  higher; cost is what the candidate would charge for those calls (its price per token times the tokens it read and
  wrote). Score = quality / cost; the highest score wins;
- ties (all zero included) go to the cheaper candidate, then the smaller memory footprint, then a permissive licence
  (one with no use restrictions, e.g. Apache-2.0 before the Gemma Terms of Use), then fewer parameters, then the name.
The choice is made per cluster: a cluster's calls may go to one base and another cluster's to another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from slmshift.platform.errors import SlmshiftError
from slmshift.train.candidates import Candidate
from slmshift.train.evaluate import CallGrade, EvalResult, evaluate_parts

__all__ = ["Selection", "score", "choose", "eligible", "select_candidates", "select_clusters", "collected_answers",
           "RULE", "PERMISSIVE_LICENSES"]

RULE = ("per cluster: licence in convert.licenses and memory <= convert.max_memory_mb (gates; default: any), then "
        "quality / cost, quality = accuracy + 0.1 x valid rate on the cluster's validation calls, "
        "cost = price x tokens for those calls; ties -> cheaper, then smaller memory, then a permissive licence, "
        "then fewer parameters")
PERMISSIVE_LICENSES = frozenset({"Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause"})
_VALID_WEIGHT = 0.1
_MIN_COST = 1e-12  # a free model (price 0) still ranks by quality rather than dividing by zero


def eligible(cands: list[Candidate], licenses: list[str] | None = None,
             max_memory_mb: float | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """RULE's gates: (the candidates that pass, {name: why excluded} for the rest).

    Raises:
        SlmshiftError: none passes; the message names each candidate's reason and the options to change.
    """
    out, why = [], {}
    for c in cands:
        if licenses is not None and c.license not in licenses:
            why[c.name] = f"licence {c.license!r} not in convert.licenses {licenses}"
        elif max_memory_mb is not None and c.memory_mb > max_memory_mb:
            why[c.name] = f"memory {c.memory_mb:.0f} MB over convert.max_memory_mb {max_memory_mb:g}"
        else:
            out.append(c)
    if not out:
        raise SlmshiftError("S4: no SLM candidate passes the licence and footprint gates (" + "; ".join(
            f"{n}: {w}" for n, w in why.items()) + "). Fix: widen convert.licenses or convert.max_memory_mb, or add "
            "a candidate that fits (convert.candidates).")
    return out, why


def cost_usd(c: Candidate, ev: EvalResult) -> float:
    return (c.price.input_per_m * ev.tokens_in + c.price.output_per_m * ev.tokens_out) / 1e6


def quality(ev: EvalResult) -> float:
    return ev.correct_rate + _VALID_WEIGHT * ev.valid_rate


def score(c: Candidate, ev: EvalResult) -> float:
    return quality(ev) / max(cost_usd(c, ev), _MIN_COST)


def choose(results: list[tuple[Candidate, EvalResult]]) -> tuple[Candidate, EvalResult]:
    """The winner under RULE among candidates that passed its gates."""
    if not results:
        raise ValueError("no candidates to choose from")
    return min(results, key=lambda ce: (-round(score(*ce), 9), round(cost_usd(*ce), 12), ce[0].memory_mb,
                                        ce[0].license not in PERMISSIVE_LICENSES, ce[0].params, ce[0].name))


@dataclass
class Selection:
    """S4's outcome for one cluster."""

    cluster: int
    chosen: Candidate
    before: EvalResult  # the chosen candidate's zero-shot result: the "before tuning" quality
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per candidate evaluated
    excluded: dict[str, str] = field(default_factory=dict)  # candidate -> why RULE's gates left it out

    def summary(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "chosen": self.chosen.name, "rule": RULE, "candidates": self.table,
                "excluded": self.excluded}


def collected_answers(df: pd.DataFrame, run_dir: str) -> pd.DataFrame:
    """The SLM answers collect already gave, by the id of the call they answer: shadows (`shadow_of`), a cascade's
    rejected attempts (`<id>:cascade`) and calls the SLM served. They are the served SLM's answers to real calls at
    the served budget and constraint, graded by the scenario where one could (else `correct` is missing): S4 uses
    them for the held-out calls they cover instead of generating those again. `df`: the run's log with its shadows
    (`read_interactions(run_dir, include_shadow=True)`); `run_dir`'s config names each model's source. Columns:
    call_id, model, source, adapter, output, valid, correct, tokens_in/out."""
    import yaml

    from slmshift.platform.storage import join, read_text

    cols = ["call_id", "model", "source", "adapter", "output", "valid", "correct", "tokens_in", "tokens_out"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    # `correct` may be missing: no scenario graded the call (gateway traffic); S4 grades it as it grades a generated
    # answer (`_merge`), by agreement with the held-out row's logged answer
    slm = df[(df["tier"] == "slm") & ~df["infra_error"].fillna(False).astype(bool) & df["valid"].notna()].copy()
    # S4 grades one answer per call: where the SLM answered again (slm_attempts, shadow_attempts), its first attempt
    # ('<id>:try1'), not the answer a retry ended with
    ids = slm["id"].astype(str)
    first = ids.str.endswith(":try1") | (~ids.str.contains(r":try\d+$") & slm["retried_from"].isna())
    slm = slm[first].copy()
    shadow = slm["shadow"].fillna(False).astype(bool)
    slm["call_id"] = slm["shadow_of"].where(shadow, slm["id"].str.removesuffix(":try1").str.removesuffix(":cascade"))
    try:
        models = (yaml.safe_load(read_text(join(str(run_dir), "config.yaml"))) or {}).get("models") or []
    except OSError:
        models = []
    sources = {m.get("name"): m.get("source") for m in models if isinstance(m, dict)}
    slm["source"] = slm["model"].map(sources)
    return slm[cols].drop_duplicates("call_id", keep="last").reset_index(drop=True)


def _base_answers(answers: pd.DataFrame, c: Candidate) -> pd.DataFrame:
    """The candidate's own base answers (no adapter) among `collected_answers`."""
    return answers[((answers["model"] == c.name) | (answers["source"] == c.source)) & answers["adapter"].isna()]


def answered_calls(answers: pd.DataFrame | None, cands: list[Candidate]) -> set[str]:
    """Ids of the calls collect answered with some candidate's base model: S4 need not generate these."""
    if answers is None or answers.empty:
        return set()
    return {str(i) for c in cands for i in _base_answers(answers, c)["call_id"]}


def _reused(answers: pd.DataFrame | None, c: Candidate, val_rows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The candidate's own base answers (no adapter) to these validation calls, by record id."""
    if answers is None or answers.empty or "record_id" not in val_rows:
        return {}
    mine = _base_answers(answers, c)
    mine = mine[mine["call_id"].isin(val_rows["record_id"])]
    return {r["call_id"]: r for r in mine.to_dict("records")}


def _merge(val_rows: pd.DataFrame, reused: dict[str, dict[str, Any]], generated: EvalResult | None,
           name: str, grader: Callable[[dict[str, Any], str], CallGrade]) -> EvalResult:
    """One evaluation over every validation row, in row order: collect's answer where there is one, graded by the
    scenario in collect, or here by `grader` (agreement with the row's logged answer) where nothing graded it."""
    gen = iter(generated.verdicts if generated else [])
    verdicts, t_in, t_out = [], 0, 0
    for r in val_rows.to_dict("records"):
        a = reused.get(r.get("record_id"))
        if a is None:
            verdicts.append({**next(gen), "source": "generated"})
            continue
        if pd.isna(a["correct"]):
            g = grader(r, str(a["output"] or ""))
            grade = {"valid": g.valid, "correct": g.correct, "reason": g.reason, "by": g.by}
        else:
            grade = {"valid": bool(a["valid"]), "correct": bool(a["correct"]), "reason": "", "by": "scenario"}
        verdicts.append({"record_id": r.get("record_id"), "task_id": str(r.get("task_id") or ""),
                         "output": a["output"], **grade, "source": "collect"})
        t_in, t_out = t_in + int(a["tokens_in"] or 0), t_out + int(a["tokens_out"] or 0)
    n = len(verdicts)
    return EvalResult(model=name, adapter=None, n=n, valid_rate=sum(v["valid"] for v in verdicts) / max(n, 1),
                      correct_rate=sum(bool(v["correct"]) for v in verdicts) / max(n, 1),
                      tokens_in=t_in + (generated.tokens_in if generated else 0),
                      tokens_out=t_out + (generated.tokens_out if generated else 0),
                      wall_s=generated.wall_s if generated else 0.0, errors=generated.errors if generated else 0,
                      verdicts=verdicts)


def select_candidates(val_rows: pd.DataFrame, cluster: int, cands: list[Candidate],
                      grader: Callable[[dict[str, Any], str], CallGrade], **kw: Any) -> Selection:
    """`select_clusters` for one cluster."""
    return select_clusters({cluster: val_rows}, cands, grader, **kw)[cluster]


def select_clusters(vals: dict[int, pd.DataFrame], cands: list[Candidate],
                    grader: Callable[[dict[str, Any], str], CallGrade], *, engines: dict[str, Any] | None = None,
                    threads: int | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
                    progress: Any = None, answers: pd.DataFrame | None = None, constrained: bool = True,
                    scheduler: str = "continuous", licenses: list[str] | None = None,
                    max_memory_mb: float | None = None) -> dict[int, Selection]:
    """Evaluate each candidate that passes RULE's gates (`licenses`, `max_memory_mb`) on each cluster's validation
    rows (`vals`: cluster id -> rows) and choose one per cluster. `answers` (`collected_answers`): a candidate's own
    graded answers from collect stand for those calls, and only the rest are generated (each verdict's `source` says
    which), every cluster's in one pass per candidate (`evaluate_parts`). `engines` caches loaded engines by
    candidate name (a model loads once per convert)."""
    from slmshift.serve.engines.base import get_engine_class

    engines = engines if engines is not None else {}
    cands, excluded = eligible(cands, licenses, max_memory_mb)
    results: dict[int, list] = {cid: [] for cid in vals}
    for c in cands:
        reused = {cid: _reused(answers, c, v) for cid, v in vals.items()}
        todo = {cid: v[~v["record_id"].isin(reused[cid])] if reused[cid] else v for cid, v in vals.items()}
        generated: dict[int, EvalResult] = {}
        if any(len(t) for t in todo.values()):
            spec = c.model_spec(threads=threads, scheduler=scheduler)
            if c.name not in engines:
                engines[c.name] = get_engine_class(spec.backend)(spec)
            generated = evaluate_parts([(cid, t, None) for cid, t in todo.items()], spec, grader,
                                       engine=engines[c.name], batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       progress=progress, constrained=constrained,
                                       desc=f"zero-shot {c.name} on {len(vals)} cluster(s)")
        for cid, v in vals.items():
            g = generated.get(cid)
            results[cid].append((c, _merge(v, reused[cid], g if g is not None and g.n else None,
                                           c.model_spec(threads=threads).name, grader)))
    out = {}
    for cid, res in results.items():
        chosen, before = choose(res)
        table = [{"candidate": c.name, "source": c.source, "params": c.params, "license": c.license,
                  "memory_mb": c.memory_mb, "context_length": c.context_length, "n": ev.n,
                  "accuracy": round(ev.correct_rate, 4), "valid_rate": round(ev.valid_rate, 4),
                  "cost_usd": cost_usd(c, ev), "score": score(c, ev), "chosen": c is chosen} for c, ev in res]
        out[cid] = Selection(cid, chosen, before, table, excluded)
    return out
