"""Errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}), for bad requests and failed calls."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ValidationError

from slmshift.platform.types import DEFAULT_RETRY_AFTER_S, ModelSpec


class APIError(Exception):
    """An error returned in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """A request body validated against `model`; a 400 naming the first bad field (`messages.0.role: ...`)."""
    try:
        return model.model_validate(json.loads(raw))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"],
                       param=str(err["loc"][0]) if err["loc"] else None) from None
    except ValueError:
        raise APIError(400, "the body is not JSON") from None


def unsupported(field: str, why: str) -> APIError:
    return APIError(400, f"{field}: {why}", param=field, code="unsupported_parameter")


def error_for(result: Any, models: dict[str, ModelSpec] | None = None, prompt_param: str = "messages",
              format_param: str = "response_format") -> APIError | None:
    """Map a failed call to an HTTP error: load shed -> 429, a dead replica -> 503, a too-long prompt -> 400. A 429's
    Retry-After is the shedding model's `retry_after_s` (rounded up), the wait its Serve deployment states and the
    call pipeline honours. A format the engine cannot enforce (a JSON schema llguidance rejects) is a 400 naming
    `format_param`; `prompt_param` is the field that holds the prompt in the caller's API."""
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
    if "invalid output constraint" in err:
        return APIError(400, f"{format_param}: {err[:300]}", "invalid_request_error", "invalid_format", format_param)
    if "max_input_tokens" in err or "too long" in err:
        return APIError(400, err, "invalid_request_error", "context_length_exceeded", prompt_param)
    return APIError(500, f"the model failed: {err[:300]}", "server_error", "model_error")
