"""vLLM hosted in the worker process, answering through vLLM's own OpenAI server app.

The seam is vLLM's FastAPI app (``build_app`` + ``init_app_state``, what ``vllm serve``
runs) called in-process over ASGI with the job's original JSON body, as KServe and
Ray Serve LLM host vLLM. Why the app and not the serving classes it routes to: the
HTTP API is the contract vLLM keeps stable across releases, while the serving
classes' constructors and call signatures change from one release to the next. The
app also brings vLLM's request validation, error bodies and status codes, and its
disconnect handling, so an answer here is byte for byte what vLLM's server sends, and
no socket or HTTP parser sits inside the node.

Around the app, taken from the engine itself:

* arguments: everything after ``--`` goes through vLLM's own parser
  (``make_arg_parser``); a bad flag fails at once with vLLM's message;
* abort: a cancelled job disconnects its ASGI call, which vLLM turns into an engine
  abort (its ``with_cancellation`` and streaming response watch for the disconnect);
* load: running/waiting requests and KV-cache usage from a stat logger registered with
  the engine, plus the engine's own count of unfinished requests;
* health: the engine's ``check_health``.

vLLM is imported inside functions only: Nebula installs and type-checks without it.
vLLM starts engine-core processes of its own; the node agent stops the worker's
whole process group, so none outlive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from argparse import Namespace
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from nebula.errors import EngineDead, EngineError, InvalidRequest, Unavailable
from nebula.openai_types import Usage
from nebula.protocol import Endpoint
from workers.engines.base import EngineLoad, Job, Output
from workers.engines.openai_bridge import ChunkProbe

_probe = msgspec.json.Decoder(ChunkProbe).decode

log = logging.getLogger(__name__)

_PATHS = {Endpoint.CHAT: "/v1/chat/completions", Endpoint.COMPLETION: "/v1/completions"}
# vLLM adds its adapter routes to the app only with this set; the app is never exposed
# over HTTP here, so they are reachable only by the worker itself.
_RUNTIME_LORA = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_PROG = "vllm serve"
# How long a disconnected call may take to wind down (vLLM aborts it) before it is cancelled.
_DISCONNECT_GRACE = 2.0


@dataclass(frozen=True, kw_only=True)
class VllmSettings:
    model: str  # the Nebula model name: vLLM serves under it, so answers carry it
    model_path: str | None = None
    engine_args: tuple[str, ...] = ()
    gpu_memory: float = 0.0  # fraction of one GPU; 0: leave vLLM's default (CPU)
    adapters: tuple[tuple[str, str], ...] = ()  # LoRA (name, path), loaded at start


def vllm_argv(settings: VllmSettings) -> list[str]:
    """vLLM command-line arguments for a Nebula model: ``--model`` from the model path,
    the user's engine args, ``--gpu-memory`` as ``--gpu-memory-utilization`` unless the
    args set it, and the Nebula name as ``--served-model-name`` (last, so it wins:
    requests name the Nebula model)."""
    argv = [f"--model={settings.model_path}"] if settings.model_path else []
    argv += settings.engine_args
    if settings.gpu_memory > 0 and not any(
        a.split("=", 1)[0] in ("--gpu-memory-utilization", "--gpu_memory_utilization")
        for a in settings.engine_args
    ):
        argv.append(f"--gpu-memory-utilization={settings.gpu_memory:g}")
    if settings.adapters:
        if "--enable-lora" not in argv:
            argv.append("--enable-lora")
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in settings.adapters)]
    argv.append(f"--served-model-name={settings.model}")
    return argv


def parse_args(argv: list[str]) -> Namespace:
    """vLLM's own server parser and checks; a bad flag is an InvalidRequest with vLLM's message."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog=_PROG))
    err = io.StringIO()
    try:
        # argparse reports by printing usage and exiting: keep its words, not the exit.
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
    except SystemExit:
        text = err.getvalue()
        start = text.find(f"{_PROG}: error:")
        raise InvalidRequest(
            (text[start:] if start >= 0 else text).strip() or "invalid vLLM arguments",
            param="engine_args",
        ) from None
    except (TypeError, ValueError) as e:
        raise InvalidRequest(str(e), param="engine_args") from None
    if not args.model and args.model_tag:
        args.model = args.model_tag
    return args


def check_args(settings: VllmSettings) -> None:
    """Validate a load before anything starts (where vLLM is importable)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parse_args(vllm_argv(settings))
    if settings.model_path and not os.path.isdir(settings.model_path):
        # Building the engine args resolves the model: a path on the nodes (not here)
        # or a hub id is theirs to resolve, and a failure there ends the load Failed.
        return
    try:
        AsyncEngineArgs.from_cli_args(args)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(str(e), param="engine_args") from None


@dataclass(slots=True)
class _Stats:
    """The latest scheduler stats the engine reported."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


def _stat_logger_factory(sink: _Stats) -> Callable[[Any, int], Any]:
    """A per-engine stat logger (vLLM's documented extension point) that keeps the
    latest scheduler stats in ``sink``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                sink.running = scheduler_stats.num_running_reqs
                sink.waiting = scheduler_stats.num_waiting_reqs
                sink.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


@dataclass(eq=False, slots=True)
class _Call:
    """One in-process ASGI call: the body goes in once, then the call waits for a
    disconnect, which is how the app learns that the job was cancelled."""

    body: bytes
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    sent: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    body_read: bool = False

    async def receive(self) -> dict[str, Any]:
        if not self.body_read:
            self.body_read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        await self.sent.put(message)


def _error(status: int, body: bytes) -> EngineError:
    try:
        message = msgspec.json.decode(body)["error"]["message"]
    except (msgspec.DecodeError, KeyError, TypeError):
        message = body.decode(errors="replace")
    return EngineError(str(message), status=status, raw_body=body)


class VllmEngine:
    kind = "vllm"

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.args = parse_args(vllm_argv(settings))  # fails here, before any loading
        self.owned_by = f"vllm ({self.args.model})"
        self._stack = contextlib.AsyncExitStack()
        self._engine: Any = None
        self._app: Any = None
        self._headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        self._stats = _Stats()
        self._calls: dict[str, _Call] = {}
        self._capacity = 0
        self.adapters: dict[str, str] = dict(settings.adapters)  # loaded: name -> path
        self.phase = ""  # what start() is doing, for the worker's starting heartbeats
        self._adapter_lock = asyncio.Lock()

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.args
        # As vLLM's build_async_engine_client does, plus a stat logger for load().
        engine_args = AsyncEngineArgs.from_cli_args(args)
        with contextlib.suppress(ImportError):
            from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction

            propagate_flash_late_interaction(args, engine_args)
        usage = UsageContext.OPENAI_API_SERVER
        # Both block for long (config from disk or hub; weights, memory profiling and
        # warm-up in the engine core): off the event loop, so the worker's starting
        # heartbeats say which phase it is in.
        self.phase = "resolving the model and its config"
        config = await asyncio.to_thread(engine_args.create_engine_config, usage_context=usage)
        self.phase = "loading weights, profiling memory, warming up (vLLM engine core)"
        engine = await asyncio.to_thread(
            AsyncLLM.from_vllm_config,
            vllm_config=config,
            usage_context=usage,
            stat_loggers=[_stat_logger_factory(self._stats)],
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats,
        )
        self.phase = "starting vLLM's OpenAI server app"
        self._stack.callback(engine.shutdown, timeout=config.shutdown_timeout)
        self._engine = engine
        await engine.reset_mm_cache()
        tasks = await engine.get_supported_tasks()
        if args.enable_lora:
            os.environ[_RUNTIME_LORA] = "True"
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, app.state, args, tasks)
        # The app's lifespan logs engine stats periodically, as vLLM's server does.
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        self._app = app
        if args.api_key:  # the app checks it on every call, in-process ones too
            self._headers.append((b"authorization", f"Bearer {args.api_key[0]}".encode()))
        self._capacity = int(config.scheduler_config.max_num_seqs)

    async def health(self) -> bool:
        if self._engine is None:
            return False
        # A dead engine core does not come back inside this process: say so, and the
        # worker exits for its node agent to restart it.
        if self._engine.errored:
            raise EngineDead(f"vLLM's engine core died: {self._engine.dead_error!r}")
        try:
            await self._engine.check_health()
        except Exception as e:
            if self._engine.errored:
                raise EngineDead(f"vLLM's engine core died: {e!r}") from None
            raise
        return True

    async def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            call.disconnected.set()

    def load(self) -> EngineLoad:
        stats = self._stats
        # Scheduler stats arrive with engine output: once nothing is unfinished, the last
        # report is stale, and the engine's own count says it is idle.
        if self._engine is None or self._engine.get_num_unfinished_requests() == 0:
            return EngineLoad(running=0, capacity=self._capacity, kv_cache_usage=0.0)
        return EngineLoad(
            running=stats.running,
            waiting=stats.waiting,
            capacity=self._capacity,
            kv_cache_usage=stats.kv_cache_usage,
        )

    def unfinished(self) -> int:
        """Requests the engine holds right now (its own count)."""
        return 0 if self._engine is None else int(self._engine.get_num_unfinished_requests())

    async def stop(self) -> None:
        self._app = None
        self._engine = None
        await self._stack.aclose()

    async def set_adapters(self, wanted: Mapping[str, str]) -> None:
        """Load and unload LoRA adapters until exactly ``wanted`` is loaded (vLLM's own
        adapter routes, in-process). A failure is vLLM's error, with its status."""
        async with self._adapter_lock:
            for name in [n for n in self.adapters if n not in wanted]:
                await self._post("/v1/unload_lora_adapter", {"lora_name": name})
                del self.adapters[name]
                log.info("unloaded LoRA adapter %s", name)
            for name, path in wanted.items():
                if self.adapters.get(name) == path:
                    continue
                if name in self.adapters:  # same name, new path: replace it
                    await self._post("/v1/unload_lora_adapter", {"lora_name": name})
                    del self.adapters[name]
                await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
                self.adapters[name] = path
                log.info("loaded LoRA adapter %s from %s", name, path)

    async def _post(self, path: str, payload: dict[str, Any]) -> bytes:
        if self._app is None:
            raise Unavailable("the vLLM engine is not running")
        call = _Call(msgspec.json.encode(payload))
        call.disconnected.set()  # nothing to stream: the app may see the end at once
        task = asyncio.create_task(self._run(path, call))
        start = await call.sent.get()
        body = b"".join([chunk async for chunk in _body(call)])
        await task
        if start is None:
            raise EngineError(f"vLLM returned no response to {path}")
        if int(start["status"]) >= 400:
            raise _error(int(start["status"]), body)
        return body

    async def _run(self, path: str, call: _Call) -> None:
        """One in-process ASGI call of vLLM's app; ``None`` on ``call.sent`` ends it."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            # No X-Request-Id here: vLLM would take it as its engine request id, and two
            # clients reusing one id would collide inside the engine.
            "headers": [*self._headers, (b"content-length", str(len(call.body)).encode())],
            "client": ("127.0.0.1", 0),
            "server": ("nebula-worker", 0),
        }
        try:
            await self._app(scope, call.receive, call.send)
        finally:
            call.sent.put_nowait(None)

    async def generate(self, job: Job) -> AsyncIterator[Output]:
        path = _PATHS.get(job.endpoint)
        if path is None:
            raise EngineError(f"the vllm engine does not serve {job.endpoint.value}", status=400)
        if self._app is None:
            raise Unavailable("the vLLM engine is not running")
        call = _Call(job.body)
        self._calls[job.request_id] = call
        task = asyncio.create_task(self._run(path, call))
        try:
            start = await call.sent.get()
            if start is None:
                await task  # the app failed before answering: raise its error
                raise EngineError("vLLM returned no response")
            status = int(start["status"])
            streaming = any(
                k == b"content-type" and v.startswith(b"text/event-stream")
                for k, v in start.get("headers", ())
            )
            if status >= 400 or not streaming:
                body = b"".join([chunk async for chunk in _body(call)])
                if status >= 400:
                    raise _error(status, body)
                probe = msgspec.json.decode(body, type=ChunkProbe)
                tokens = probe.usage.completion_tokens if probe.usage else 0
                yield Output(chunk=body, tokens=tokens, usage=probe.usage)
                return
            # vLLM's stream is one `data: {...}` event per message; what has queued up
            # since the last turn goes on as one Output, as vLLM framed it.
            rest = b""
            async for data in _body(call):
                events = (rest + data).split(b"\n\n")
                rest = events.pop()
                out: list[bytes] = []
                tokens = 0
                usage: Usage | None = None
                for event in events:
                    if not event.startswith(b"data: "):
                        continue  # keep-alive comments
                    chunk = event[6:]
                    if chunk == b"[DONE]":
                        continue  # the worker ends every stream with its own [DONE]
                    probe = _probe(chunk)
                    if probe.error is not None:
                        if out:
                            yield Output(
                                chunk=b"".join(out), tokens=tokens, usage=usage, framed=True
                            )
                        raise _error(_error_code(probe.error), chunk)
                    tokens += probe.tokens()
                    if probe.usage is not None and not probe.choices:
                        usage = probe.usage  # the usage-only chunk that ends the stream
                    out.append(event + b"\n\n")
                if out:
                    yield Output(chunk=b"".join(out), tokens=tokens, usage=usage, framed=True)
        finally:
            self._calls.pop(job.request_id, None)
            if not task.done():
                # The job ended early (cancelled, client gone): disconnect, let vLLM abort.
                call.disconnected.set()
                await asyncio.wait({task}, timeout=_DISCONNECT_GRACE)
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.debug("vLLM call for %s ended with %r", job.request_id, task.exception())


async def _body(call: _Call) -> AsyncIterator[bytes]:
    """The response body as it comes, joining what queued up meanwhile: one turn of the
    consumer per batch of vLLM's messages, not per token."""
    while True:
        msg: dict[str, Any] | None = await call.sent.get()
        parts = []
        done = False
        while True:
            if msg is None:
                done = True
                break
            if msg["type"] == "http.response.body":
                if msg.get("body"):
                    parts.append(msg["body"])
                if not msg.get("more_body", False):
                    done = True
                    break
            try:
                msg = call.sent.get_nowait()
            except asyncio.QueueEmpty:
                break
        if parts:
            yield b"".join(parts)
        if done:
            return


def _error_code(raw: msgspec.Raw) -> int:
    """vLLM puts the HTTP status in ``code`` of an error sent inside a stream."""
    try:
        code = msgspec.json.decode(raw).get("code")
    except (msgspec.DecodeError, AttributeError):
        return 500
    return code if isinstance(code, int) and 400 <= code < 600 else 500
