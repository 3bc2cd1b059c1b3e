"""An OpenAI-compatible gateway: real agents (anything on the OpenAI SDK, and agent frameworks built on it) call
slmshift's router and models over HTTP, and every call lands in the S1 log, so `slmshift convert` and `slmshift tune`
work on a real workload's traffic.

A Ray Serve HTTP ingress (FastAPI). Each request goes through the same `CallPipeline` team actors use (route,
call, cascade, check, S1 record, metrics), built inside the ingress replica: no extra hop. The `model` field
names a router policy (`router:<policy name>`) or a deployed model. API: `GET /v1/models`,
`POST /v1/chat/completions`, `POST /v1/responses` and `POST /v1/completions`, each streamed (SSE) or not, with
function tools, JSON output formats, errors in OpenAI's error shape (`chat`, `responses`, `completions`, `errors`).

Identity of a call in the log: the workload id (header `X-Workload-Id`, else the `user` field, else
`metadata.workload`) is the record's `scenario`; the session id (header `X-Session-Id` or `metadata.session_id`;
default: one per request) is its episode; `metadata.call_kind` / `metadata.role` label it for S3 and the router.
"""

from slmshift.serve.gateway.app import API_KEYS_ENV, POLICY_PREFIX, build_app, serve_gateway
from slmshift.serve.gateway.common import parse_tool_calls
from slmshift.serve.gateway.errors import APIError, error_for

__all__ = ["API_KEYS_ENV", "POLICY_PREFIX", "APIError", "build_app", "error_for", "parse_tool_calls", "serve_gateway"]
