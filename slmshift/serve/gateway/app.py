"""The gateway's Serve ingress (FastAPI): auth, the S1 identity of a call, one call pipeline per model name, and the
routes of each API (`chat`, `responses`, `completions` map requests and answers; this module serves them)."""

import asyncio
import os
import time
import uuid
from typing import Any

from fastapi import Request  # real (not string) annotations: the handlers are pickled to the Serve replica

from slmshift.platform.types import LMRequest, ModelSpec
from slmshift.serve.gateway import chat, completions, responses
from slmshift.serve.gateway.common import Answer, Call, answer_of, constraint_of, new_id, output_check, unenforced
from slmshift.serve.gateway.errors import APIError, error_for, parse_body

API_KEYS_ENV = "SLMSHIFT_GATEWAY_API_KEYS"
POLICY_PREFIX = "router:"


def build_app(models: list[ModelSpec], policies: list[Any], handles: dict[str, Any], log: Any, experiment_id: str,
              options: Any, api_keys: list[str], scrub: bool = True):
    """The gateway's Serve application, bound to the model handles and the S1 log actor. The models named in
    `options.inline` have no handle: each ingress replica builds their engines itself."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    from slmshift.platform.scrub import scrub_text

    app = FastAPI(title="slmshift gateway", docs_url=None, redoc_url=None)
    # workload id -> the pipeline key of the policy arm chosen for it (gateway.workloads)
    workload_policies = {w: f"{POLICY_PREFIX}{label}" for w, label in (getattr(options, "workloads", None) or {}).items()}
    inline = set(getattr(options, "inline", None) or ())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def reply(done: dict, events: list[str] | None) -> Any:
        # A ready Response: FastAPI would otherwise walk the returned dict through jsonable_encoder first.
        if events is None:
            return JSONResponse(done)
        return StreamingResponse(iter(events), media_type="text/event-stream")

    @serve.deployment(num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Gateway:
        def __init__(self) -> None:
            from slmshift.platform.log import LogClient, ScrubbingLog
            from slmshift.platform.policies import policy_spec
            from slmshift.serve.handle_batching import wrap_handles
            from slmshift.serve.engines import get_engine_class
            from slmshift.serve.pipeline import CallPipeline, LocalHandle

            self.log = LogClient(log, flush_every=16)
            sink = ScrubbingLog(self.log) if scrub else self.log
            self.models = {m.name: m for m in models}
            params = {m.name: m.params for m in models}
            handles_ = wrap_handles(handles, models)
            for m in models:  # gateway.inline: served here, in-process (no Serve request to a model replica)
                if m.name in inline:
                    handles_[m.name] = LocalHandle(get_engine_class(m.backend)(m))
            common = {"models": models, "handles": handles_, "params": params, "log": sink,
                      "detached_shadows": options.detached_shadows}
            self.pipelines = {f"{POLICY_PREFIX}{p.label}": CallPipeline(policy=p, **common) for p in policies}
            for m in models:  # a deployed model by name: a fixed policy pinned to it
                pinned = policy_spec(kind=m.tier, name=m.name, **{f"{m.tier}_model": m.name})
                self.pipelines[m.name] = CallPipeline(policy=pinned, **common)
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

        async def _body(self, request: Request, model: Any) -> Any:
            """The request, authenticated and validated against `model` (a 400 names the bad field)."""
            self._auth(request)
            if self._flusher is None:
                self._flusher = asyncio.ensure_future(self._flush_forever())
            return parse_body(await request.body(), model)

        async def _flush_forever(self) -> None:
            while True:  # records reach the log within a second even when traffic is light
                await asyncio.sleep(1.0)
                self.log.flush()

        async def _serve(self, request: Request, calls: list[Call], prompt_param: str,
                         json_param: str = "response_format") -> list[Answer]:
            """Each call through its model's pipeline (route, call, check, S1 record), under the workload and session
            the client names; a failed call becomes the HTTP error OpenAI's clients expect."""
            pipeline = self.pipelines.get(calls[0].model)
            if pipeline is None:
                raise APIError(404, f"model {calls[0].model!r} not found; available: {', '.join(self.pipelines)}",
                               code="model_not_found", param="model")
            meta = calls[0].metadata
            # The client names these (OpenAI's `user` is often an end user's e-mail): with scrubbing on they are
            # scrubbed where they come in, before they become the record's keys (the log leaves keys as they are).
            ident = (lambda v: scrub_text(str(v))) if scrub else str
            workload = ident(request.headers.get("x-workload-id") or calls[0].user or meta.get("workload")
                             or "gateway")
            if calls[0].model.startswith(POLICY_PREFIX) and workload in workload_policies:
                pipeline = self.pipelines[workload_policies[workload]]  # the policy chosen for this workload
            session_id = ident(request.headers.get("x-session-id") or meta.get("session_id") or new_id("s-"))
            episode = f"{session_id}@{self.replica}" if self.replica else session_id
            # A call's task is its session unless the client names one: held-out splits and intervals then resample
            # sessions, whose calls are correlated, never calls of one session apart.
            role, task = ident(meta.get("role", "agent")), ident(meta.get("task_id") or session_id)
            for call in calls:
                refused = unenforced(pipeline, self.models, constraint_of(call))
                if refused:
                    param = json_param if call.wants_json else "tool_choice"
                    raise APIError(400, f"{param}: policy {pipeline.spec.label!r} may send this call to "
                                   f"{refused}, whose engine cannot enforce an output format, and the policy's "
                                   f"`constrain: {pipeline.spec.constrain}` asks it to. Fix: drop {param}, call a "
                                   "model or policy served by an hf, vllm or openai engine, or set that policy's "
                                   "`constrain` so the tier answers free", param=param, code="unsupported_parameter")
            lm_requests = []
            for call in calls:
                index = self.counters.get(episode, 0)
                self.counters[episode] = index + 1
                lm_requests.append(LMRequest(
                    experiment_id=experiment_id, episode_id=episode, call_index=index, scenario=workload, role=role,
                    call_kind=ident(meta.get("call_kind") or call.kind), task_id=task, policy=pipeline.spec.label,
                    messages=call.messages, constraint=constraint_of(call), max_tokens=call.max_tokens,
                    temperature=call.temperature, seed=call.seed))
            results = await asyncio.gather(*(pipeline.call(r, output_check(c)) for r, c in zip(lm_requests, calls)))
            format_param = json_param if calls[0].wants_json else "tools"
            for result in results:
                failure = error_for(result, self.models, prompt_param, format_param)
                if failure is not None:
                    raise failure
            return [answer_of(c, r) for c, r in zip(calls, results)]

        @app.get("/v1/models")
        async def list_models(self, request: Request) -> dict:
            self._auth(request)
            now = int(time.time())
            return {"object": "list", "data": [{"id": k, "object": "model", "created": now, "owned_by": "slmshift"}
                                               for k in self.pipelines]}

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            req = await self._body(request, chat.ChatRequest)
            (a,) = await self._serve(request, [chat.to_call(req)], "messages")
            done = chat.completion(req, a, int(time.time()), new_id("chatcmpl-"))
            return reply(done, chat.sse_chunks(done) if req.stream else None)

        @app.post("/v1/responses")
        async def create_response(self, request: Request):
            req = await self._body(request, responses.ResponsesRequest)
            call = responses.to_call(req)
            (a,) = await self._serve(request, [call], "input", "text.format")
            done = responses.response(req, call, a, int(time.time()), new_id("resp_"))
            return reply(done, responses.sse_events(done) if req.stream else None)

        @app.post("/v1/completions")
        async def create_completion(self, request: Request):
            req = await self._body(request, completions.CompletionRequest)
            answers = await self._serve(request, completions.to_calls(req), "prompt")
            done = completions.completion(req, answers, int(time.time()), new_id("cmpl-"))
            return reply(done, completions.sse_chunks(req, done) if req.stream else None)

        async def drain(self, timeout_s: float = 600) -> int:
            """Wait for the shadows still running (each is logged when done), then flush the log. Returns the
            shadows given up on at `timeout_s` (their calls' answers are logged; only the pairs are missing)."""
            left = await asyncio.gather(*(p.settle(timeout_s) for p in self.pipelines.values()))
            await self.log.drain()
            return sum(left)

        async def pending_shadows(self) -> int:
            return sum(p.running_shadows for p in self.pipelines.values())

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
            handles = deploy_models([m for m in cfg.models if m.name not in options.inline], cluster_cpus())
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
        pending = gw.pending_shadows.remote().result(timeout_s=30)
        if pending:
            console.print(f"waiting for {pending} SLM/LLM shadow call(s) still running (up to 10 min; Ctrl-C again "
                          "leaves them unpaired)", soft_wrap=True)
        try:
            lost = gw.drain.remote(600).result(timeout_s=660)
        except KeyboardInterrupt:
            lost = pending
            gw.drain.remote(0).result(timeout_s=60)
        if lost:
            console.print(f"[yellow]{lost} shadow call(s) did not finish: their calls are logged, unpaired[/]",
                          soft_wrap=True)
        counts = ray.get(log.close.remote())
        console.print(f"{counts.get('interactions', 0)} calls logged in {run_dir}/interactions/", soft_wrap=True)
    finally:
        serve.shutdown()
        if info.embedded:
            ray.shutdown()
    return run_dir
