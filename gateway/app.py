"""The HTTP surface: OpenAI endpoints, probes, metrics.

Hot routes are plain Starlette routes on the FastAPI app: the body is read once,
validated with msgspec, forwarded as the same bytes, and worker frames are
written to the socket without being decoded or re-encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.dispatcher import Call, Dispatcher
from gateway.errors import (
    client_gone_handler,
    decode,
    error_response,
    http_error_handler,
    nebula_error_handler,
    sse_error,
    unhandled_error_handler,
)
from gateway.fastpath import FastPath
from gateway.metrics import (
    CLIENT_GONE,
    COMPLETED,
    ERROR,
    GatewayMetrics,
    NullTracker,
    Tracker,
    poll_queue_gauges,
)
from gateway.metrics import tracker as new_tracker
from gateway.registry import ModelRegistry
from nebula import natsio
from nebula.admin import AdapterRequest, ClusterAdmin, LoadRequest
from nebula.errors import (
    InvalidRequest,
    ModelNotFound,
    NebulaError,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
)
from nebula.logs import REQUEST_ID
from nebula.metrics import CONTENT_TYPE, NatsCollector
from nebula.openai_types import (
    MAX_EMBEDDING_INPUTS,
    AdapterModel,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Model,
    ModelList,
)
from nebula.protocol import Endpoint
from nebula.service import Service
from nebula.settings import GatewaySettings, NatsSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Headroom for job headers inside one NATS message.
_HEADER_ROOM = 4096
# Oversized bodies up to this size are read and dropped before the 413, so the
# client sees the answer instead of a reset connection while still sending.
_DRAIN_LIMIT = 64 * 1024 * 1024

# Seconds between refreshes of the queue-depth gauges (a few JetStream calls per model).
_GAUGE_INTERVAL = 2.0
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A client's X-Request-Id is used as it is when it is a safe NATS subject token of
# sane length (UUIDs, ULIDs, req_...); anything else gets a fresh id, returned in the
# response header like any generated one.
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-:")
REQUEST_ID_HEADER = "X-Request-Id"


def request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id")
    if rid and len(rid) <= 128 and _SAFE_ID.issuperset(rid):
        return rid
    return uuid.uuid4().hex


class Gateway(Service):
    """Owns the dispatcher and registry over a NATS connection it is given."""

    def __init__(
        self,
        settings: GatewaySettings,
        nats_settings: NatsSettings,
        nc: Client,
        *,
        registry: CollectorRegistry | None = None,
        hooks: natsio.ReconnectHooks | None = None,
    ) -> None:
        self.settings = settings
        self.nats_settings = nats_settings
        self.nc = nc
        self.gateway_id = settings.gateway_id or uuid.uuid4().hex[:12]
        self.models = ModelRegistry()
        self.metrics = GatewayMetrics(
            registry or CollectorRegistry(), enabled=settings.request_metrics
        )
        self.metrics.registry.register(NatsCollector("gateway", lambda: self.nc))
        self.dispatcher = Dispatcher(
            nc, settings, nats_settings, self.models, self.gateway_id, self.metrics
        )
        self.hooks = hooks
        self.admin: ClusterAdmin | None = None
        limit = settings.max_body_bytes
        if nc.max_payload:
            limit = min(limit, nc.max_payload - _HEADER_ROOM)
        self.body_limit = limit
        # Set on SIGTERM: new requests get 503 while open ones finish.
        self.draining = False
        self._closed = False
        self._gauges: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.dispatcher.start()
        self.admin = await ClusterAdmin.open(self.nc, self.nats_settings)
        await self._watch()
        self._gauges = asyncio.create_task(
            poll_queue_gauges(self.metrics, self.admin, self.models, _GAUGE_INTERVAL)
        )
        if self.hooks is not None:
            self.hooks.add(self._on_reconnect)

    async def _watch(self) -> None:
        js = self.nc.jetstream()
        workers = await natsio.workers_bucket(js, self.nats_settings)
        models = await natsio.models_bucket(js, self.nats_settings)
        await self.models.watch(workers, models)

    async def _on_reconnect(self) -> None:
        await self._watch()
        await self.dispatcher.requeue_unstarted()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
        if self.hooks is not None:
            self.hooks.remove(self._on_reconnect)
        await self.models.stop()
        await self.dispatcher.close()


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    if size is not None and size > limit:
        if size <= _DRAIN_LIMIT:
            async for _ in request.stream():
                pass
        raise PayloadTooLarge(f"request body is {size} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    stream = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stalled for {timeout:g}s; send it in one go"
            ) from None
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="Nebula gateway", docs_url=None, redoc_url=None)
    app.add_exception_handler(NebulaError, nebula_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
    app.add_exception_handler(ClientDisconnect, client_gone_handler)
    metrics = gw.metrics

    async def handle(request: Request, endpoint: Endpoint) -> Response:
        """One request's id and accounting around everything it does: every request
        ends in exactly one outcome, and every answer carries its X-Request-Id."""
        rid = request_id(request)
        REQUEST_ID.set(rid)  # this request's task (and tasks it starts) log with it
        tracker = new_tracker(metrics, endpoint.value)
        try:
            response = await submit(request, endpoint, rid, tracker)
        except NebulaError as e:
            tracker.finish(ERROR, e.status)
            log.info("request failed: %d %s", e.status, e.message)
            response = error_response(e)
        except ClientDisconnect:
            tracker.finish(CLIENT_GONE, 499)
            raise
        except Exception:
            tracker.finish(ERROR, 500)
            raise
        response.headers[REQUEST_ID_HEADER] = rid
        return response

    async def submit(
        request: Request, endpoint: Endpoint, rid: str, tracker: Tracker | NullTracker
    ) -> Response:
        body = await _read_body(request, gw.body_limit, gw.settings.body_timeout)
        if endpoint is Endpoint.EMBEDDING:
            emb = decode(body, EmbeddingRequest)
            if not emb.model:
                raise InvalidRequest("Object missing required field `model`", param="model")
            n = emb.count()
            if n == 0:
                raise InvalidRequest("input must not be empty", param="input")
            if n > MAX_EMBEDDING_INPUTS:
                raise InvalidRequest(
                    f"input has {n} items; at most {MAX_EMBEDDING_INPUTS} per request",
                    param="input",
                )
            return await dispatch(request, emb.model, endpoint, body, rid, tracker, stream=False)
        req: ChatCompletionRequest | CompletionRequest
        if endpoint is Endpoint.CHAT:
            req = decode(body, ChatCompletionRequest)
        else:
            req = decode(body, CompletionRequest)
        if req.model and gw.models.spec(req.model) is not None:
            tracker.bind(req.model)  # a bad body for a loaded model counts under its name
        problem = req.problem()
        if problem is not None:
            raise InvalidRequest(problem[1], param=problem[0])
        spec = gw.models.spec(gw.models.base(req.model))
        limit = req.limit()
        if spec is not None and limit is not None and limit > spec.max_output_tokens:
            raise InvalidRequest(
                f"{req.limit_param()} is {limit}; `{req.model}` allows at most "
                f"{spec.max_output_tokens} output tokens",
                param=req.limit_param(),
            )
        return await dispatch(request, req.model, endpoint, body, rid, tracker, stream=req.stream)

    async def dispatch(
        request: Request,
        model: str,
        endpoint: Endpoint,
        body: bytes,
        rid: str,
        tracker: Tracker | NullTracker,
        *,
        stream: bool,
    ) -> Response:
        route = gw.models.resolve(model)  # an adapter queues with its base model
        if tracker.b is None:
            tracker.bind(gw.models.base(model))
        if gw.draining:
            raise Unavailable(
                "the gateway is shutting down; retry", retry_after=gw.settings.retry_after
            )
        call = await gw.dispatcher.submit(route, endpoint, body, rid)
        try:
            if stream:
                return await _stream(call, request, tracker)
            return await _unary(call, request, tracker)
        finally:
            if not stream:
                call.close()

    async def _unary(call: Call, request: Request, tracker: Tracker | NullTracker) -> Response:
        async def answer() -> bytes:
            await _started(call, tracker)
            async for kind, data in call.frames():
                if kind == "end":
                    return data
            raise AssertionError("frames() ends with an end frame")

        try:
            data = await _unless_gone(answer(), request)
        finally:
            await call.cancel()  # no-op once the answer is complete; stops it otherwise
        if data is None:
            tracker.finish(CLIENT_GONE, 499)
            log.info("client left before the answer")
            return Response(status_code=499)
        tracker.finish(COMPLETED, 200, call.usage)
        return Response(data, media_type="application/json")

    async def _stream(call: Call, request: Request, tracker: Tracker | NullTracker) -> Response:
        async def opening() -> tuple[tuple[str, bytes], AsyncIterator[tuple[str, bytes]]]:
            await _started(call, tracker)
            frames = call.frames()
            # Hold the HTTP status until the first answer frame, so an error the
            # worker reports at once (bad request upstream) is a real status code.
            return await anext(frames), frames

        try:
            opened = await _unless_gone(opening(), request)
        except BaseException:
            await call.cancel()
            call.close()
            raise
        if opened is None:  # gave up while queued: withdraw the job, never run it
            await call.cancel()
            call.close()
            tracker.finish(CLIENT_GONE, 499)
            log.info("client left before the first token")
            return Response(status_code=499)
        tracker.first_token()
        first, frames = opened
        return RelayResponse(call, first, frames, gw.settings.slow_client_timeout, tracker)

    async def chat(request: Request) -> Response:
        return await handle(request, Endpoint.CHAT)

    async def completions(request: Request) -> Response:
        return await handle(request, Endpoint.COMPLETION)

    async def embeddings(request: Request) -> Response:
        return await handle(request, Endpoint.EMBEDDING)

    async def list_models(request: Request) -> Response:
        data: list[Model] = []
        for name, info in sorted(gw.models.ready_models().items()):
            data.append(Model(id=name, created=int(info.started_at), owned_by=info.owned_by))
            spec = gw.models.spec(name)
            # An adapter is listed once a ready replica has it (replicas load it on demand).
            if spec is None:
                continue
            for adapter in sorted(gw.models.served_adapters(name) & spec.adapters.keys()):
                data.append(
                    AdapterModel(
                        id=adapter,
                        created=int(info.started_at),
                        owned_by=info.owned_by,
                        root=spec.adapters[adapter],
                        parent=name,
                    )
                )
        return Response(msgspec.json.encode(ModelList(data=data)), media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def ready(request: Request) -> Response:
        if gw.nc.is_connected:
            return Response(b'{"status":"ready","nats":"connected"}', media_type="application/json")
        return Response(
            b'{"status":"not ready","nats":"disconnected"}',
            status_code=503,
            media_type="application/json",
        )

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE)

    def admin() -> ClusterAdmin:
        assert gw.admin is not None, "gateway not started"
        return gw.admin

    def as_json(obj: object, status: int = 200) -> Response:
        return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")

    async def admin_load(request: Request) -> Response:
        body = await _read_body(request, gw.body_limit, gw.settings.body_timeout)
        spec = await admin().load(decode(body, LoadRequest))
        return as_json(spec, 201)

    async def admin_unload(request: Request) -> Response:
        name = request.path_params["name"]
        await admin().unload(name)
        return as_json({"id": name, "object": "model", "deleted": True})

    async def admin_models(request: Request) -> Response:
        return as_json({"object": "list", "data": await admin().models()})

    async def admin_model(request: Request) -> Response:
        name = request.path_params["name"]
        for status in await admin().models():
            if status.name == name:
                return as_json(status)
        raise ModelNotFound(f"model `{name}` is not loaded", param="name")

    async def admin_adapter_add(request: Request) -> Response:
        body = await _read_body(request, gw.body_limit, gw.settings.body_timeout)
        req = decode(body, AdapterRequest)
        spec = await admin().add_adapter(request.path_params["name"], req.name, req.path)
        return as_json(spec, 201)

    async def admin_adapter_remove(request: Request) -> Response:
        name, adapter = request.path_params["name"], request.path_params["adapter"]
        await admin().remove_adapter(name, adapter)
        return as_json({"id": adapter, "object": "model", "deleted": True})

    async def admin_nodes(request: Request) -> Response:
        return as_json({"object": "list", "data": await admin().nodes()})

    # Before the {name:path} routes, which would take these paths as model names.
    app.add_route("/v1/admin/models/{name}/adapters", admin_adapter_add, methods=["POST"])
    app.add_route(
        "/v1/admin/models/{name}/adapters/{adapter}", admin_adapter_remove, methods=["DELETE"]
    )
    app.add_route("/v1/admin/models", admin_load, methods=["POST"])
    app.add_route("/v1/admin/models", admin_models, methods=["GET"])
    app.add_route("/v1/admin/models/{name:path}", admin_unload, methods=["DELETE"])
    app.add_route("/v1/admin/models/{name:path}", admin_model, methods=["GET"])
    app.add_route("/v1/admin/nodes", admin_nodes, methods=["GET"])
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/ready", ready, methods=["GET"])
    app.add_route("/metrics", prometheus, methods=["GET"])
    # The hot routes skip the router and FastAPI's layers (see gateway/fastpath.py).
    app.add_middleware(
        FastPath,
        routes={"/v1/chat/completions": chat, "/v1/completions": completions,
                "/v1/embeddings": embeddings},
    )  # fmt: skip
    app.state.gateway = gw
    return app


async def _started(call: Call, tracker: Tracker | NullTracker) -> None:
    """Wait for a worker to take the call; its time in queue counts also when the
    worker's first frame is an error (a lazy start carries no start frame)."""
    try:
        await call.wait_started()
    finally:
        if call.started_at:
            tracker.started(call.started_at - call.published_at)


async def _unless_gone(work: Coroutine[Any, Any, _T], request: Request) -> _T | None:
    """Run ``work`` unless the client hangs up first (then None: the caller cancels the job)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _SlowClient(Exception):
    pass


class RelayResponse(StreamingResponse):
    """Writes a call's frames to the client as SSE, and owns the call to its end.

    Cleanup lives in ``__call__`` itself (not in a generator that may never start),
    so a client leaving at any moment cancels the job. Each write waits for the
    socket (uvicorn pauses ``send`` while the client is behind); only then is the
    worker granted credit, so a slow reader holds back the worker, not our memory.
    A client that reads nothing for ``slow_timeout`` is cut off.
    """

    def __init__(
        self,
        call: Call,
        first: tuple[str, bytes],
        frames: AsyncIterator[tuple[str, bytes]],
        slow_timeout: float,
        tracker: Tracker | NullTracker,
    ) -> None:
        super().__init__(iter(()), media_type="text/event-stream", headers=_SSE_HEADERS)
        self.call = call
        self.first = first
        self.frames = frames
        self.slow_timeout = slow_timeout
        self.tracker = tracker
        # The stream's end as the relay saw it: None until then (client gone).
        self.ended: tuple[str, int] | None = None
        self.flow: Any = None  # uvicorn's flow control, where the server exposes it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.call
        # uvicorn's send waits only while the client is behind (write_paused): a send
        # begun otherwise cannot block, and needs no timer.
        self.flow = scope.get("extensions", {}).get("nebula.flow")
        relay = asyncio.ensure_future(self._relay(send))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():
                relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
        except _SlowClient:
            log.warning(
                "request %s: the client read nothing for %gs; dropping its connection",
                call.request_id,
                self.slow_timeout,
            )
            # Closing would wait to flush to a reader that does not read: abort.
            abort = scope.get("extensions", {}).get("nebula.abort")
            if abort is not None:
                abort()
                await asyncio.sleep(0)  # let the server see the connection gone
        finally:
            gone.cancel()
            relay.cancel()
            await call.cancel()  # no-op once the stream ended
            call.close()
            # Completed only if the end frame reached the socket; a client that left
            # (or was cut off as too slow) at any point before is client_gone.
            outcome, status = self.ended or (CLIENT_GONE, 200)
            self.tracker.finish(outcome, status, call.usage)
            if outcome != COMPLETED:
                log.info("stream ended: %s (%d)", outcome, status)

    async def _write(self, send: Send, data: bytes, more: bool = True) -> None:
        message = {"type": "http.response.body", "body": data, "more_body": more}
        if self.flow is not None and not self.flow.write_paused:
            await send(message)
            return
        try:
            async with asyncio.timeout(self.slow_timeout):
                await send(message)
        except TimeoutError:
            raise _SlowClient from None

    async def _relay(self, send: Send) -> None:
        call = self.call
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        call.delivered = True
        kind, data = self.first
        try:
            while True:
                # Frames already here go out in one write (a fast upstream's answer
                # arrives as a few frames at once): fewer sends and syscalls.
                while kind != "end" and call.ready():
                    kind, more = await anext(self.frames)
                    data += more
                if kind == "end":
                    break
                await self._write(send, data)
                await call.written(len(data))
                data = b""  # sent: an error from here on is written alone
                kind, data = await anext(self.frames)
            # The last frame and the chunked terminator: one write.
            await self._write(send, data, more=False)
            self.ended = (COMPLETED, 200)
        except NebulaError as e:
            await self._write(send, data + sse_error(e), more=False)
            self.ended = (ERROR, e.status)
        except StopAsyncIteration:
            await self._write(send, data, more=False)
            self.ended = (COMPLETED, 200)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
