"""An OpenAI-compatible gateway: real agents (anything on the OpenAI SDK) call slmshift's router and models over HTTP,
and every call lands in the S1 log, so `slmshift convert` and `slmshift tune` work on a real workload's traffic.

A Ray Serve HTTP ingress (FastAPI). Each request goes through the same `CallPipeline` team actors use (route,
call, cascade, check, S1 record, metrics), built inside the ingress replica: no extra hop. The `model` field
names a router policy (`router:<policy name>`) or a deployed model. API: `GET /v1/models`, `POST /v1/chat/completions`
(non-streaming and SSE streaming, `tools`/`tool_calls`, `response_format` json, `max_tokens`, `temperature`, `seed`,
`stop`), errors in OpenAI's error shape.

Identity of a call in the log: the workload id (header `X-Workload-Id`, else the `user` field, else
`metadata.workload`) is the record's `scenario`; the session id (header `X-Session-Id` or `metadata.session_id`;
default: one per request) is its episode; `metadata.call_kind` / `metadata.role` label it for S3 and the router.
"""

import ast
import asyncio
import json
import math
import os
import time
import uuid
from typing import Any

from fastapi import Request  # real (not string) annotations: the handlers are pickled to the Serve replica
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.types import DEFAULT_RETRY_AFTER_S, LMRequest, ModelSpec

API_KEYS_ENV = "SLMSHIFT_GATEWAY_API_KEYS"
POLICY_PREFIX = "router:"


# --- the OpenAI request shape (the fields we use; the rest are accepted and ignored, as OpenAI's SDKs send them) ---


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    metadata: dict[str, Any] | None = None


class APIError(Exception):
    """An error returned in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- mapping between OpenAI chat and slmshift requests -------------------------------------------------------------


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    specs = [t.get("function", t) for t in tools]
    return ("You can call these functions (JSON schema):\n" + json.dumps(specs, indent=1) + "\n"
            "To call one or more, answer with JSON only: "
            '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}. Otherwise answer in text.')


def to_messages(req: ChatRequest) -> list[dict[str, str]]:
    """OpenAI messages -> slmshift's plain chat messages (tool calls and results as text the model reads)."""
    out: list[dict[str, str]] = []
    if req.tools:
        out.append({"role": "system", "content": tools_prompt(req.tools)})
    for m in req.messages:
        text = _text(m.content)
        if m.tool_calls:
            calls = [{"name": c.get("function", {}).get("name"), "arguments": c.get("function", {}).get("arguments")}
                     for c in m.tool_calls]
            text = (text + "\n" if text else "") + json.dumps({"tool_calls": calls})
        if m.role == "tool":
            out.append({"role": "user", "content": f"Result of tool call {m.tool_call_id or ''}: {text}"})
        else:
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if req.response_format and req.response_format.get("type") in ("json_object", "json_schema"):
        schema = req.response_format.get("json_schema", {}).get("schema")
        out.append({"role": "system", "content": "Answer with one JSON object only"
                    + (f" matching this schema: {json.dumps(schema)}" if schema else ".")})
    return out


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Tool calls in a model's output, or None. Untrusted: JSON, or a Python call parsed with `ast` (literals only,
    never evaluated); only the declared functions count."""
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
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args)}} for name, args in calls]


class _Verdict:
    def __init__(self, valid: bool, reason: str = ""):
        self.valid, self.correct, self.reason = valid, None, reason


def output_check(req: ChatRequest):
    """The call's own check, as the gateway can tell it: JSON when JSON was asked for, a tool call when the
    caller forces one; otherwise no check (validity unknown)."""
    wants_json = bool(req.response_format and req.response_format.get("type") in ("json_object", "json_schema"))
    forced_tool = req.tools and req.tool_choice not in (None, "auto", "none")
    if wants_json:
        def check(text: str) -> _Verdict:
            try:
                ok = isinstance(json.loads(text.strip().removeprefix("```json").removesuffix("```")), dict)
            except ValueError:
                ok = False
            return _Verdict(ok, "" if ok else "not a JSON object")
        return check
    if forced_tool:
        return lambda text: _Verdict(parse_tool_calls(text, req.tools) is not None, "no valid tool call")
    return None


def apply_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    for s in [stop] if isinstance(stop, str) else (stop or []):
        if s and s in text:
            return text[:text.index(s)], True
    return text, False


def completion(req: ChatRequest, result: Any, created: int, cid: str) -> dict[str, Any]:
    text, stopped = apply_stop(result.text, req.stop)
    calls = parse_tool_calls(text, req.tools) if req.tools and req.tool_choice != "none" else None
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
    if calls:
        message["tool_calls"] = calls
    r = result.response
    finish = "tool_calls" if calls else ("length" if r.tokens_out >= (req.max_completion_tokens or req.max_tokens
                                                                         or 1 << 30) and not stopped else "stop")
    return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": f"slmshift:{r.model}:{r.adapter or 'base'}",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": r.tokens_in, "completion_tokens": r.tokens_out,
                      "total_tokens": r.tokens_in + r.tokens_out}}


def sse_chunks(done: dict[str, Any]) -> list[str]:
    """A finished completion as OpenAI's SSE chunks: role, content (or tool calls), finish, usage, [DONE]. The
    engines answer a request whole, so the content comes as one chunk."""
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": done["created"], "model": done["model"],
            "system_fingerprint": done["system_fingerprint"]}
    msg, finish = done["choices"][0]["message"], done["choices"][0]["finish_reason"]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if msg.get("tool_calls"):
        deltas.append({"tool_calls": [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]})
    elif msg.get("content"):
        deltas.append({"content": msg["content"]})
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({**base, "choices": [], "usage": done["usage"]})
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]


def error_for(result: Any, models: dict[str, ModelSpec] | None = None) -> APIError | None:
    """Map a failed call to an HTTP error: load shed -> 429, a dead replica -> 503, a too-long prompt -> 400. A 429's
    Retry-After is the shedding model's `retry_after_s` (rounded up), the wait its Serve deployment states and the
    call pipeline honours."""
    err = result.error or ""
    if result.response.error is None:
        return None  # the model answered; malformed output is still an answer (and a failed call in the log)
    if "BackPressureError" in err:
        spec = (models or {}).get(result.response.model)
        wait = spec.retry_after_s if spec is not None else DEFAULT_RETRY_AFTER_S
        return APIError(429, f"the model is overloaded; retry later ({err[:200]})", "rate_limit_error",
                        "overloaded", retry_after=math.ceil(wait))
    if err.startswith("infra:"):
        return APIError(503, f"the model is unavailable ({err[:200]})", "server_error", "unavailable", retry_after=2)
    if "max_input_tokens" in err or "too long" in err:
        return APIError(400, err, "invalid_request_error", "context_length_exceeded", "messages")
    return APIError(500, f"the model failed: {err[:300]}", "server_error", "model_error")


# --- the Serve ingress ------------------------------------------------------------------------------------------


def build_app(models: list[ModelSpec], policies: list[Any], handles: dict[str, Any], log: Any, experiment_id: str,
              options: Any, api_keys: list[str], scrub: bool = True):
    """The gateway's Serve application, bound to the model handles and the S1 log actor."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    from slmshift.platform.scrub import scrub_text

    app = FastAPI(title="slmshift gateway", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @serve.deployment(num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Gateway:
        def __init__(self) -> None:
            from slmshift.platform.log import LogClient, ScrubbingLog
            from slmshift.platform.policies import policy_spec
            from slmshift.serve.pipeline import CallPipeline

            self.log = LogClient(log, flush_every=16)
            sink = ScrubbingLog(self.log) if scrub else self.log
            from slmshift.serve.handle_batching import wrap_handles

            self.models = {m.name: m for m in models}
            params = {m.name: m.params for m in models}
            handles_ = wrap_handles(handles, models)
            self.pipelines = {f"{POLICY_PREFIX}{p.label}": CallPipeline(policy=p, models=models, handles=handles_,
                                                                        params=params, log=sink) for p in policies}
            for m in models:  # a deployed model by name: a fixed policy pinned to it
                pinned = policy_spec(kind=m.tier, name=m.name, **{f"{m.tier}_model": m.name})
                self.pipelines[m.name] = CallPipeline(policy=pinned, models=models, handles=handles_, params=params,
                                                      log=sink)
            self.counters: dict[str, int] = {}
            self.replica = uuid.uuid4().hex[:6] if options.replicas > 1 else ""
            self._flusher: asyncio.Task | None = None

        def _auth(self, request: Request) -> None:
            if not api_keys:
                return
            got = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if got not in api_keys:
                raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                               "authentication_error", "invalid_api_key")

        async def _flush_forever(self) -> None:
            while True:  # records reach the log within a second even when traffic is light
                await asyncio.sleep(1.0)
                self.log.flush()

        @app.get("/v1/models")
        async def list_models(self, request: Request) -> dict:
            self._auth(request)
            now = int(time.time())
            return {"object": "list", "data": [{"id": k, "object": "model", "created": now, "owned_by": "slmshift"}
                                               for k in self.pipelines]}

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request):
            from pydantic import ValidationError

            self._auth(request)
            if self._flusher is None:
                self._flusher = asyncio.ensure_future(self._flush_forever())
            try:
                body = await request.json()
                req = ChatRequest.model_validate(body)
            except ValueError as e:
                if isinstance(e, ValidationError):
                    err = e.errors()[0]
                    raise APIError(400, f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}",
                                   param=str(err["loc"][0])) from None
                raise APIError(400, "the body is not JSON") from None
            pipeline = self.pipelines.get(req.model)
            if pipeline is None:
                raise APIError(404, f"model {req.model!r} not found; available: {', '.join(self.pipelines)}",
                               code="model_not_found", param="model")
            meta = req.metadata or {}
            # The client names these (OpenAI's `user` is often an end user's e-mail): with scrubbing on they are
            # scrubbed where they come in, before they become the record's keys (the log leaves keys as they are).
            ident = (lambda v: scrub_text(str(v))) if scrub else str
            workload = ident(request.headers.get("x-workload-id") or req.user or meta.get("workload") or "gateway")
            session_id = ident(request.headers.get("x-session-id") or meta.get("session_id") or uuid.uuid4().hex)
            episode = f"{session_id}@{self.replica}" if self.replica else session_id
            index = self.counters.get(episode, 0)
            self.counters[episode] = index + 1
            call_kind = meta.get("call_kind") or ("tool_call" if req.tools else "json" if req.response_format
                                                  else "chat")
            request_ = LMRequest(
                experiment_id=experiment_id, episode_id=episode, call_index=index, scenario=workload,
                role=ident(meta.get("role", "agent")), call_kind=ident(call_kind),
                task_id=ident(meta.get("task_id", "")),
                policy=pipeline.spec.label, messages=to_messages(req), expect="json" if req.response_format else "text",
                max_tokens=req.max_completion_tokens or req.max_tokens or 512, temperature=req.temperature or 0.0,
                seed=req.seed or 0)
            result = await pipeline.call(request_, output_check(req))
            failure = error_for(result, self.models)
            if failure is not None:
                raise failure
            done = completion(req, result, int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}")
            if not req.stream:
                return done
            return StreamingResponse(iter(sse_chunks(done)), media_type="text/event-stream")

        async def drain(self) -> None:
            await self.log.drain()

    return Gateway.bind()


def serve_gateway(cfg: Any, options: Any, console: Any, storage: str | None = None,
                  stop: Any = None) -> str:
    """Start Ray, the models and the gateway; serve until `stop` is set (or Ctrl-C); drain the log. Returns the run
    dir. `cfg` is a validated GatewayConfig."""
    import datetime as dt
    from pathlib import Path

    import ray
    import yaml
    from ray import serve

    from slmshift.platform.cluster import cluster_cpus, start_ray
    from slmshift.platform.errors import SlmshiftError
    from slmshift.platform.log import start_log_actor
    from slmshift.serve.deployment import deploy_models

    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if not keys and options.host not in ("127.0.0.1", "localhost", "::1"):
        raise SlmshiftError(f"gateway.host {options.host!r} exposes the gateway beyond this machine but no API key is "
                            f"set. Fix: export {API_KEYS_ENV}=key1[,key2] or keep host 127.0.0.1.")
    exp_id = f"{cfg.experiment.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    root = storage or cfg.experiment.storage
    run_dir = f"{root.rstrip('/')}/{exp_id}" if "://" in root else str(Path(root).expanduser().resolve() / exp_id)
    if "://" not in run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    info = start_ray(cfg.ray)
    try:
        serve.start(http_options={"host": options.host, "port": options.port}, proxy_location="HeadOnly",
                    logging_config={"log_level": "WARNING"})
        with console.status(f"deploying {len(cfg.models)} model(s) and the gateway"):
            handles = deploy_models(cfg.models, cluster_cpus())
            log = start_log_actor(run_dir, name=f"gateway-log-{exp_id}")
            app = build_app(cfg.models, list(cfg.router.policies), handles, log, exp_id, options, keys,
                            scrub=cfg.log.scrub)
            gw = serve.run(app, name="gateway", route_prefix="/", logging_config={"log_level": "WARNING"})
        names = [f"{POLICY_PREFIX}{p.label}" for p in cfg.router.policies] + [m.name for m in cfg.models]
        console.print(f"slmshift gateway on http://{options.host}:{options.port}/v1  models: {', '.join(names)}",
                      soft_wrap=True)
        console.print("API keys: " + (f"required ({len(keys)} from ${API_KEYS_ENV})" if keys else
                                      f"none set (${API_KEYS_ENV}): serving on loopback only"), soft_wrap=True)
        console.print(f"S1 log: {run_dir}/interactions/  dashboard: {info.dashboard_url or 'off'}  Ctrl-C stops.",
                      soft_wrap=True)
        try:
            while stop is None or not stop.is_set():
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("stopping: draining the log")
        gw.drain.remote().result(timeout_s=60)
        counts = ray.get(log.close.remote())
        console.print(f"{counts.get('interactions', 0)} calls logged in {run_dir}/interactions/", soft_wrap=True)
    finally:
        serve.shutdown()
        if info.embedded:
            ray.shutdown()
    return run_dir
