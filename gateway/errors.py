"""The ONE place Nebula errors become OpenAI error bodies, as JSON and as SSE."""

from __future__ import annotations

import logging
import math
import re
from typing import TypeVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from nebula.errors import HTTPError, InvalidRequest, NebulaError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"field `([^`]+)`")


def decode(body: bytes, type: type[_T]) -> _T:
    """Decode a request body; every way a body can be bad is a 400, never a 500."""
    if not body.isascii():
        # msgspec skips unknown fields without checking their UTF-8, and the body is
        # forwarded as it is: check it whole (cheap, and only for non-ASCII bodies).
        try:
            body.decode()
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.DecodeError as e:
        raise from_decode_error(e) from None
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"request body is not valid UTF-8: {e.reason} at byte {e.start}"
        ) from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


def from_decode_error(e: msgspec.DecodeError) -> InvalidRequest:
    """Turn msgspec's message into a 400 naming the offending ``param``."""
    text = str(e)
    if not isinstance(e, msgspec.ValidationError):
        return InvalidRequest(f"request body is not valid JSON: {text}")
    param = None
    m = _PATH.search(text)
    if m and m.group(1):
        param = m.group(1)
    f = _FIELD.search(text)
    if f:
        param = f"{param}.{f.group(1)}" if param else f.group(1)
    return InvalidRequest(f"invalid request: {text}", param=param)


def error_response(err: NebulaError) -> Response:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return Response(
        err.to_json(), status_code=err.status, headers=headers, media_type="application/json"
    )


def sse_error(err: NebulaError) -> bytes:
    """An error once a stream has started: the official client raises APIError on it."""
    return b"data: " + err.to_json() + b"\n\n"


async def nebula_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NebulaError)
    return error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(HTTPError(str(exc.detail), status=exc.status_code))


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(NebulaError(f"internal error: {type(exc).__name__}"))


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    """The client left mid-request: one quiet line, no traceback, nobody to answer."""
    log.info("client %s left during %s", request.client, request.url.path)
    return Response(status_code=499)
