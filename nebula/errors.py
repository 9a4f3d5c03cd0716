"""One error hierarchy for every Nebula process.

Each error knows its HTTP status and OpenAI error ``type``/``code`` so the
gateway maps it to an OpenAI error body in exactly one place
(:mod:`gateway.errors`), and workers can ship it across NATS in an error frame.
"""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorBody


class NebulaError(Exception):
    # Class defaults; an instance may override them (an upstream's status, say).
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> ErrorEnvelope:
        return ErrorEnvelope(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.body())


class InvalidRequest(NebulaError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(NebulaError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RequestTimeout(NebulaError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ModelNotFound(NebulaError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Conflict(NebulaError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class QueueFull(NebulaError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class NoReplica(NebulaError):
    status = 503
    type = "server_error"
    code = "no_ready_replica"


class Unavailable(NebulaError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class DeadlineExceeded(NebulaError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class HTTPError(NebulaError):
    """Routing-level errors (unknown path, wrong method) in the OpenAI shape."""

    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.code = "not_found" if status == 404 else None


class WorkerLost(NebulaError):
    status = 502
    type = "server_error"
    code = "worker_lost"


class EngineDead(NebulaError):
    """The engine is gone for good (its core process died): only a new worker serves again."""

    status = 503
    type = "server_error"
    code = "engine_dead"


class EngineError(NebulaError):
    """An engine failed a request; ``status`` may be overridden per instance (upstream errors)."""

    type = "server_error"
    code = "engine_error"

    def __init__(self, message: str, *, status: int = 500, raw_body: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.raw_body = raw_body

    def to_json(self) -> bytes:
        # An upstream OpenAI-compatible server already produced an OpenAI error body: keep it.
        return self.raw_body if self.raw_body is not None else super().to_json()


_BY_CODE: dict[str, type[NebulaError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        PayloadTooLarge,
        RequestTimeout,
        ModelNotFound,
        Conflict,
        QueueFull,
        NoReplica,
        Unavailable,
        DeadlineExceeded,
        WorkerLost,
        EngineDead,
    )
    if cls.code
}


class _AnyError(msgspec.Struct):
    """Upstream error bodies vary (vLLM sends ``code`` as a number): read loosely."""

    message: str = ""
    param: object = None
    code: object = None


class _AnyEnvelope(msgspec.Struct):
    error: _AnyError


def error_from_wire(status: int, body: bytes) -> NebulaError:
    """Rebuild an error carried in an error frame (status header + OpenAI error body).

    Nebula's own errors come back as their class; anything else (an upstream
    server's body) is kept byte for byte so the client sees what the engine said.
    """
    try:
        err = msgspec.json.decode(body, type=_AnyEnvelope).error
    except msgspec.DecodeError:
        text = body.decode(errors="replace") or "engine error"
        return EngineError(text, status=status, raw_body=body if body[:1] == b"{" else None)
    cls = _BY_CODE.get(err.code) if isinstance(err.code, str) else None
    if cls is not None and cls.status == status:
        param = err.param if isinstance(err.param, str) else None
        return cls(err.message, param=param)
    return EngineError(err.message or "engine error", status=status, raw_body=body)
