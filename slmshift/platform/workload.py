"""Workload files: the sessions a workload-file teacher answers (`backend: workload`, serve/engines/workload.py).

Each session is one question of a tool-using agent, the tool calls that answer it in order, and the final answer.
Arguments and the answer may quote earlier tool results: `{results[0]}` is the first result's text,
`{results[1].price}` a field of the second result read as JSON; a string that is a single reference keeps the field's
JSON type. Files are JSON lines (`.jsonl`) or a YAML list; every problem names the file, the line, the field and the
fix. The ground floor holds the schema so that a YAML is checked before anything is deployed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmshift.platform.errors import SlmshiftError

__all__ = ["WorkloadSession", "WorkloadStep", "read_workload", "resolve", "norm_question", "REF"]

REF = re.compile(r"\{results\[(\d+)\]((?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")


class WorkloadStep(BaseModel):
    """One tool call of a session."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tool: str = Field(min_length=1, description="The function the agent must call (one of its declared tools).")
    arguments: dict[str, Any] = Field(default_factory=dict, description="Its arguments; strings may quote earlier "
                                      "results as {results[i]} or {results[i].field}.")


class WorkloadSession(BaseModel):
    """One line of a workload file: an agent's question, the tool calls that answer it, the final answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    workload: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The workload id (the client's "
                          "X-Workload-Id).")
    session: str = Field(min_length=1, description="Session id, unique within its workload.")
    question: str = Field(min_length=1, description="The agent's user message that opens the session.")
    steps: list[WorkloadStep] = Field(default_factory=list, description="Tool calls, in order.")
    answer: str = Field(min_length=1, description="The final answer; may quote any step's result.")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @model_validator(mode="after")
    def _references_look_back(self) -> "WorkloadSession":
        for i, step in enumerate(self.steps):
            for j in _refs(step.arguments):
                if j >= i:
                    raise ValueError(f"steps[{i}].arguments quotes results[{j}], which is not known before step {i} "
                                     f"(a step may quote results[0] to results[{i - 1}])" if i else
                                     f"steps[0].arguments quotes results[{j}]: the first step has no result to quote")
        bad = [j for j in _refs(self.answer) if j >= len(self.steps)]
        if bad:
            raise ValueError(f"answer quotes results[{bad[0]}] but the session has {len(self.steps)} step(s)")
        return self


def _refs(value: Any) -> list[int]:
    if isinstance(value, str):
        return [int(m.group(1)) for m in REF.finditer(value)]
    if isinstance(value, dict):
        return [j for v in value.values() for j in _refs(v)]
    if isinstance(value, list):
        return [j for v in value for j in _refs(v)]
    return []


def _lookup(results: list[str], index: int, path: str) -> Any:
    text = results[index].strip()
    if not path:
        return text
    try:
        value: Any = json.loads(text)
    except ValueError:
        raise LookupError(f"results[{index}] is not JSON, so {path!r} cannot be read from it: {text[:80]!r}")
    for key in path.strip(".").split("."):
        if not isinstance(value, dict) or key not in value:
            raise LookupError(f"results[{index}] has no field {path!r}: {text[:80]!r}")
        value = value[key]
    return value


def resolve(value: Any, results: list[str]) -> Any:
    """`value` with its {results[i].field} references filled from `results` (untrusted tool output)."""
    if isinstance(value, str):
        whole = REF.fullmatch(value)
        if whole:  # a lone reference keeps the JSON type of what it quotes
            return _lookup(results, int(whole.group(1)), whole.group(2))

        def text(m: re.Match) -> str:
            v = _lookup(results, int(m.group(1)), m.group(2))
            return v if isinstance(v, str) else json.dumps(v)

        return REF.sub(text, value)
    if isinstance(value, dict):
        return {k: resolve(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, results) for v in value]
    return value


def norm_question(text: str) -> str:
    return " ".join(text.split())


def read_workload(path: str | Path) -> list[WorkloadSession]:
    """The sessions of a workload file: JSON lines (`.jsonl`) or a YAML list (`.yaml`/`.yml`). Every problem is a
    SlmshiftError naming the file, the line or entry, the field and the fix."""
    import yaml

    p = Path(path).expanduser()
    fix_path = "Fix: models[].source of a `backend: workload` model names a workload file (JSON lines or YAML)."
    if not p.is_file():
        raise SlmshiftError(f"workload file {p}: not found. {fix_path}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlmshiftError(f"workload file {p}: cannot read it ({type(e).__name__}). {fix_path}") from None
    entries: list[tuple[str, Any]] = []
    if p.suffix in (".yaml", ".yml"):
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SlmshiftError(f"workload file {p}: not valid YAML ({str(e).splitlines()[0]}). Fix: a YAML list of "
                                "sessions.") from None
        if not isinstance(doc, list):
            raise SlmshiftError(f"workload file {p}: must be a YAML list of sessions (workload, session, question, "
                                "steps, answer).")
        entries = [(f"entry {i + 1}", e) for i, e in enumerate(doc)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((f"line {n}", json.loads(line)))
            except ValueError as e:
                raise SlmshiftError(f"workload file {p}, line {n}: not JSON ({e}). Fix: one JSON object per line "
                                    "(workload, session, question, steps, answer).") from None
    sessions, problems = [], []
    for where, raw in entries:
        try:
            sessions.append(WorkloadSession.model_validate(raw))
        except ValidationError as e:
            for err in e.errors():
                field = ".".join(str(x) for x in err["loc"]) or "(the entry)"
                problems.append(f"{where}, field {field}: {err['msg'].removeprefix('Value error, ')}")
    seen: dict[tuple[str, str], str] = {}
    asked: dict[tuple[str, str], str] = {}
    for (where, _), s in (zip(entries, sessions) if not problems else ()):
        key = (s.workload, s.session)
        if key in seen:
            problems.append(f"{where}, field session: {s.session!r} repeats {seen[key]} of workload {s.workload!r}")
        seen[key] = where
        q = (s.workload, norm_question(s.question))
        if q in asked:
            problems.append(f"{where}, field question: the same question as {asked[q]} of workload {s.workload!r} "
                            "(the teacher finds a session by its question)")
        asked[q] = where
    if problems:
        raise SlmshiftError(f"workload file {p}: " + "; ".join(problems[:10])
                            + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
                            + ". Fix: each entry needs workload, session, question, answer and optional steps "
                              "[{tool, arguments}]; see the docstring of slmshift/platform/workload.py.")
    if not sessions:
        raise SlmshiftError(f"workload file {p}: no sessions. Fix: one session per line.")
    return sessions


