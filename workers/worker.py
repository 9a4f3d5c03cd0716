"""The engine worker: pulls jobs for ONE model only when it has a free slot.

Flow control is explicit. The worker keeps JetStream pull requests outstanding
for exactly ``max_concurrency - inflight`` messages, so jobs queue in the broker
(where every worker of the model can take them) and never inside a busy engine.
Each job streams frames to the gateway's reply subject: ``start`` at once, the
first token at once, later tokens batched by count or time, ``keepalive`` while
silent, then ``end`` or ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from nebula import natsio, subjects
from nebula.errors import (
    DeadlineExceeded,
    EngineDead,
    EngineError,
    InvalidRequest,
    NebulaError,
    Unavailable,
    WorkerLost,
)
from nebula.logs import REQUEST_ID
from nebula.openai_types import SSE_DONE, StreamFlags, Usage, sse
from nebula.protocol import (
    Endpoint,
    FrameKind,
    ModelSpec,
    WorkerInfo,
)
from nebula.service import Service, cancel_and_wait
from nebula.settings import NatsSettings, WorkerSettings
from workers.batch_intake import BATCH_PULL_EXPIRES, BatchIntake
from workers.engines.base import AdapterHost, Engine, Job

log = logging.getLogger(__name__)

# Seconds a pull request lingers in the server. Short: a pull lost with its consumer
# leader (a NATS server died) is only known lost when it expires, so this bounds how
# long a worker sits idle after a failover (plus the slack in _ticker).
PULL_EXPIRES = 2.0
# A pull answered 503 (the consumer has no leader: an election runs) is asked again
# after this long, so a worker takes jobs within a fraction of a second of the election.
REPULL_AFTER_503 = 0.1
_ACK = b"+ACK"
_NAK = b"-NAK"
# A worker stops an attempt once it has been silent this fraction of the gateway's
# silence timeout: by then the gateway may have re-queued it, so it must not finish.
_FENCE = 0.9
_ENDPOINTS = {e.value: e for e in Endpoint}


class _Fenced(Exception):
    """The gateway has given up on this attempt: send nothing more for it."""


class WorkerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(eq=False, slots=True)
class _InFlight:
    """One attempt of one request. Keyed by (request id, attempt): a retry that lands on
    the same worker is a different entry, so neither can clean up the other."""

    request_id: str
    attempt: int
    reply: str
    task: asyncio.Task[None] | None = None
    seq: int = 0
    buf: list[bytes] = field(default_factory=list)
    buf_tokens: int = 0
    buf_since: float = 0.0
    last_sent: float = 0.0
    # Flow control: bytes sent vs bytes the gateway has written to its client.
    window: int = 0
    sent: int = 0
    consumed: int = 0
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    # The gateway's silence timeout (0: unknown, never fence).
    silence: float = 0.0
    fenced: bool = False
    waiting_credit: bool = False  # held back by its reader, not by the engine
    # Monotonic time by which a held-back start frame goes out (0: start already sent,
    # or carried by the first frame).
    start_due: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.request_id, self.attempt)

    @property
    def engine_id(self) -> str:
        return self.request_id if self.attempt == 1 else f"{self.request_id}-a{self.attempt}"


@dataclass(frozen=True, slots=True)
class _JobHeaders:
    request_id: str
    reply: str
    attempt: int
    endpoint: Endpoint
    deadline: float
    window: int
    silence: float
    lazy_start: bool


def _parse_headers(hdrs: dict[str, str]) -> _JobHeaders | InvalidRequest:
    """Job headers come from any NATS publisher: a bad one is a 400, never a crash."""
    rid = hdrs.get(subjects.H_REQUEST_ID) or uuid.uuid4().hex
    reply = hdrs.get(subjects.H_REPLY, "")
    try:
        attempt = int(hdrs.get(subjects.H_ATTEMPT) or 1)
        endpoint_text = hdrs.get(subjects.H_ENDPOINT) or Endpoint.CHAT.value
        endpoint = _ENDPOINTS.get(endpoint_text)
        if endpoint is None:
            return InvalidRequest(
                f"header {subjects.H_ENDPOINT} must be chat, completion or embedding, "
                f"got {endpoint_text!r}",
                param=subjects.H_ENDPOINT,
            )
        deadline = float(hdrs.get(subjects.H_DEADLINE) or 0)
        window = int(hdrs.get(subjects.H_WINDOW) or 0)
        silence = float(hdrs.get(subjects.H_SILENCE) or 0)
    except ValueError as e:
        return InvalidRequest(f"bad job header: {e}", param="headers")
    if attempt < 1 or window < 0 or silence < 0 or deadline != deadline:  # NaN
        return InvalidRequest("bad job header: negative or NaN value", param="headers")
    lazy = hdrs.get(subjects.H_START) == subjects.START_LAZY
    return _JobHeaders(rid, reply, attempt, endpoint, deadline, window, silence, lazy)


def _valid_reply(subject: str) -> bool:
    return bool(subject) and not any(c in subject for c in " \t\r\n*>") and ".." not in subject


class Worker(Service):
    """``async with Worker(...) as w: await w.wait_closed()``."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        nc: Client,
        nats_settings: NatsSettings,
        *,
        node_id: str = "",
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.nc = nc
        self.nats_settings = nats_settings
        self.node_id = node_id or socket.gethostname()
        self.worker_id = settings.worker_id or f"w{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.state = WorkerState.CREATED
        self.model = settings.model
        self._stream_name = subjects.req_stream(self.model)
        self._consumer = subjects.req_consumer(self.model)
        self._pull_subject = subjects.pull_next_subject(self._stream_name, self._consumer)
        self._deliver = nc.new_inbox()
        # Outstanding pull requests, oldest first: [expires_at, messages still owed].
        self._pulls: deque[list[float]] = deque()
        self._inflight: dict[tuple[str, int], _InFlight] = {}
        self._subs: list[Subscription] = []
        self._deliver_sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._kv: KeyValue | None = None
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = asyncio.Event()  # set when an interactive job arrives (wakes the ticker)
        self.healthy = True
        self.health_reason = ""
        self.jobs_started = 0
        self.jobs_cancelled = 0
        self.jobs_expired = 0
        self.jobs_fenced = 0
        self.jobs_stale = 0
        self.jobs_dead_lettered = 0
        self.jobs_redelivered = 0
        self.jobs_completed = 0
        self.jobs_failed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.peak_inflight = 0
        self._last_repair = 0.0
        self._repairing: asyncio.Task[None] | None = None
        self._repull: asyncio.Task[None] | None = None
        self._last_tick = time.monotonic()
        self._started_at = time.time()
        # Batch items: their own pull inbox, pulls and slots (see workers/batch_intake.py).
        self.batch = BatchIntake(self)
        # LoRA adapters the model's spec asks for (engines that host adapters only).
        self._adapter_host = engine if isinstance(engine, AdapterHost) else None
        self._wanted_adapters: dict[str, str] | None = None
        # Engine progress, for the stall watchdog; set when the engine hangs.
        self._last_progress = time.monotonic()
        self.broken = asyncio.Event()
        self.broken_reason = ""

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        js = self.nc.jetstream()
        await self._ensure_stream()
        await natsio.ensure_dlq_stream(js, self.nats_settings)
        await self._ensure_consumer()
        self._kv = await natsio.workers_bucket(js, self.nats_settings)
        self._deliver_sub = await self.nc.subscribe(self._deliver, cb=self._on_msg)
        self._subs.append(
            await self.nc.subscribe(subjects.cancel_subject(self.worker_id), cb=self._on_cancel)
        )
        self._subs.append(
            await self.nc.subscribe(subjects.credit_subject(self.worker_id), cb=self._on_credit)
        )
        if self._adapter_host is not None:
            # Every write of the model's spec (adapter add/remove) reaches this replica.
            self._subs.append(
                await self.nc.subscribe(
                    subjects.kv_subject(subjects.MODELS_BUCKET, subjects.model_key(self.model)),
                    cb=self._on_spec,
                )
            )
            await self._read_spec()
        if self.settings.batch:
            await self.batch.start()
        self.state = WorkerState.RUNNING
        await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"{self.worker_id}-heartbeat"),
            asyncio.create_task(self._ticker(), name=f"{self.worker_id}-ticker"),
            asyncio.create_task(self._health_loop(), name=f"{self.worker_id}-health"),
        ]
        await self._refill()
        log.info("worker %s serving %r", self.worker_id, self.model)

    async def _ensure_stream(self) -> None:
        js = self.nc.jetstream()
        spec = await natsio.model_spec(js, self.nats_settings, self.model)
        await natsio.ensure_request_stream(js, self.nats_settings, self.model, spec)

    async def _ensure_consumer(self) -> None:
        js = self.nc.jetstream()
        await js.add_consumer(
            self._stream_name,
            ConsumerConfig(
                durable_name=self._consumer,
                filter_subject=subjects.req_subject(self.model),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                # Workers ack on receipt; a job handed to a worker that died before
                # acking comes back to the queue after this long.
                ack_wait=self.settings.ack_wait,
                # No server-side cap: a worker dead-letters a job delivered more than
                # max_deliver times itself (with the reason), so a job is never silently
                # dropped and never stuck in the queue, counting against its bound.
                max_deliver=-1,
                max_waiting=4096,
            ),
        )

    async def close(self) -> None:
        """Stop taking work, let in-flight jobs finish (bounded), cancel the rest."""
        if self.state in (WorkerState.DRAINING, WorkerState.STOPPED):
            await self._closed.wait()
            return
        self.state = WorkerState.DRAINING
        # Stop taking work first. The server drops open pull requests whose inbox has
        # no interest; draining the subscription (unsubscribe + round trip) hands back
        # (NAKs) every job it sent before that, so none waits out ack_wait in a dead inbox.
        await self._drop_pulls()
        await self.batch.stop_taking()
        with contextlib.suppress(Exception):
            await self._heartbeat_once()
        await self.batch.drain()
        if self._inflight and not self.broken.is_set():  # a hung engine finishes nothing
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        for job in list(self._inflight.values()):
            if job.task is not None:
                job.task.cancel()
                await self._send_error(
                    job, WorkerLost(self.broken_reason or "worker stopped before finishing")
                )
        tasks = [*self._tasks, *(t for t in (self._repairing, self._repull) if t is not None)]
        await cancel_and_wait(tasks)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(subjects.worker_key(self.model, self.worker_id))
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        self.state = WorkerState.STOPPED
        self._closed.set()

    async def _drop_pulls(self) -> None:
        """Give up every open pull request: the NAKs hand back what they already brought."""
        sub, self._deliver_sub = self._deliver_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.drain()
        self._pulls.clear()

    async def _resume_pulls(self) -> None:
        if self._deliver_sub is None:
            self._deliver = self.nc.new_inbox()
            self._deliver_sub = await self.nc.subscribe(self._deliver, cb=self._on_msg)
        await self._refill()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def items_done(self) -> int:
        return self.batch.items_done

    def progressed(self) -> None:
        """The engine produced output (for the stall watchdog)."""
        self._last_progress = time.monotonic()

    @property
    def taking_work(self) -> bool:
        return self.state is WorkerState.RUNNING and self.healthy

    # --- LoRA adapters ----------------------------------------------------------

    async def _on_spec(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(KV_OP) in (KV_DEL, KV_PURGE):
            return  # unloaded: the node agent stops this worker
        try:
            spec = msgspec.json.decode(msg.data, type=ModelSpec)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        await self._apply_adapters(spec.adapters)

    async def _read_spec(self) -> None:
        spec = await natsio.model_spec(self.nc.jetstream(), self.nats_settings, self.model)
        if spec is not None:
            await self._apply_adapters(spec.adapters)

    async def _apply_adapters(self, wanted: dict[str, str]) -> None:
        host = self._adapter_host
        if host is None or wanted == self._wanted_adapters:
            return
        self._wanted_adapters = dict(wanted)
        try:
            await host.set_adapters(wanted)
        except NebulaError as e:  # a bad path: requests for it get the engine's error
            log.warning("adapters %s: %s", sorted(wanted), e.message)
        with contextlib.suppress(Exception):
            await self._heartbeat_once()  # the gateway lists what is loaded now

    async def _ensure_adapter(self, name: str) -> None:
        """A job for adapter ``name`` that this replica has not loaded yet (it was just
        added): load what the spec asks for first, so the job runs where the adapter is."""
        host = self._adapter_host
        if host is None or name == self.model or name in host.adapters:
            return
        if self._wanted_adapters is None or name not in self._wanted_adapters:
            await self._read_spec()
        wanted = self._wanted_adapters or {}
        if name in wanted and name not in host.adapters:
            await host.set_adapters(wanted)

    # --- flow control ----------------------------------------------------------

    def _owed(self) -> int:
        return int(sum(p[1] for p in self._pulls))

    async def _refill(self) -> None:
        if not self.taking_work or self._deliver_sub is None or not self.nc.is_connected:
            return
        want = self.settings.max_concurrency - len(self._inflight) - self._owed()
        if want > 0:
            self._pulls.append([time.monotonic() + PULL_EXPIRES, float(want)])
            req = b'{"batch":%d,"expires":%d}' % (want, int(PULL_EXPIRES * 1e9))
            await self.nc.publish(self._pull_subject, req, reply=self._deliver)
        await self.batch.refill()

    def _pull_satisfied(self, n: float = 1.0) -> None:
        if self._pulls:
            self._pulls[0][1] -= n
            if self._pulls[0][1] <= 0:
                self._pulls.popleft()

    async def _on_msg(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        if not msg.reply.startswith(subjects.JS_ACK_PREFIX):
            await self._on_status(hdrs.get("Status", ""), hdrs)
            return
        self._pull_satisfied()
        if not self.taking_work:
            await self.nc.publish(msg.reply, _NAK)  # back to the queue for another worker
            return
        stalled = time.monotonic() - self._last_tick
        if stalled > self.settings.ack_wait * 0.8:
            # This process was frozen (SIGSTOP, swap) long enough that JetStream may
            # already have handed this delivery to another worker: leave it unacked,
            # so it runs once, wherever JetStream delivers it next.
            self.jobs_stale += 1
            log.warning("dropping a delivery read after a %.1fs stall", stalled)
            return
        try:
            delivered = msg.metadata.num_delivered
        except Exception:
            delivered = 1
        await self.nc.publish(msg.reply, _ACK)
        if delivered > 1:
            self.jobs_redelivered += 1
        parsed = _parse_headers(hdrs)
        reply = parsed.reply if isinstance(parsed, _JobHeaders) else hdrs.get(subjects.H_REPLY, "")
        if not _valid_reply(reply):
            await self.dead_letter(msg, f"job has no valid {subjects.H_REPLY} header")
            return
        if delivered > self.settings.max_deliver:
            await self.dead_letter(msg, f"delivered {delivered} times without being taken")
            if isinstance(parsed, _JobHeaders):
                rid, attempt = parsed.request_id, parsed.attempt
            else:
                rid, attempt = hdrs.get(subjects.H_REQUEST_ID, ""), 1
            await self._send_error(
                _InFlight(request_id=rid, attempt=attempt, reply=reply),
                Unavailable(f"the job was delivered {delivered} times without being taken"),
            )
            return
        if isinstance(parsed, InvalidRequest):
            rid = hdrs.get(subjects.H_REQUEST_ID, "")
            await self._send_error(_InFlight(request_id=rid, attempt=1, reply=reply), parsed)
            return
        job = _InFlight(
            request_id=parsed.request_id,
            attempt=parsed.attempt,
            reply=reply,
            last_sent=time.monotonic(),
            window=parsed.window,
            silence=parsed.silence,
        )
        if job.key in self._inflight:  # the same attempt twice: it is already running here
            return
        self._inflight[job.key] = job
        self.peak_inflight = max(self.peak_inflight, len(self._inflight))
        self._idle.clear()
        self._busy.set()
        job.task = asyncio.create_task(self._run(job, msg, parsed))

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Park a job nobody can run on the dead-letter subject, with the reason."""
        self.jobs_dead_lettered += 1
        log.warning("dead-lettering a job for %r: %s", self.model, reason)
        headers = {k: v for k, v in (msg.headers or {}).items() if k.startswith("Nebula-")}
        headers[subjects.H_DEAD_REASON] = reason
        try:
            await self.nc.jetstream().publish(
                subjects.dlq_subject(self.model), msg.data, headers=headers, timeout=5.0
            )
        except Exception as e:
            log.error("could not dead-letter a job for %r (%s): %s", self.model, reason, e)

    async def _on_status(self, status: str, hdrs: dict[str, str]) -> None:
        if status == "100":  # idle heartbeat
            return
        if status in ("408", "409", "503"):
            # The oldest pull request ended (expired, refused, or nobody answered it):
            # forget what it still owed.
            if self._pulls:
                self._pulls.popleft()
            if status == "503" or "Consumer Deleted" in hdrs.get("Description", ""):
                self._repair_soon()
            if status == "503":
                # Nobody answers pulls while the consumer elects a leader: ask again
                # shortly, not in a tight loop and not only at the next pull expiry.
                if self._repull is None or self._repull.done():
                    self._repull = asyncio.create_task(self._refill_after(REPULL_AFTER_503))
                return
        await self._refill()

    async def _refill_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._refill()

    def _repair_soon(self) -> None:
        """Re-create the stream and consumer in the background: the repair may wait out a
        leader election (seconds), and deliveries must not queue up behind it in this
        subscription's callback meanwhile."""
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.create_task(self._repair())

    async def _repair(self) -> None:
        """Re-create the stream and consumer (memory storage dies with a NATS restart)."""
        now = time.monotonic()
        if now - self._last_repair < 1.0:
            return
        self._last_repair = now
        try:
            await self._ensure_stream()
            await self._ensure_consumer()
        except Exception as e:
            log.warning("could not re-create the queue for %r: %s", self.model, e)
            return
        await self._refill()

    def _jobs_of(self, data: bytes) -> tuple[list[_InFlight], list[bytes]]:
        parts = data.split()
        if not parts:
            return [], parts
        rid = parts[0].decode(errors="replace")
        attempt = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        jobs = [
            j
            for j in self._inflight.values()
            if j.request_id == rid and (attempt is None or j.attempt == attempt)
        ]
        return jobs, parts

    async def _on_cancel(self, msg: Msg) -> None:
        jobs, _ = self._jobs_of(msg.data)
        for job in jobs:
            if job.task is not None and not job.task.done():
                self.jobs_cancelled += 1
                job.task.cancel()

    async def _on_credit(self, msg: Msg) -> None:
        jobs, parts = self._jobs_of(msg.data)
        if len(parts) < 3 or not parts[2].isdigit():
            return
        consumed = int(parts[2])
        for job in jobs:
            if consumed > job.consumed:
                job.consumed = consumed
                job.credit.set()

    # --- running a job -----------------------------------------------------------

    async def _run(self, job: _InFlight, msg: Msg, hdrs: _JobHeaders) -> None:
        REQUEST_ID.set(job.request_id)  # every line this job's task logs carries it
        began = time.perf_counter()
        outcome = "cancelled"
        try:
            if hdrs.deadline and hdrs.deadline < time.time():
                self.jobs_expired += 1
                await self._send_error(
                    job, DeadlineExceeded("request waited in queue past its deadline")
                )
                return
            self.jobs_started += 1
            if len(self._inflight) == 1:  # the engine was idle: its clock starts now
                self._last_progress = time.monotonic()
            hold = self.settings.start_hold_ms / 1000
            if hdrs.lazy_start and hold > 0:
                # A fast engine's first frame follows within the hold and carries the
                # start (the ticker sends a lone start after it): one message less.
                job.start_due = time.monotonic() + hold
            else:
                await self._frame(job, FrameKind.START, b"")
            try:
                flags = msgspec.json.decode(msg.data, type=StreamFlags)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
                raise InvalidRequest(f"job body is not a valid request: {e}") from None
            if flags.model and self._adapter_host is not None:
                await self._ensure_adapter(flags.model)
            limit = flags.limit
            if limit is not None and limit > self.settings.max_output_tokens:
                param = "max_completion_tokens" if flags.max_completion_tokens else "max_tokens"
                raise InvalidRequest(
                    f"{param} is {limit}; `{self.model}` allows at most "
                    f"{self.settings.max_output_tokens} output tokens",
                    param=param,
                )
            work = Job(
                request_id=job.engine_id,
                model=self.model,
                endpoint=hdrs.endpoint,
                body=msg.data,
                stream=flags.stream,
                include_usage=flags.include_usage,
            )
            if work.stream:
                usage = await self._stream(job, work)
            else:
                body = b""
                usage = None
                async for out in self.engine.generate(work):
                    body = out.chunk
                    usage = out.usage
                await self._frame(job, FrameKind.END, body, usage)
            outcome = "completed"
            self.jobs_completed += 1
            if usage is not None:
                self.prompt_tokens += usage.prompt_tokens
                self.completion_tokens += usage.completion_tokens or 0
        except asyncio.CancelledError:
            pass  # cancelled by the client, by the gateway's fence or by close()
        except _Fenced:
            self.jobs_fenced += 1
            outcome = "abandoned"
            log.warning(
                "request %s attempt %d: silent past the gateway's timeout; abandoned",
                job.request_id,
                job.attempt,
            )
        except NebulaError as e:
            outcome = f"error {e.status}"
            self.jobs_failed += 1
            await self._send_error(job, e)
        except Exception as e:
            outcome = "error 500"
            self.jobs_failed += 1
            log.exception("job %s failed", job.request_id)
            await self._send_error(job, EngineError(f"engine failed: {e!r}"))
        finally:
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request %s attempt %d %s: %s in %.1f ms",
                    job.request_id,
                    job.attempt,
                    hdrs.endpoint.value,
                    outcome,
                    (time.perf_counter() - began) * 1000,
                )
            with contextlib.suppress(Exception):
                await self.engine.abort(job.engine_id)  # no-op for a finished request
            self._inflight.pop(job.key, None)
            if not self._inflight:
                self._idle.set()
            await self._refill()

    async def _stream(self, job: _InFlight, work: Job) -> Usage | None:
        first = True
        limit = self.settings.batch_tokens
        batch_s = self.settings.batch_ms / 1000
        usage: Usage | None = None
        async for out in self.engine.generate(work):
            now = self._last_progress = time.monotonic()
            if out.usage is not None:
                usage = out.usage
            if not out.chunk:
                continue
            job.buf.append(out.chunk if out.framed else sse(out.chunk))
            if not job.buf_tokens:
                job.buf_since = now
            job.buf_tokens += max(out.tokens, 1)
            if first and out.tokens:  # the first token goes out at once
                first = False
                await self._flush(job)
            # A frame at most every batch_ms (or batch_tokens): a token that comes after
            # a quiet spell goes at once, not on the ticker's next round.
            elif job.buf_tokens >= limit or now - job.last_sent >= batch_s:
                await self._flush(job)
            if job.window and job.sent - job.consumed >= job.window:
                await self._wait_credit(job)
        job.buf.append(SSE_DONE)
        body = b"".join(job.buf)
        job.buf.clear()
        job.buf_tokens = 0
        await self._frame(job, FrameKind.END, body, usage)
        return usage

    async def _wait_credit(self, job: _InFlight) -> None:
        """Take nothing more from the engine until the client has read enough: the
        engine keeps (and coalesces) its output, and memory per stream stays bounded."""
        await self._flush(job)
        job.waiting_credit = True
        try:
            async with asyncio.timeout(self.settings.credit_timeout):
                while job.sent - job.consumed >= job.window:
                    job.credit.clear()
                    await job.credit.wait()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the client read nothing for {self.settings.credit_timeout:.0f}s"
            ) from None
        finally:
            job.waiting_credit = False
            self._last_progress = time.monotonic()

    async def _flush(self, job: _InFlight) -> None:
        if not job.buf:
            return
        body = b"".join(job.buf)
        job.buf.clear()
        job.buf_tokens = 0
        await self._frame(job, FrameKind.DATA, body)
        job.sent += len(body)

    def _headers(self, job: _InFlight, kind: FrameKind) -> dict[str, str]:
        job.seq += 1
        return {
            subjects.H_KIND: kind.value,
            subjects.H_SEQ: str(job.seq),
            subjects.H_WORKER: self.worker_id,
            subjects.H_ATTEMPT: str(job.attempt),
        }

    async def _frame(
        self, job: _InFlight, kind: FrameKind, body: bytes, usage: Usage | None = None
    ) -> None:
        now = time.monotonic()
        if job.fenced or (job.silence and now - job.last_sent > job.silence * _FENCE):
            job.fenced = True
            raise _Fenced
        job.last_sent = now
        job.start_due = 0.0  # any frame marks the start for the gateway
        headers = self._headers(job, kind)
        if usage is not None:  # the gateway counts tokens from it, without parsing bodies
            headers[subjects.H_USAGE] = f"{usage.prompt_tokens} {usage.completion_tokens or 0}"
        await self.nc.publish(job.reply, body, headers=headers)

    async def _send_error(self, job: _InFlight, err: NebulaError) -> None:
        if not job.reply or job.fenced:
            return
        headers = self._headers(job, FrameKind.ERROR)
        headers[subjects.H_STATUS] = str(err.status)
        with contextlib.suppress(Exception):
            await self.nc.publish(job.reply, err.to_json(), headers=headers)

    # --- background loops ----------------------------------------------------------

    async def _ticker(self) -> None:
        """Flush batched tokens older than batch_ms, keepalive silent jobs, expire lost pulls."""
        # A third of batch_ms: a held token waits at most about 1.3x batch_ms.
        period = max(self.settings.batch_ms / 3000, 0.002)
        keepalive = self.settings.keepalive_interval
        batch_s = self.settings.batch_ms / 1000
        # With no interactive job there is nothing to flush or keep alive: sleep until one
        # arrives or the next pull check (a ~200 Hz wakeup costs the engine CPU it needs),
        # but tick often enough that _on_msg's stall check never mistakes this for a freeze.
        idle_s = max(min(BATCH_PULL_EXPIRES, self.settings.ack_wait * 0.2), period)
        last_pull_check = time.monotonic()
        while True:
            self._last_tick = time.monotonic()
            if self._inflight:
                await asyncio.sleep(period)
            else:
                self._busy.clear()
                due = last_pull_check + BATCH_PULL_EXPIRES - self._last_tick
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(min(idle_s, due), period)):
                        await self._busy.wait()
            now = time.monotonic()
            for job in list(self._inflight.values()):
                try:
                    if job.buf_tokens and now - job.buf_since >= batch_s:
                        await self._flush(job)
                    elif job.start_due and now >= job.start_due:
                        await self._frame(job, FrameKind.START, b"")
                    elif now - job.last_sent >= keepalive:
                        await self._frame(job, FrameKind.KEEPALIVE, b"")
                except _Fenced:
                    if job.task is not None:
                        job.task.cancel()
                        self.jobs_fenced += 1
            if now - last_pull_check >= BATCH_PULL_EXPIRES:
                last_pull_check = now
                # A pull whose 408 we never saw (NATS restarted) owes nothing any more.
                while self._pulls and self._pulls[0][0] + 1.0 < now:
                    self._pulls.popleft()
                self.batch.expire(now)
                await self._refill()

    def _stalled(self) -> str:
        """Why the engine counts as hung: requests it holds (not held back by a slow
        reader) and no output from it for ``stall_timeout``. A health check cannot see
        this: a wedged engine still answers that its processes are alive."""
        limit = self.settings.stall_timeout
        if not limit or not any(not j.waiting_credit for j in self._inflight.values()):
            return ""
        quiet = time.monotonic() - self._last_progress
        if quiet < limit:
            return ""
        return (
            f"the engine produced no output for {quiet:.0f}s while holding "
            f"{len(self._inflight)} request(s)"
        )

    async def _health_loop(self) -> None:
        """A broken engine must not swallow the queue: while it fails, pull nothing.
        A hung one (see :meth:`_stalled`) ends the worker, for its supervisor to restart."""
        while True:
            natsio.raise_if_cancelled()
            await asyncio.sleep(
                min(self.settings.health_interval, self.settings.stall_timeout or 5)
            )
            stalled = self._stalled()
            if stalled and self.state is WorkerState.RUNNING:
                log.error("worker %s: %s; exiting to be restarted", self.worker_id, stalled)
                self.broken_reason = stalled
                self.broken.set()
                return
            reason = ""
            try:
                async with asyncio.timeout(self.settings.health_timeout):
                    ok = await self.engine.health()
                if not ok:
                    reason = "engine health check failed"
            except TimeoutError:
                ok = False
                reason = f"engine health check did not answer in {self.settings.health_timeout:g}s"
            except EngineDead as e:
                if self.state is WorkerState.RUNNING:
                    log.error("worker %s: %s; exiting to be restarted", self.worker_id, e)
                    self.broken_reason = str(e)
                    self.broken.set()
                return
            except Exception as e:
                ok = False
                reason = f"engine health check failed: {e!r}"
            if ok == self.healthy or self.state is not WorkerState.RUNNING:
                continue
            self.healthy, self.health_reason = ok, reason
            if ok:
                log.warning("worker %s: engine healthy again; taking jobs", self.worker_id)
                await self._resume_pulls()
            else:
                log.warning("worker %s: %s; taking no jobs until healthy", self.worker_id, reason)
                await self._drop_pulls()
            with contextlib.suppress(Exception):
                await self._heartbeat_once()

    def info(self) -> WorkerInfo:
        load = self.engine.load()
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.model,
            engine=self.engine.kind,
            owned_by=self.engine.owned_by,
            node_id=self.node_id,
            max_concurrency=self.settings.max_concurrency,
            inflight=len(self._inflight),
            started_at=self._started_at,
            ready=self.taking_work,
            draining=self.state is WorkerState.DRAINING,
            healthy=self.healthy,
            reason=self.health_reason,
            engine_running=load.running,
            engine_waiting=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            adapters=sorted(self._adapter_host.adapters) if self._adapter_host else [],
            jobs_started=self.jobs_started,
            jobs_completed=self.jobs_completed,
            jobs_failed=self.jobs_failed,
            jobs_cancelled=self.jobs_cancelled,
            jobs_redelivered=self.jobs_redelivered,
            jobs_dead_lettered=self.jobs_dead_lettered,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )

    async def _heartbeat_once(self) -> None:
        if self._kv is not None:
            await self._kv.put(
                subjects.worker_key(self.model, self.worker_id), msgspec.json.encode(self.info())
            )

    async def _heartbeat_loop(self) -> None:
        while True:
            natsio.raise_if_cancelled()
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self._heartbeat_once()
            except Exception as e:  # NATS down: keep serving what we have, beat again later
                log.debug("heartbeat failed: %s", e)

    async def on_reconnect(self) -> None:
        """Pull requests die with the connection: forget them and ask again."""
        self._pulls.clear()
        self.batch.on_reconnect()
        # Pull first: on a cluster the queue survived (file storage, replicated) and the
        # repair below may wait out a leader election; a pull answered 503 repairs too.
        await self._refill()
        self._last_repair = 0.0
        self._repair_soon()
        if self._adapter_host is not None:  # spec writes missed while disconnected
            with contextlib.suppress(Exception):
                await self._read_spec()
