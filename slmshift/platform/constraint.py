"""The output constraint a model call carries (the paper's A5: agent calls hold a strict format), and the one JSON
serialisation that answers, LoRA targets and constraints share. Re-exported by `platform.types`."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Expect = Literal["text", "json", "code", "action"]

# One ```python block and nothing else (no ``` inside): the code answers' shape. With it, the hf engine also keeps
# the block's program parseable (`OutputConstraint.python_block`).
PYTHON_BLOCK = r"```python\n([^`]|`[^`]|``[^`])*\n```"


def canonical_json(value: Any) -> str:
    """The one JSON serialisation of model answers: scenario references (the simulated teacher's), LoRA targets and
    output constraints (engines enforce it: no whitespace, UTF-8 kept, keys in the given order)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class OutputConstraint(BaseModel):
    """The format a call's output must hold (the paper's A5: agent calls keep a strict format).

    At most one of `json_schema`, `regex`, `grammar` (Lark, in llguidance's dialect: the hf engine's library, see
    docs/engines.md) or `tools`; `format` names the answer's shape for checks and logs (the S1 record's `expect`).
    Engines enforce it when the request's `constrained` is set (the router arm's `constrain` option decides).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Expect = Field(default="text", description="The answer's shape: text, json, code or action.")
    json_schema: dict[str, Any] | None = Field(default=None, description="A JSON schema the output must match, "
                                               "written compactly (',' and ':' with no spaces).")
    regex: str | None = Field(default=None, description="A regular expression the whole output must match.")
    grammar: str | None = Field(default=None, description="A Lark grammar (llguidance's dialect) the output must "
                                "match; `%json {...}` embeds a JSON schema.")
    tools: list[dict[str, Any]] | None = Field(default=None, description="OpenAI function tools the call may use.")
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="With `tools`: 'auto' (text or a call: `optional_calls`), 'none', 'required' "
        "(some tool call) or {'type': 'function', 'function': {'name': ...}} (that tool).")
    parallel_tool_calls: bool | None = Field(default=None, description="With `tools`: False allows at most one tool "
                                             "call in the answer (OpenAI's parallel_tool_calls: false); None or True "
                                             "allows several.")

    @model_validator(mode="after")
    def _one_kind(self) -> OutputConstraint:
        given = [k for k in ("json_schema", "regex", "grammar", "tools") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"an output constraint takes one of json_schema, regex, grammar, tools (got {given})")
        if self.tool_choice is not None and self.tools is None:
            raise ValueError("tool_choice needs tools")
        if self.parallel_tool_calls is not None and self.tools is None:
            raise ValueError("parallel_tool_calls needs tools")
        return self

    @property
    def kind(self) -> str | None:
        """'json_schema' | 'regex' | 'grammar' | 'tools', or None for a format with nothing to enforce."""
        return next((k for k in ("json_schema", "regex", "grammar", "tools") if getattr(self, k) is not None), None)

    @property
    def forced_tool(self) -> str | None:
        """The tool a named tool_choice forces, else None."""
        choice = self.tool_choice
        return choice.get("function", {}).get("name") if isinstance(choice, dict) else None

    @property
    def enforceable(self) -> bool:
        """Is there anything for an engine to enforce? (tools with 'auto'/'none'/no choice leave the model free.)"""
        if self.kind == "tools":
            return self.tool_choice == "required" or self.forced_tool is not None
        return self.kind is not None

    @property
    def optional_calls(self) -> bool:
        """Tools under 'auto' (or no choice): the model may answer in text or call. Nothing here demands enforcing
        (`enforceable` is False, so no engine is refused for it); an engine that can hold it (hf) keeps a call, once
        the answer starts one, to the declared tools' schema, and leaves text free (`LMRequest.held`)."""
        return self.kind == "tools" and self.tool_choice in (None, "auto")

    @property
    def python_block(self) -> bool:
        """Is the answer one ```python block (`regex` is PYTHON_BLOCK)? The hf engine then closes the block, when the
        budget runs out or the model ends it, with a program that parses where a short ending makes it parse."""
        return self.regex == PYTHON_BLOCK

    def calls_schema(self) -> dict[str, Any]:
        """The JSON schema of the platform's tool-call text that an enforced `tools` constraint allows (the named
        tool only, for a named choice; one call at most where `parallel_tool_calls` is False)."""
        return tool_call_schema(self.tools or [], self.forced_tool, self.parallel_tool_calls is not False)

    def to_json(self) -> str:
        """Canonical JSON (None-valued fields left out): the S1 record's `constraint`."""
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """A content hash: equal constraints share one compiled grammar."""
        body = json.dumps(self.model_dump(exclude={"format"}), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()[:32]


TEXT = OutputConstraint()


def call_arguments(raw: Any) -> Any:
    """A tool call's arguments as values: the OpenAI APIs send them as a JSON string ('' for none); a string that is
    not JSON stays as it was written."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return raw


def tool_call_text(calls: list[tuple[str, Any]]) -> str:
    """The platform's tool-call text for (name, arguments) pairs, `{"tool_calls":[{"name":...,"arguments":...}]}`
    in the one serialisation (`canonical_json`): what the gateway prompts for and parses, the constraint enforces,
    and teachers, providers and earlier turns in context are written in."""
    return canonical_json({"tool_calls": [{"name": name, "arguments": args} for name, args in calls]})


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool) if tool.get("type", "function") == "function" else tool


def tool_call_schema(tools: list[dict[str, Any]], only: str | None = None, parallel: bool = True) -> dict[str, Any]:
    """JSON schema of the platform's tool-call text, `{"tool_calls":[{"name":...,"arguments":{...}}, ...]}` (what the
    gateway prompts for and parses), for `tools` (only the one named `only`, when given; one call at most unless
    `parallel`). Both engines enforce tool calls as this schema."""
    calls = []
    for fn in map(_function, tools):
        if only is not None and fn.get("name") != only:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        calls.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    if not calls:
        raise ValueError(f"tool_choice names {only!r}, which is not among the declared tools")
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    calls_schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        calls_schema["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": calls_schema},
            "required": ["tool_calls"], "additionalProperties": False}
