"""The scenario interface and its registry.

A scenario turns its config into tasks and runs one episode of a task through an `EpisodeSession` (built by
`agents/`), returning the benchmark's own verdict. Scenario packages fill the registry on import; the runner
looks kinds up here, so the platform never imports a scenario.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from slmshift.platform.config import ScenarioSpec
from slmshift.platform.types import Hidden, OutputConstraint


class Verdict(Protocol):
    """What a call checker returns: did the output parse, is it right, and why not."""

    valid: bool
    correct: bool | None
    reason: str


class CallResult(Protocol):
    text: str
    valid: bool | None
    correct: bool | None
    error: str | None
    verdict: Any  # what the call's `check` returned for this output, or None


def went_right(*results: CallResult | None) -> bool:
    """Did every given upstream call produce a usable, not-wrong output? (None: a step that was not made.) What a
    scenario passes as `Hidden.upstream_ok`, so a simulated teacher handed a wrong earlier step does worse."""
    return all(r is None or bool(r.valid and r.correct is not False) for r in results)


class EpisodeSession(Protocol):
    """Made per episode by the agent layer; numbers calls, routes them, logs them.

    `check(text) -> Verdict` grades the output in-process (and grades shadow outputs too, so it must not change
    scenario state); `context` is what `grade_call` needs to grade this call offline (e.g. the page state)."""

    async def call(self, *, role: str, call_kind: str, messages: list[dict[str, str]], expect: str = "text",
                   category: str = "template", json_schema: dict | None = None, max_tokens: int = 128,
                   temperature: float = 0.0, hidden: Hidden | None = None, check: Any = None,
                   context: Any = None, constraint: OutputConstraint | None = None) -> CallResult: ...


class Outcome(BaseModel):
    model_config = ConfigDict(frozen=True)
    success: bool
    reward: float
    steps: int = 0  # environment actions taken, where the scenario acts in one
    detail: str = ""


class ScenarioOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def require_known(values: Any, known: Any, what: str, listing: str | None = None) -> None:
    """Option validators' one check: every value is a known one; the error lists what is available."""
    known = set(known)
    bad = [v for v in values if v not in known]
    if bad:
        raise ValueError(f"unknown {what} {bad}; {listing or 'available: ' + ', '.join(sorted(known))}")


class Scenario(abc.ABC):
    kind: ClassVar[str]
    Options: ClassVar[type[ScenarioOptions]] = ScenarioOptions

    def __init__(self, spec: ScenarioSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.options = self.Options.model_validate(spec.options)

    @abc.abstractmethod
    def tasks(self) -> list[Any]:
        """`spec.episodes` picklable tasks, each with a string `id`, deterministic for `seed`."""

    @abc.abstractmethod
    async def run_episode(self, task: Any, session: EpisodeSession) -> Outcome:
        """Run the team on one task and grade it with the benchmark's own checker."""

    def grade_call(self, task_id: str, call_kind: str, output: str, *, context: Any = None) -> Verdict | None:
        """Grade one logged call offline with the scenario's own checker, rebuilt from the task id.

        The S1 log holds no hidden references, so held-out evaluation of a tuned SLM (`slmshift convert`)
        asks the scenario. Return None where this scenario cannot grade the call (the default); the caller
        then falls back to comparing with the logged output. Must never raise on bad model output. Synchronous:
        callers on an event loop use `asyncio.to_thread`. `context` carries what a call needs beyond its output
        (e.g. page state), where the caller has it.
        """
        return None

    def token_budget(self, call_kind: str) -> int | None:
        """The `max_tokens` this scenario serves calls of `call_kind` with (from its options), so offline
        evaluation (`slmshift convert`) generates with the budget serving used; None where it does not say."""
        return None


_SCENARIOS: dict[str, type[Scenario]] = {}


def register_scenario(cls: type[Scenario]) -> type[Scenario]:
    _SCENARIOS[cls.kind] = cls
    return cls


def scenario_class(kind: str) -> type[Scenario]:
    if kind not in _SCENARIOS:
        raise KeyError(f"unknown scenario {kind!r}; available: {', '.join(sorted(_SCENARIOS)) or 'none registered'}")
    return _SCENARIOS[kind]


def scenario_options() -> dict[str, type[ScenarioOptions]]:
    """kind -> options model, for config validation."""
    return {k: c.Options for k, c in _SCENARIOS.items()}
