"""Cradle-like computer control on MiniWoB++ (issue 5). Importing registers the "cradle" scenario.

Each episode is one MiniWoB++ task instance (`"<task>#<seed>"`) played in real headless Chromium. Every turn
runs Cradle's modules as model calls, each routed LLM/SLM and logged:

    info_gathering   which element on screen matters now            (reasoning)
    self_reflection  did the last action do the right thing? yes/no (reasoning; from the 2nd turn)
    task_inference   the current subtask                            (reasoning)
    action_planning  the next action in the grammar of `actions.py` (template)

The action is executed in the browser; the task's own reward grades the episode. An unparsable or invalid
action is a failed call and costs a turn (the episode goes on within `max_steps` turns). Successful action
sequences are curated into a skill library and recalled by embedding similarity as few-shot examples. A DOM
solver (`teacher.py`) gives every call its hidden reference, so a simulated teacher plays offline.

Browsers are Ray actors (one Chromium each) in a pool per team actor, started on the team's first episode
(never in the driver, which only lists tasks) and dying with the team. A browser that dies mid-episode is
restarted and the episode replayed from its reset, with the same seed.

Nothing here imports selenium or miniwob at import time; `browser.py` does so inside the browser actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from slmshift.platform.scenario import (
    EpisodeSession, Outcome, Scenario, ScenarioOptions, register_scenario, require_known, went_right,
)
from slmshift.platform.types import Hidden
from slmshift.scenarios.cradle import prompts
from slmshift.scenarios.cradle.actions import Action, action_constraint, parse_action
from slmshift.scenarios.cradle.browser import browser_paths  # stdlib only at import; selenium loads in the actor
from slmshift.scenarios.cradle.catalog import UNSUPPORTED, all_tasks, supported_tasks, unsupported_reason
from slmshift.scenarios.cradle.grading import grade_output, page_context, target_of
from slmshift.scenarios.cradle.observe import clickable_refs, element_line, render
from slmshift.scenarios.cradle.pool import BrowserPool, pool_size
from slmshift.scenarios.cradle.skills import Skill, SkillLibrary, generalize
from slmshift.scenarios.cradle.teacher import TASKS, Plan, Unsolvable, distractor_actions, solve

Module = Literal["info_gathering", "self_reflection", "task_inference", "action_planning"]
MODULES: tuple[str, ...] = ("info_gathering", "self_reflection", "task_inference", "action_planning")
DEFAULT_TASKS = [t for t in TASKS if not t.startswith("click-test")]


class CradleOptions(ScenarioOptions):
    tasks: list[str] = Field(default=DEFAULT_TASKS, min_length=1, description=(
        "MiniWoB++ tasks, cycled over the episodes: any task miniwob registers (`miniwob/<task>-v1`) that the "
        "action grammar can express, or 'all' for every such task. Arms that can call a simulated teacher are "
        f"limited to its DOM solver's tasks: {', '.join(TASKS)}."))
    max_steps: int = Field(default=14, ge=1, le=100,
                           description="Turns per episode; an invalid action uses a turn. use-spinner needs up to 13.")
    modules: list[Module] = Field(default=list(MODULES), min_length=1,
                                  description="Cradle modules run each turn; action_planning is required.")
    skills: bool = Field(default=True, description="Curate successful action sequences and recall them as examples.")
    skill_examples: int = Field(default=1, ge=0, le=5, description="Skills recalled into the action prompt.")
    browsers_per_team: int = Field(default=2, ge=1, le=32,
                                   description="Browser actors per team actor (capped by concurrency and memory).")
    browser_cpus: float = Field(default=0.1, ge=0, le=8, description="CPUs each browser actor reserves in Ray.")
    episode_max_s: float = Field(default=600.0, ge=10, description="MiniWoB's per-episode wall-clock limit, "
                                 "raised from its 10 s so model latency does not decide the reward.")
    crash_retries: int = Field(default=2, ge=0, le=5, description="Replays of an episode whose browser died.")
    max_elements: int = Field(default=30, ge=5, description="Page elements shown in prompts.")
    info_max_tokens: int = Field(default=24, ge=1, description="Token budget of information gathering.")
    reflection_max_tokens: int = Field(default=4, ge=1, description="Token budget of self-reflection.")
    inference_max_tokens: int = Field(default=24, ge=1, description="Token budget of task inference.")
    action_max_tokens: int = Field(default=24, ge=1, description="Token budget of action planning.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature of every call (0 = greedy).")

    @field_validator("tasks", mode="before")
    @classmethod
    def _all_tasks(cls, v: Any) -> Any:
        return list(supported_tasks()) if v == "all" or v == ["all"] else v

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        known = all_tasks()
        require_known(v, known, "MiniWoB++ tasks", f"miniwob registers {len(known)}: {', '.join(known)}")
        bad = [unsupported_reason(t) for t in dict.fromkeys(v) if t in UNSUPPORTED]
        if bad:
            raise ValueError("; ".join(bad) + ". Fix: leave them out (`tasks: all` means every task it can express)")
        return v

    def check_models(self, models: list[Any], policies: list[Any]) -> list[tuple[str, str]]:
        """An arm that can send a call kind of this scenario (or its shadow) to a `simulated` model is limited to the
        DOM solver's tasks, since the simulated teacher answers from the solver. One ("options.tasks", message) per
        such arm when `tasks` goes beyond them; [] otherwise."""
        unsolved = [t for t in dict.fromkeys(self.tasks) if t not in TASKS]
        if not unsolved:
            return []
        first = {tier: next((m for m in models if m.tier == tier), None) for tier in ("llm", "slm")}
        by_name = {m.name: m for m in models}
        problems = []
        for p in policies:
            table = getattr(p, "map", None)
            tiers = {table.get(k, p.default) for k in self.modules} if isinstance(table, dict) else set(p.tiers())
            shadow = getattr(p, "shadow", "none")
            tiers |= {"llm", "slm"} if shadow == "both" else ({shadow} if shadow in ("llm", "slm") else set())
            sims = []
            for tier in sorted(tiers):
                chosen = getattr(p, f"{tier}_model", None)
                m = by_name.get(chosen) if chosen else first[tier]
                if m is not None and m.backend == "simulated":
                    sims.append(f"{m.name!r} ({tier})")
            if sims:
                shown = ", ".join(unsolved[:8]) + (f" and {len(unsolved) - 8} more" if len(unsolved) > 8 else "")
                problems.append(("options.tasks", (
                    f"policy arm {p.label!r} can send cradle calls to the simulated teacher {', '.join(sims)}, which "
                    f"answers only on the tasks its DOM solver knows ({', '.join(TASKS)}), not on {shown}. Fix: "
                    "route every cradle call kind of that arm (and its shadow) to a real model (backend hf or "
                    "openai), or keep `tasks` to the solver's list")))
        return problems

    @field_validator("modules")
    @classmethod
    def _planning(cls, v: list[str]) -> list[str]:
        if "action_planning" not in v:
            raise ValueError("action_planning is required: it is the module that acts")
        return [m for m in MODULES if m in v]  # run in Cradle's order whatever the YAML's


@dataclass(frozen=True)
class CradleTask:
    id: str  # "<miniwob-task>#<seed>"; reports group by the part before '#'
    name: str
    seed: int


class BrowserCrashed(RuntimeError):
    """The episode's browser died; it has been replaced and the episode can be replayed."""


@register_scenario
class CradleScenario(Scenario):
    kind = "cradle"
    Options = CradleOptions
    options: CradleOptions

    def __init__(self, spec, seed: int):
        super().__init__(spec, seed)
        self._pool = None
        self._skills = None

    @classmethod
    def check_models(cls, spec: Any, models: list[Any], policies: list[Any]) -> list[tuple[str, str]]:
        """Config cross-check with the experiment's `models:` and `router.policies` (see `CradleOptions.check_models`);
        (field path within the scenario entry, message) each."""
        try:
            o = cls.Options.model_validate(spec.options)
        except ValidationError:
            return []  # the options check reports it
        return o.check_models(models, policies)

    def token_budget(self, call_kind: str) -> int | None:
        o = self.options
        return {"action_planning": o.action_max_tokens, "info_gathering": o.info_max_tokens,
                "self_reflection": o.reflection_max_tokens, "task_inference": o.inference_max_tokens}.get(call_kind)

    def grade_call(self, task_id: str, call_kind: str, output: str, *, context: Any = None):
        """Action validity in the strict grammar and, where `context` carries the page and the solver knows the
        task, agreement with the solver's next action (see `grading.py` for each module and the context)."""
        return grade_output(task_id, call_kind, output, context)

    def tasks(self) -> list[CradleTask]:
        browser_paths()  # the runner lists tasks in the driver: a missing browser fails here, with the fix
        names = self.options.tasks
        out = []
        for i in range(self.spec.episodes):
            name, seed = names[i % len(names)], self.seed * 100_000 + i // len(names)
            out.append(CradleTask(id=f"{name}#{seed}", name=name, seed=seed))
        return out

    # -- resources, created in the team actor on first use ----------------------------------------

    def pool(self):
        if self._pool is None:
            browser_paths()  # fail with the install hint before starting any actor
            o = self.options
            self._pool = BrowserPool(pool_size(o.browsers_per_team, self.spec.concurrency, self.spec.teams),
                                     o.browser_cpus, o.episode_max_s)
        return self._pool

    def skills(self):
        if self._skills is None and self.options.skills:
            self._skills = SkillLibrary()
        return self._skills

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    # -- episodes -----------------------------------------------------------------------------------

    async def run_episode(self, task: CradleTask, session: EpisodeSession) -> Outcome:
        from ray.exceptions import RayActorError

        pool = self.pool()
        browser = await pool.acquire()
        crashes = 0
        try:
            while True:
                try:
                    outcome = await self._play(task, session, browser)
                    if crashes:
                        outcome = outcome.model_copy(update={"detail": f"{outcome.detail} (replayed after "
                                                                       f"{crashes} browser crash(es))"[:300]})
                    return outcome
                except (BrowserCrashed, RayActorError) as e:
                    crashes += 1
                    if isinstance(e, RayActorError):
                        browser = pool.replace(browser)
                    if crashes > self.options.crash_retries:
                        raise RuntimeError(f"browser died {crashes} times on {task.id}") from e
        finally:
            pool.release(browser)

    async def _play(self, task: CradleTask, session: EpisodeSession, browser) -> Outcome:
        o = self.options
        obs = await browser.reset.remote(task.name, task.seed)
        taken: list[Action] = []
        taken_lines: list[str] = []  # actions annotated with their element, for skills
        last: tuple[Action, Plan | None, str] | None = None  # (action, plan it was measured against, page)
        steps, reward, invalid, reason = 0, 0.0, 0, "step budget used up"
        key = generalize(obs["utterance"], obs["fields"])
        examples = self._examples(key)
        for _turn in range(o.max_steps):
            try:
                plan: Plan | None = solve(task.name, obs, taken)
            except Unsolvable:
                plan = None
            page = render(obs, o.max_elements)
            refs = clickable_refs(obs)
            ctx = page_context(obs, taken)
            notes, notes_ok = await self._notes(task, session, obs, page, refs, plan, last, taken, ctx)
            call = await session.call(
                role="actor", call_kind="action_planning", category="template", constraint=action_constraint(refs),
                messages=prompts.action_messages(page, notes, [str(a) for a in taken], examples),
                max_tokens=o.action_max_tokens, temperature=o.temperature,
                hidden=self._action_hidden(obs, plan, notes_ok),
                check=lambda text, ctx=ctx: grade_output(task.id, "action_planning", text, ctx), context=ctx)
            if not call.valid:
                invalid += 1
                continue
            action = parse_action(call.text, refs)
            result = await browser.step.remote(*action.env_args())
            if result["crashed"]:
                raise BrowserCrashed(result["reason"])
            steps += 1
            taken.append(action)
            taken_lines.append(f"{action}  # {element_line(obs, action.ref).split('] ', 1)[-1]}"
                               if action.ref is not None else str(action))
            last = (action, plan, page)
            if result["done"]:
                reward, reason = result["reward"], "done"
                break
            obs = result
        success = reward > 0
        if success and self.skills() is not None:
            self.skills().add(Skill(task.name, obs_utterance(obs, task), tuple(taken_lines), key=key))
        detail = f"reward {reward:g} after {steps} action(s), {invalid} invalid; {reason}"
        return Outcome(success=success, reward=reward, steps=steps, detail=detail)

    def _examples(self, utterance: str) -> list[str]:
        lib = self.skills()
        if lib is None or not self.options.skill_examples:
            return []
        return [s.as_example() for s in lib.retrieve(utterance, self.options.skill_examples)]

    def _action_hidden(self, obs: dict, plan: Plan | None, upstream_ok: bool = True) -> Hidden | None:
        if plan is None:
            return None
        wrong = [str(a) for a in distractor_actions(obs, plan)] + [f"{plan.action.kind} the element"]
        return Hidden(answer=str(plan.action), distractors=wrong, upstream_ok=upstream_ok)

    async def _notes(self, task: CradleTask, session: EpisodeSession, obs: dict, page: str, refs: set[int],
                     plan: Plan | None, last, taken: list[Action], ctx: dict) -> tuple[str, bool]:
        """Run the modules before action planning; their outputs become the planner's notes. Returns the notes
        and whether every module that wrote them got it right (a wrong note handicaps a simulated teacher)."""
        o, notes = self.options, ""
        made = []  # this turn's module outputs that went into the notes (an invalid one is left out of them)
        target = target_of(obs, plan)
        if "info_gathering" in o.modules:
            answer = element_line(obs, target) if target is not None else None
            others = [element_line(obs, r) for r in sorted(refs - {target})[-3:]]
            c = await session.call(
                role="observer", call_kind="info_gathering", category="reasoning", expect="text",
                messages=prompts.info_messages(page), max_tokens=o.info_max_tokens, temperature=o.temperature,
                hidden=Hidden(answer=answer, distractors=others) if answer else None,
                check=lambda text: grade_output(task.id, "info_gathering", text, ctx), context=ctx)
            if c.valid:
                made.append(c)
                notes += f"Relevant element: {c.text.strip()[:80]}\n"
        if "self_reflection" in o.modules and last is not None:
            action, then_plan, last_page = last
            expected = (action == then_plan.action) if then_plan is not None else None
            c = await session.call(
                role="reflector", call_kind="self_reflection", category="reasoning", expect="text",
                messages=prompts.reflection_messages(page, str(action), last_page),
                max_tokens=o.reflection_max_tokens, temperature=o.temperature,
                hidden=None if expected is None else Hidden(answer="yes" if expected else "no",
                                                            distractors=["no" if expected else "yes"]),
                check=lambda text: grade_output(task.id, "self_reflection", text, {"expected": expected}),
                context={"expected": expected})
            if c.valid:
                made.append(c)
                ok = c.text.strip().lower().lstrip("\"'*").startswith("yes")
                notes += f"Last action {action}: {'worked' if ok else 'did not help; try something else'}\n"
        if "task_inference" in o.modules:
            ref = plan.action.ref if plan else None
            wrong = [f"click [{r}]" for r in sorted(refs - {ref})[-2:]]
            c = await session.call(
                role="planner", call_kind="task_inference", category="reasoning", expect="text",
                messages=prompts.inference_messages(page, notes, [str(a) for a in taken]),
                max_tokens=o.inference_max_tokens, temperature=o.temperature,
                hidden=Hidden(answer=plan.subtask, distractors=wrong, upstream_ok=went_right(*made)) if plan else None,
                check=lambda text: grade_output(task.id, "task_inference", text, ctx), context=ctx)
            if c.valid:
                made.append(c)
                notes += f"Subtask: {c.text.strip()[:100]}\n"
        return notes, went_right(*made)


def obs_utterance(obs: dict, task: CradleTask) -> str:
    """The utterance of the episode (a finished page has none; the skill keeps the task's first one)."""
    return obs.get("utterance") or task.name
