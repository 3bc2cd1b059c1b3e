"""What every API of the gateway shares: one call in slmshift's terms (`Call`), the prompt a model reads for it, the
tool calls parsed from its output, the check that gives the call its validity, and the answer each API renders.

Chat completions, Responses and legacy completions each map their request onto a `Call` and render an `Answer` in
their own shape, so one agent's prompts read the same in the S1 log whichever API it speaks.
"""

from __future__ import annotations

import ast
import itertools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.constraint import call_arguments, tool_call_text
from slmshift.platform.types import TEXT, OutputConstraint
# What the simulated engine answers a call that has no scenario reference (every gateway call): labelled, never a
# real answer (its wording and pattern live in serve/engines/simulated.py).
from slmshift.serve.engines.simulated import PLACEHOLDER
from slmshift.serve.gateway.errors import APIError


# Ids: a random prefix per process and a counter. uuid4 per id (several a request) took 2% of the ingress's CPU.
_PREFIX, _COUNTER = uuid.uuid4().hex[:12], itertools.count()


def new_id(kind: str) -> str:
    """A unique id such as `resp_<process prefix><counter>` (kind: chatcmpl-, resp_, call_, ...)."""
    return f"{kind}{_PREFIX}{next(_COUNTER):012x}"


class RequestBase(BaseModel):
    """The fields every API's request shares. The rest are accepted and ignored: OpenAI's SDKs and agent frameworks
    send many we do not use."""

    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool = False
    user: str | None = None
    metadata: dict[str, Any] | None = None


class SampledRequestBase(RequestBase):
    """Chat and legacy completions also take a seed, stop sequences and stream options."""

    seed: int | None = None
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None


@dataclass
class Call:
    """One gateway request as the call pipeline takes it."""

    model: str
    messages: list[dict[str, str]]  # plain chat messages: tool calls and tool results as text the model reads
    tools: list[dict[str, Any]] = field(default_factory=list)  # function specs: {name, description?, parameters?}
    tool_choice: str = "auto"  # "auto" | "none" | "required" | the name of the one function that must be called
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = None
    wants_json: bool = False
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    user: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "chat"  # the call kind when the client names none


@dataclass
class Answer:
    """A served call, API-neutral: final text (stop sequences applied) or tool calls, why it ended, token counts."""

    text: str
    tool_calls: list[dict[str, Any]] | None  # [{"id", "name", "arguments" (a JSON string)}]
    finish: str  # "stop" | "length" | "tool_calls"
    tokens_in: int
    tokens_out: int
    fingerprint: str


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list (chat `text`, Responses `input_text` /
    `output_text`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content
                   if isinstance(p, dict) and p.get("type", "text") in ("text", "input_text", "output_text"))


def function_spec(tool: Any, where: str) -> dict[str, Any]:
    """A function tool, in chat's nested shape or Responses' flat one, as {name, description, parameters}: the same
    prompt text for both APIs. Other tool types (web search, files, ...) are not served here."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise APIError(400, f"{where}.type: only function tools are supported (got {kind!r})",
                       param=f"{where}.type")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise APIError(400, f"{where}: a function tool needs a name", param=where)
    return {k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None}


def tool_choice_of(choice: Any, names: set[str], where: str = "tool_choice") -> str:
    """Chat's or Responses' `tool_choice` as "auto" | "none" | "required" | a function name."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name") if "function" in choice else choice.get("name")
        if name in names:
            return name
        raise APIError(400, f"{where}: function {name!r} is not among the tools ({', '.join(sorted(names)) or 'none'})",
                       param=where)
    raise APIError(400, f"{where}: expected 'auto', 'none', 'required' or a function (got {choice!r})", param=where)


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    return ("You can call these functions (JSON schema):\n" + json.dumps(tools, indent=1) + "\n"
            "To call one or more, answer with JSON only: "
            '{"tool_calls":[{"name":"<function name>","arguments":{<arguments>}}]}. Otherwise answer in text.')


def to_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]], json_schema: dict | None,
                wants_json: bool) -> list[dict[str, str]]:
    """Chat-shaped messages (role, content, tool_calls, tool_call_id) -> slmshift's plain chat messages: the tools
    as a system prompt, earlier tool calls and tool results as text the model reads. An earlier call reads as the
    model would write it (`tool_call_text`, arguments as values, not the API's JSON string): the form of the
    teacher's logged answers, so a model trained on them sees its own calls in its context, not another form."""
    out: list[dict[str, str]] = []
    if tools:
        out.append({"role": "system", "content": tools_prompt(tools)})
    for m in messages:
        text = text_of(m.get("content"))
        if m.get("tool_calls"):
            fns = [c.get("function", {}) for c in m["tool_calls"]]
            text = (text + "\n" if text else "") + tool_call_text([(f.get("name"), call_arguments(f.get("arguments")))
                                                                    for f in fns])
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"Result of tool call {m.get('tool_call_id') or ''}: {text}"})
        else:
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": text})
    if wants_json:
        out.append({"role": "system", "content": "Answer with one JSON object only"
                    + (f" matching this schema: {json.dumps(json_schema)}" if json_schema else ".")})
    return out


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Tool calls in a model's output, or None. Untrusted: JSON, or a Python call parsed with `ast` (literals only,
    never evaluated); only the declared functions count. Returns chat's shape: [{id, type, function: {name,
    arguments}}]."""
    names = {t.get("function", t).get("name") for t in tools}
    calls: list[tuple[str, dict]] = []
    s = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        doc = json.loads(s)
        items = doc.get("tool_calls", [doc]) if isinstance(doc, dict) else doc
        for it in items if isinstance(items, list) else []:
            if isinstance(it, dict) and isinstance(it.get("name"), str):
                args = it.get("arguments", {})
                args = json.loads(args) if isinstance(args, str) else args
                if isinstance(args, dict):
                    calls.append((it["name"], args))
    except (ValueError, AttributeError):
        try:
            tree = ast.parse(s, mode="eval").body
            nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
            for n in nodes:
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.args:
                    calls.append((n.func.id, {k.arg: ast.literal_eval(k.value) for k in n.keywords if k.arg}))
        except (SyntaxError, ValueError, TypeError):
            return None
    if not calls or any(name not in names for name, _ in calls):
        return None
    return [{"id": new_id("call_"), "type": "function",
             "function": {"name": name, "arguments": json.dumps(args)}} for name, args in calls]


class Verdict:
    def __init__(self, valid: bool, reason: str = ""):
        self.valid, self.correct, self.reason = valid, None, reason


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip().removeprefix("```json").removesuffix("```")), dict)
    except ValueError:
        return False




def _looks_like_tool_call(text: str) -> bool:
    s = text.strip().removeprefix("```json").removeprefix("```").strip()
    return s[:1] in ("{", "[") and ('"tool_calls"' in s or '"name"' in s)


def output_check(call: Call):
    """The call's validity verdict, as far as the gateway can tell without grading it: a JSON object when JSON was
    asked for; never more than one tool call under `parallel_tool_calls: false` (the client is answered with the
    first); a call of a declared function (the named one, if forced) when a tool call is required; where tools
    are offered under `auto`, a tool call that parses or text that is not a failed attempt at one; else non-empty
    text. A simulated model's placeholder is never valid, so no keep rule of S2 takes it as a training target."""
    def check(text: str) -> Verdict:
        if PLACEHOLDER.match(text.strip()):
            return Verdict(False, "a simulated model's placeholder (no reference answer), not an answer")
        if call.wants_json:
            return Verdict(_json_object(text), "not a JSON object")
        calls = parse_tool_calls(text, call.tools) if call.tools and call.tool_choice != "none" else None
        if calls is not None and len(calls) > 1 and not call.parallel_tool_calls:
            # the client gets the first call only; as a training target the answer would teach what it forbade
            return Verdict(False, f"{len(calls)} tool calls where parallel_tool_calls is false (at most one)")
        if call.tools and call.tool_choice not in ("auto", "none"):
            ok = calls is not None and (call.tool_choice == "required"
                                        or all(c["function"]["name"] == call.tool_choice for c in calls))
            want = "a tool call" if call.tool_choice == "required" else f"a call of {call.tool_choice!r}"
            return Verdict(ok, f"no valid tool call: {want} was required")
        if calls is not None:
            return Verdict(True)
        if call.tools and call.tool_choice == "auto" and _looks_like_tool_call(text):
            return Verdict(False, "a tool call that does not parse or names an undeclared function")
        return Verdict(bool(text.strip()), "empty output")
    return check


def constraint_of(call: Call) -> OutputConstraint:
    """The output constraint the call asks for, on its LMRequest: an engine enforces it where the router arm's
    `constrain` option says so (a forced tool call, a JSON object or schema); tools under `auto` or `none` are
    recorded, not enforced. Tool calls are enforced in the tool-call text `parse_tool_calls` reads."""
    if call.wants_json:
        return OutputConstraint(format="json", json_schema=call.json_schema or {"type": "object"})
    if not call.tools:
        return TEXT
    choice: Any = call.tool_choice
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    forced = choice not in ("auto", "none")
    return OutputConstraint(format="json" if forced else "text", tool_choice=choice,
                            tools=[{"type": "function", "function": t} for t in call.tools],
                            parallel_tool_calls=None if call.parallel_tool_calls else False)


def unenforced(pipeline: Any, models: dict[str, Any], constraint: OutputConstraint) -> str:
    """The models (as "'name' (backend)") that `pipeline`'s arm may send a call with `constraint` to, directly or as
    a shadow, and holds to it (`constrain`), whose engine cannot enforce it; "" when none (or nothing to enforce)."""
    from slmshift.serve.engines.base import enforces_constraints

    if not constraint.enforceable:
        return ""
    spec = pipeline.spec
    tiers = set(spec.tiers()) | ({"llm", "slm"} if spec.shadow != "none" else set())
    names = [pipeline.policy.models.get(t) for t in sorted(tiers) if spec.constrains(t)]
    bad = [models[n] for n in names if n in models and not enforces_constraints(models[n].backend)]
    return ", ".join(f"{m.name!r} ({m.backend})" for m in bad)


def answer_of(call: Call, result: Any) -> Answer:
    """The pipeline's result for `call`, API-neutral: tool calls where tools were offered and the output parses as
    one (only the first when the caller asked for no parallel calls), else the text cut at the first stop sequence."""
    text, stopped = result.text, False
    for s in call.stop:
        if s and s in text:
            text, stopped = text[:text.index(s)], True
            break
    calls = parse_tool_calls(text, call.tools) if call.tools and call.tool_choice != "none" else None
    if calls and not call.parallel_tool_calls:
        calls = calls[:1]
    r = result.response
    finish = "tool_calls" if calls else ("length" if r.tokens_out >= call.max_tokens and not stopped else "stop")
    return Answer(text="" if calls else text,
                  tool_calls=[{"id": c["id"], **c["function"]} for c in calls] if calls else None,
                  finish=finish, tokens_in=r.tokens_in, tokens_out=r.tokens_out,
                  fingerprint=f"slmshift:{r.model}:{r.adapter or 'base'}")


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def sse(event: Any) -> str:
    return f"data: {json.dumps(event)}\n\n"
