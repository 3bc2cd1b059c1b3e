"""The five roles' behaviour for one episode: each turns the message it watches into model calls (through the
episode session, so every call is routed and logged) and publishes its result to the pool.

Call kinds and the paper's categories: prd, tasks, summary -> template (structured JSON); design, code,
tests -> reasoning; debug -> debugging. A call whose output fails its checker is retried with the error fed
back, up to `format_retries` times; its last output stands as a recorded failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from slmshift.platform.sandbox import SandboxLimits, SandboxResult, run_python_async
from slmshift.platform.scenario import EpisodeSession, went_right
from slmshift.platform.types import Hidden
from slmshift.scenarios.metagpt import prompts, teacher
from slmshift.scenarios.metagpt.data import Problem, answer_key_paths, grade_code_async
from slmshift.scenarios.metagpt.grading import check_design, check_summary, grade_output
from slmshift.scenarios.metagpt.schemas import Check, check_tests, constraint_for, extract_code
from slmshift.scenarios.metagpt.sop import Message, MessagePool

CATEGORY = {"prd": "template", "design": "reasoning", "tasks": "template", "code": "reasoning",
            "debug": "debugging", "tests": "reasoning", "summary": "template"}


@dataclass
class Company:
    """One episode's team on one problem."""

    problem: Problem
    session: EpisodeSession
    max_tokens: dict[str, int]
    format_retries: int = 1
    temperature: float = 0.0
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    runs: list[SandboxResult] = field(default_factory=list)  # HumanEval test runs, in order
    final_code: str | None = None
    # the latest call of each kind, so a later step can tell the teacher whether what it was handed was right
    last: dict[str, Any] = field(default_factory=dict)

    def behaviours(self) -> dict[str, Any]:
        return {"ProductManager": self.product_manager, "Architect": self.architect,
                "ProjectManager": self.project_manager, "Engineer": self.engineer, "QaEngineer": self.qa_engineer}

    async def _call(self, role: str, kind: str, messages: list[dict[str, str]], hidden: Hidden,
                    check: Callable[[str], Check], context: Any = None,
                    upstream_ok: bool = True) -> tuple[Any, str, Check]:
        """One logical call with its format retries. Returns (parsed value or None, last text, last check).
        `upstream_ok`: was what this prompt carries from earlier steps right (wrong handicaps a simulated teacher)."""
        verdict = Check(False, False, "not called")
        text = ""
        hidden = hidden.model_copy(update={"upstream_ok": upstream_ok})
        for _ in range(self.format_retries + 1):
            # the checker runs inside the call pipeline (which records its verdict and returns it with the result)
            res = await self.session.call(
                role=role, call_kind=kind, category=CATEGORY[kind], messages=messages, constraint=constraint_for(kind),
                max_tokens=self.max_tokens[kind], temperature=self.temperature, hidden=hidden, check=check,
                context=context)
            text = res.text
            self.last[kind] = res
            verdict = res.verdict if res.verdict is not None else Check(False, False, res.error or "no output")
            if res.valid and verdict.valid:
                return verdict.value, text, verdict
            messages = messages + [{"role": "assistant", "content": text},
                                   prompts.retry_message(res.error or verdict.reason, kind)]
        return None, text, verdict

    def _right(self, *kinds: str) -> bool:
        return went_right(*(self.last.get(k) for k in kinds))

    # --- roles ---------------------------------------------------------------------------------------------

    async def product_manager(self, msg: Message, pool: MessagePool) -> list[Message]:
        p = self.problem
        _, text, _ = await self._call("ProductManager", "prd", prompts.prd_messages(p), teacher.prd_ref(p),
                                      lambda t: grade_output(p, "prd", t))
        return [Message("prd", "ProductManager", text)]

    async def architect(self, msg: Message, pool: MessagePool) -> list[Message]:
        p = self.problem
        _, text, _ = await self._call("Architect", "design", prompts.design_messages(p, msg.content),
                                      teacher.design_ref(p), lambda t: check_design(t, p.entry_point),
                                      upstream_ok=self._right("prd"))
        return [Message("design", "Architect", text)]

    async def project_manager(self, msg: Message, pool: MessagePool) -> list[Message]:
        p = self.problem
        _, text, _ = await self._call("ProjectManager", "tasks", prompts.tasks_messages(p, msg.content),
                                      teacher.tasks_ref(p), lambda t: grade_output(p, "tasks", t),
                                      upstream_ok=self._right("design"))
        return [Message("tasks", "ProjectManager", text)]

    async def engineer(self, msg: Message, pool: MessagePool) -> list[Message]:
        p = self.problem
        check = lambda t: extract_code(t, p.entry_point, p.prompt)  # noqa: E731
        if msg.type == "test_report":  # QA sent it back: debug the last code with the failure output
            messages = prompts.debug_messages(p, self.final_code or "", msg.content)
            code, text, _ = await self._call("Engineer", "debug", messages, teacher.code_ref(p), check)
        else:
            design, tasks = pool.latest("design"), pool.latest("tasks")
            messages = prompts.code_messages(p, design.content if design else "", tasks.content if tasks else "")
            code, text, _ = await self._call("Engineer", "code", messages, teacher.code_ref(p), check,
                                             upstream_ok=self._right("design", "tasks"))
        if code is not None:
            self.final_code = code
        return [Message("code", "Engineer", text, data=code)]

    async def qa_engineer(self, msg: Message, pool: MessagePool) -> list[Message]:
        p = self.problem
        code = msg.data
        report: list[str] = []
        if code is None:
            passed, reason = False, "the Engineer's reply held no parsable code defining " + p.entry_point
            report.append(reason)
        else:
            # the tool: HumanEval's tests (the grader; they call the code in a process of its own) and QA's own
            # asserts, each in the sandbox. The grader runs first only so that QA's test-writing call can tell a
            # simulated teacher whether the code it was handed is right; QA's prompt does not see the result.
            run = await grade_code_async(p, code, self.limits)
            self.runs.append(run)
            tests, _, _ = await self._call("QaEngineer", "tests", prompts.tests_messages(p, code),
                                           teacher.tests_ref(p), lambda t: check_tests(t, p.entry_point),
                                           upstream_ok=run.ok)
            passed, reason = run.ok, run.reason
            report.append(f"HumanEval tests: {'passed' if run.ok else 'FAILED: ' + run.reason}")
            if not run.ok and run.stderr.strip():
                report.append("stderr (last lines):\n" + "\n".join(run.stderr.strip().splitlines()[-6:]))
            if tests is not None:
                extra = await run_python_async(f"{code}\n\n{tests}\n", self.limits, hide=answer_key_paths())
                report.append(f"QA's own tests: {'passed' if extra.ok else 'FAILED: ' + extra.reason}")
        tool_output = "\n".join(report)
        summary, text, _ = await self._call(
            "QaEngineer", "summary", prompts.summary_messages(p, tool_output), teacher.summary_ref(passed, reason),
            lambda t: check_summary(t, passed), context={"tests_passed": passed})
        # MetaGPT routes on the summary's send_to; an unusable summary falls back on the test result itself
        send_back = summary.send_to == "Engineer" if summary is not None else not passed
        rounds, budget = pool.count("test_report"), pool.feedback_budget("QaEngineer", "Engineer")
        if send_back and rounds < budget:
            return [Message("test_report", "QaEngineer", tool_output)]
        return [Message("done", "QaEngineer", text, data=passed)]

