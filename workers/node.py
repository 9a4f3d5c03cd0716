"""The node agent: one per machine; runs the engine workers the scheduler placed here.

It heartbeats a :class:`~nebula.protocol.NodeInfo` (GPUs, CPUs, memory, labels,
worker count) to the nodes bucket, watches the placements bucket for placements
whose ``node_id`` is its own, and runs ONE ``nebula worker`` child process per
placement. Each placement has a supervisor that drives reality toward the
placement, level-triggered (it looks at the latest placement, not at events):

- ``Starting``/``Ready``: a worker runs. ``Ready`` (with ``worker_id``) is written
  once the worker's heartbeat appears in the workers bucket, which it sends only
  after its engine passed its start-up health check. A crashed worker is
  restarted with exponential backoff (``Starting`` with the crash as reason);
  after ``max_crashes`` crashes in a row the placement is ``Failed`` with the last
  lines of the worker's log, and nothing restarts it.
- ``Unloading``: SIGTERM (the worker drains in-flight requests), wait (bounded),
  then delete the placement key, which frees the replica slot for the scheduler.
- ``Failed``/``Pending``, deleted, or moved to another node: no worker.

Every write is ``update(last=revision)``: on conflict the supervisor re-reads the
key and decides again, so it never clobbers the scheduler. After a NATS
reconnect the watcher is re-created and the view rebuilt from KV; workers keep
running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import signal
import socket
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue
from prometheus_client import CollectorRegistry

from nebula import natsio, procs, subjects
from nebula.errors import Unavailable
from nebula.metrics import NatsCollector
from nebula.protocol import GpuInfo, ModelSpec, NodeInfo, Placement, PlacementState, WorkerInfo
from nebula.service import Service, cancel_and_wait
from nebula.settings import NatsSettings, NodeSettings, default_data_dir
from workers import gpu
from workers.engines import ENGINES
from workers.metrics import NodeCollector, NodeView

log = logging.getLogger(__name__)

# JetStream error codes for a failed expected-last-sequence check.
_WRONG_LAST = (10071, 10164)
_RUNNING = (PlacementState.STARTING, PlacementState.READY)
_TAIL_LINES = 12
_TAIL_CHARS = 2000


class AgentState(enum.StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(eq=False)
class WorkerHandle:
    """One running ``nebula worker`` process (what :attr:`NodeAgent.workers` lists)."""

    key: str  # placement key
    model: str
    replica: int
    worker_id: str
    process: asyncio.subprocess.Process
    log_file: Path
    gpu_ids: list[int]
    started_at: float  # monotonic
    ready: bool = False
    exited: asyncio.Task[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The worker's whole process group goes with it (vLLM's engine-core children).
        self.exited = asyncio.ensure_future(procs.wait_group(self.process))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None


@dataclass
class AgentStats:
    spawns: int = 0  # worker processes started
    crashes: int = 0  # worker processes that exited on their own
    failed: int = 0  # placements marked Failed
    unloaded: int = 0  # placements drained and deleted
    conflicts: int = 0  # placement writes refused because someone wrote first
    resyncs: int = 0  # placement watchers (re)created


def _is_delete(op: str | None) -> bool:
    return op in (KV_DEL, KV_PURGE)


def _is_wrong_last(e: Exception) -> bool:
    return isinstance(e, KeyWrongLastSequenceError) or (
        isinstance(e, APIError) and e.err_code in _WRONG_LAST
    )


def safe_token(text: str, limit: int = 24) -> str:
    """Letters, digits and ``-`` only (worker ids end up in subjects and file names)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].strip("-") or "x"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def log_tail(path: Path, offset: int = 0) -> str:
    """The last lines a worker wrote since ``offset`` (its start), for a Failed reason."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    lines = [ln.rstrip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    text = "\n".join(lines[-_TAIL_LINES:])
    return text[-_TAIL_CHARS:]


async def _first(*aws: Awaitable[object], timeout: float | None = None) -> None:
    """Until any of ``aws`` is done (or ``timeout``). Coroutines passed in are cancelled
    afterwards; futures and tasks passed in are left as they are."""
    futs = [asyncio.ensure_future(a) for a in aws]
    created = [f for f, a in zip(futs, aws, strict=True) if f is not a]
    try:
        await asyncio.wait(futs, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in created:
            f.cancel()


class _Replica:
    """Supervises one placement key on this node: its worker process and its state."""

    def __init__(self, agent: NodeAgent, key: str) -> None:
        self.agent = agent
        self.key = key
        self.model, self.replica = subjects.placement_key_parts(key)
        self.placement: Placement | None = None  # latest seen; None: gone or not ours
        self.rev = 0
        self.changed = asyncio.Event()
        self.handle: WorkerHandle | None = None
        self._ready = asyncio.Event()
        self._sub: Subscription | None = None
        self.info: WorkerInfo | None = None
        self._log_offset = 0
        self._spawning: asyncio.Task[asyncio.subprocess.Process] | None = None
        self.crashes = 0  # in a row
        self.restart_at = 0.0
        self.note = ""  # reason shown while (re)starting
        self.failed_reason: str | None = None
        self.failed_rev = 0
        self.task: asyncio.Task[None] | None = None

    # --- input -------------------------------------------------------------------

    def observe(self, p: Placement | None, rev: int, *, force: bool = False) -> None:
        """A newer version of the key (``None``: deleted, or assigned elsewhere)."""
        if not force and rev and rev <= self.rev:
            return  # what we wrote ourselves, or older
        if rev:
            self.rev = rev
        if (
            p is not None
            and p.state is PlacementState.STARTING
            and self.failed_reason is not None
            and 0 < self.failed_rev < rev
        ):
            # Someone asked for another try after our Failed landed: start afresh.
            self.failed_reason = None
            self.crashes = 0
            self.note = ""
            self.restart_at = 0.0
        self.placement = p
        self.changed.set()

    # --- the loop ------------------------------------------------------------------

    async def supervise(self) -> None:
        """:meth:`run`, restarted should it ever fail (a bug must not orphan a worker)."""
        while True:
            try:
                await self.run()
                return
            except Exception:
                log.exception("node %s: supervisor of %s failed", self.agent.node_id, self.key)
                natsio.raise_if_cancelled()
                await asyncio.sleep(1.0)

    async def run(self) -> None:
        settings = self.agent.settings
        while True:
            self.changed.clear()
            p = self.placement
            if p is None or p.state not in _RUNNING:
                await self.stop_worker()
                if p is None:
                    if self.agent._drop(self):
                        return
                    continue
                if p.state is PlacementState.UNLOADING:
                    await self._finish_unload()
                else:  # Failed or Pending: nothing runs until the placement changes
                    await self.changed.wait()
                continue
            if self.failed_reason is not None:
                await self.stop_worker(drain=False)
                want = msgspec.structs.replace(
                    p,
                    state=PlacementState.FAILED,
                    reason=self.failed_reason,
                    worker_id=None,
                    updated_at=time.time(),
                )
                rev = await self._write(want)
                if rev:
                    self.failed_rev = rev
                    self.agent.stats.failed += 1
                    log.warning(
                        "node %s: %s failed: %s", self.agent.node_id, self.key, self.failed_reason
                    )
                elif rev is None:
                    await _first(self.changed.wait(), timeout=0.5)
                continue
            if self.handle is None:
                wait = self.restart_at - time.monotonic()
                if wait > 0:
                    await self._sync(p)
                    await _first(self.changed.wait(), timeout=wait)
                    continue
                if not await self._spawn(p):
                    continue
            await self._sync(p)
            await self._watch_worker(settings.ready_timeout)

    async def _sync(self, p: Placement) -> None:
        """Write what the placement should say about the worker, if it does not yet."""
        h = self.handle
        if h is None:
            state, worker_id, reason = PlacementState.STARTING, None, self.note
        elif h.ready:
            state, worker_id, reason = PlacementState.READY, h.worker_id, ""
        else:
            state, worker_id, reason = PlacementState.STARTING, h.worker_id, self.note
        if (p.state, p.worker_id, p.reason) == (state, worker_id, reason):
            return
        want = msgspec.structs.replace(
            p, state=state, worker_id=worker_id, reason=reason, updated_at=time.time()
        )
        if await self._write(want) is None:
            self._retry_soon()

    def _retry_soon(self) -> None:
        """A write failed (NATS down): look again shortly."""
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, self.changed.set)

    async def _watch_worker(self, ready_timeout: float) -> None:
        """Until the placement changes, the worker exits, or it reports ready (or not in time)."""
        h = self.handle
        assert h is not None
        timeout: float | None = None
        waits: list[Awaitable[object]] = [self.changed.wait()]
        if not h.ready:
            timeout = max(0.0, h.started_at + ready_timeout - time.monotonic())
            waits.append(self._ready.wait())
        await _first(h.exited, *waits, timeout=timeout)
        if h.exited.done():
            await self._on_exit(h)
        elif h.ready:
            return
        elif self._ready.is_set():
            h.ready = True
            log.info(
                "node %s: worker %s for %s is ready after %.1fs",
                self.agent.node_id,
                h.worker_id,
                self.key,
                time.monotonic() - h.started_at,
            )
        elif time.monotonic() - h.started_at >= ready_timeout:
            log.warning("node %s: worker %s never became ready", self.agent.node_id, h.worker_id)
            await procs.stop(h.process, timeout=5.0)
            await self._on_exit(h, why=f"did not report ready within {ready_timeout:g}s")

    # --- worker processes ----------------------------------------------------------

    async def _spawn(self, p: Placement) -> bool:
        agent = self.agent
        spec = await agent._model_spec(self.model)
        if spec is None:
            # Model unloaded (the scheduler will say Unloading) or NATS down: look again.
            await _first(self.changed.wait(), timeout=1.0)
            return False
        # vllm only where it is installed, here or in the interpreter given for it
        kinds = [
            k for k in ENGINES if k.available() or (k.name == "vllm" and agent.settings.vllm_python)
        ]
        kind = next((k for k in kinds if k.name == spec.engine), None)
        if kind is None:
            self.failed_reason = (
                f"engine {spec.engine!r} is not supported by node agent {agent.node_id} "
                f"(available: {', '.join(k.name for k in kinds)})"
            )
            return False
        worker_id = (
            f"{safe_token(agent.node_id)}-{safe_token(self.model)}-{self.replica}-"
            + (uuid.uuid4().hex[:6])
        )
        # --flag=value throughout: a value starting with '-' is still a value.
        argv = procs.nebula_argv(
            "-v",
            "worker",
            f"--model={self.model}",
            f"--engine={spec.engine}",
            f"--worker-id={worker_id}",
            f"--node-id={agent.node_id}",
            f"--nats-url={agent.nats_settings.url}",
            python=agent.settings.vllm_python if spec.engine == "vllm" else None,
        )
        if spec.max_concurrency > 0:  # 0: the engine's own slot count
            argv.append(f"--max-concurrency={spec.max_concurrency}")
        if spec.model_path:
            argv.append(f"--model-path={spec.model_path}")
        if spec.gpu_memory > 0:
            argv.append(f"--gpu-memory={p.memory_fraction or spec.gpu_memory:g}")
        # The spec's limits reach the worker as its settings' environment variables.
        env = {"PYTHONUNBUFFERED": "1", "NEBULA_MAX_OUTPUT_TOKENS": str(spec.max_output_tokens)}
        for name, value in sorted(spec.engine_options.items()):
            opt = kind.option(name)
            if opt is None:
                log.warning("node %s: ignoring unknown engine option %r", agent.node_id, name)
            elif opt.env:
                env[opt.env] = value
            elif value != "":
                argv.append(f"{opt.flag}={value}")
        argv += [f"--lora={name}={path}" for name, path in sorted(spec.adapters.items())]
        if spec.engine_args:
            argv += ["--", *spec.engine_args]
        if p.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in p.gpu_ids)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the same indexes NVML reported
        log_file = agent.log_dir / f"{subjects.model_token(self.model)}.{self.replica}.log"
        ready = asyncio.Event()

        async def on_heartbeat(msg: Msg) -> None:
            if msg.headers and _is_delete(msg.headers.get(KV_OP)):
                return
            try:
                info = msgspec.json.decode(msg.data, type=WorkerInfo)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            if self.handle is not None and self.handle.worker_id == info.worker_id:
                self.info = info  # the latest heartbeat: what the node's /metrics reports
            if info.ready and not info.draining:
                ready.set()
            elif not info.ready and info.phase and info.phase != self.note:
                self.note = info.phase  # what the engine is doing while it starts
                self.changed.set()

        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "ab") as f:
                f.write(
                    f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} node {agent.node_id}: "
                    f"starting worker {worker_id} for {self.key}\n".encode()
                )
                offset = f.tell()
            # Subscribe before the worker exists so its first heartbeat cannot be missed.
            self._sub = await agent.nc.subscribe(
                subjects.kv_subject(
                    subjects.WORKERS_BUCKET, subjects.worker_key(self.model, worker_id)
                ),
                cb=on_heartbeat,
            )
            # Shielded: a close() arriving mid-spawn still finds (and stops) the process.
            spawning = asyncio.ensure_future(procs.spawn(argv, env=env, log_file=log_file))
            self._spawning = spawning
            process = await asyncio.shield(spawning)
            self._spawning = None
        except (OSError, NatsError) as e:
            self._spawning = None
            await self._release(None)
            log.warning("node %s: cannot start a worker for %s: %s", agent.node_id, self.key, e)
            self.note = f"cannot start worker: {e}"
            self.restart_at = time.monotonic() + agent.settings.backoff_initial
            return False
        agent.stats.spawns += 1
        self._ready, self._log_offset = ready, offset
        self.handle = WorkerHandle(
            key=self.key,
            model=self.model,
            replica=self.replica,
            worker_id=worker_id,
            process=process,
            log_file=log_file,
            gpu_ids=list(p.gpu_ids),
            started_at=time.monotonic(),
        )
        log.info(
            "node %s: started worker %s (pid %d) for %s",
            agent.node_id,
            worker_id,
            process.pid,
            self.key,
        )
        return True

    async def _on_exit(self, h: WorkerHandle, *, why: str | None = None) -> None:
        """The worker went away on its own: restart it later, or give up."""
        settings = self.agent.settings
        await self._release(h)
        code = h.process.returncode
        lived = time.monotonic() - h.started_at
        self.agent.stats.crashes += 1
        if lived >= settings.stable_after:
            self.crashes = 0
        self.crashes += 1
        what = why or describe_exit(code)
        tail = log_tail(h.log_file, self._log_offset)
        last = tail.splitlines()[-1] if tail else ""
        log.warning(
            "node %s: worker %s for %s %s after %.1fs (crash %d of %d)%s",
            self.agent.node_id,
            h.worker_id,
            self.key,
            what,
            lived,
            self.crashes,
            settings.max_crashes,
            f": {last}" if last else "",
        )
        if self.crashes >= settings.max_crashes:
            self.failed_reason = (
                f"worker {what} ({self.crashes} crashes in a row); last output:\n{tail or '(none)'}"
            )
            return
        delay = min(settings.backoff_initial * 2 ** (self.crashes - 1), settings.backoff_max)
        self.restart_at = time.monotonic() + delay
        self.note = (
            f"worker {what}; restart {self.crashes} of {settings.max_crashes - 1} "
            f"in {delay:g}s" + (f": {last}" if last else "")
        )[:_TAIL_CHARS]

    async def _release(self, h: WorkerHandle | None) -> None:
        """Forget ``h`` and drop the subscription to its heartbeat."""
        if h is not None and self.handle is h:
            self.handle = None
        if self.info is not None:  # keep its counters: node totals stay monotonic
            self.agent.metrics_view.retire(self.info)
            self.info = None
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def stop_worker(self, *, drain: bool = True) -> None:
        """SIGTERM (the worker drains), bounded wait, SIGKILL. Not a crash."""
        spawning, self._spawning = self._spawning, None
        if spawning is not None:
            with contextlib.suppress(Exception):
                await procs.stop(await spawning, timeout=5.0)
        h = self.handle
        if h is None:
            await self._release(None)
            return
        timeout = self.agent.settings.stop_timeout if drain else 5.0
        code = await procs.stop(h.process, timeout=timeout)
        await self._release(h)
        self.note = ""
        self.crashes = 0
        self.restart_at = 0.0
        log.info(
            "node %s: stopped worker %s for %s (%s)",
            self.agent.node_id,
            h.worker_id,
            self.key,
            describe_exit(code),
        )

    # --- KV writes -----------------------------------------------------------------

    async def _write(self, want: Placement) -> int | None:
        """``update(last=rev)``: the new revision, 0 on conflict (re-read), None on error."""
        kv = self.agent._placements_kv
        assert kv is not None
        try:
            rev = await kv.update(self.key, msgspec.json.encode(want), last=self.rev)
        except (KeyWrongLastSequenceError, APIError) as e:
            if not _is_wrong_last(e):
                log.warning("node %s: writing %s failed: %s", self.agent.node_id, self.key, e)
                return None
            self.agent.stats.conflicts += 1
            await self._refresh()
            return 0
        except (TimeoutError, NatsError) as e:
            log.debug("node %s: writing %s failed: %s", self.agent.node_id, self.key, e)
            return None
        if rev >= self.rev:
            self.rev = rev
            self.placement = want
        return rev

    async def _refresh(self) -> None:
        """Re-read the key after a conflict: whatever it says now is what we act on."""
        kv = self.agent._placements_kv
        assert kv is not None
        try:
            entry = await kv.get(self.key)
        except KeyNotFoundError as e:
            rev = (e.entry.revision or 0) if e.entry is not None else 0
            self.observe(None, rev, force=True)
            return
        except (TimeoutError, NatsError):
            self._retry_soon()
            return
        self.observe(self.agent._mine(entry.value), entry.revision or 0, force=True)

    async def _finish_unload(self) -> None:
        """The worker is stopped: delete the key (only the revision we saw)."""
        kv = self.agent._placements_kv
        assert kv is not None
        try:
            await kv.delete(self.key, last=self.rev)
        except (KeyWrongLastSequenceError, APIError) as e:
            if _is_wrong_last(e):
                self.agent.stats.conflicts += 1
                await self._refresh()
            else:
                await _first(self.changed.wait(), timeout=0.5)
            return
        except (TimeoutError, NatsError):
            await _first(self.changed.wait(), timeout=0.5)
            return
        self.agent.stats.unloaded += 1
        log.info("node %s: unloaded %s", self.agent.node_id, self.key)
        self.placement = None

    async def shutdown(self) -> None:
        """Agent closing: stop the loop, then the worker (draining)."""
        if self.task is not None:
            await cancel_and_wait([self.task])
        await self.stop_worker()


class NodeAgent(Service):
    """``async with NodeAgent(NodeSettings(...), nats_settings) as agent: ...``.

    Pass ``nc`` to share a connected client (the agent then never closes it, and
    the owner should call :meth:`on_reconnect` from its reconnect hooks; the agent
    also notices reconnects by itself within half a second). Without ``nc`` the
    agent connects, and closes the connection when it closes.
    """

    def __init__(
        self,
        settings: NodeSettings | None = None,
        nats_settings: NatsSettings | None = None,
        *,
        nc: Client | None = None,
        inventory: gpu.GpuInventory | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings or NodeSettings()
        self.nats_settings = nats_settings or NatsSettings()
        self.node_id = self.settings.node_id or socket.gethostname()
        self.hostname = socket.gethostname()
        self.log_dir = self.settings.log_dir or (
            default_data_dir() / "logs" / safe_token(self.node_id, 64)
        )
        self.stats = AgentStats()
        self._nc = nc
        self._own_nc = nc is None
        self._inventory = inventory
        self._hooks = natsio.ReconnectHooks()
        self._state = AgentState.NEW
        self._replicas: dict[str, _Replica] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._resync = asyncio.Event()
        self._closed = asyncio.Event()
        self._placements_kv: KeyValue | None = None
        self._nodes_kv: KeyValue | None = None
        self._models_kv: KeyValue | None = None
        self._node_key = subjects.node_key(self.node_id)
        self._started_at = time.time()
        self._last_info: NodeInfo | None = None
        self.registry = registry or CollectorRegistry()
        self.metrics_view = NodeView(
            self.node_id,
            lambda: self._last_info,
            lambda: [r.info for r in self._replicas.values() if r.info is not None],
            crashes=lambda: self.stats.crashes,
        )
        self.registry.register(NodeCollector(self.metrics_view))
        self.registry.register(NatsCollector("node", lambda: self._nc))

    # --- public view -------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "agent not started"
        return self._nc

    @property
    def workers(self) -> dict[str, WorkerHandle]:
        """Placement key -> its running worker process."""
        return {k: r.handle for k, r in self._replicas.items() if r.handle is not None}

    @property
    def placements(self) -> dict[str, Placement]:
        """Placement key -> the latest placement seen for this node."""
        return {k: r.placement for k, r in self._replicas.items() if r.placement is not None}

    def node_info(self) -> NodeInfo:
        gpus = self._inventory.read() if self._inventory is not None else []
        if self._inventory is not None and self._inventory.simulated:
            gpus = self._simulated_free(gpus)
        total, free = gpu.memory()
        return NodeInfo(
            node_id=self.node_id,
            hostname=self.hostname,
            gpus=gpus,
            cpu_count=gpu.cpu_count(),
            memory_total=total,
            memory_free=free,
            labels=dict(self.settings.labels),
            workers=sum(1 for h in self.workers.values() if h.running),
            heartbeat_at=time.time(),
        )

    def _simulated_free(self, gpus: list[GpuInfo]) -> list[GpuInfo]:
        """Simulated GPUs have no driver to ask: free memory is what placements leave."""
        used: dict[int, float] = {}
        for r in self._replicas.values():
            p = r.placement
            if p is not None and r.handle is not None:
                for idx in p.gpu_ids:
                    used[idx] = used.get(idx, 0.0) + p.memory_fraction
        return [
            msgspec.structs.replace(
                g, memory_free=max(0, int(g.memory_total * (1.0 - used.get(g.index, 0.0))))
            )
            for g in gpus
        ]

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._state is not AgentState.NEW:
            return
        if self._inventory is None:
            self._inventory = gpu.GpuInventory(self.settings.simulated_gpus)
        if self._nc is None:
            self._hooks.add(self.on_reconnect)
            self._nc = await natsio.connect(
                self.nats_settings, name=f"nebula-node-{self.node_id}", on_reconnect=self._hooks
            )
        js = self.nc.jetstream()
        s = self.nats_settings
        try:
            self._placements_kv = await natsio.ensure_bucket(js, s, subjects.PLACEMENTS_BUCKET)
            self._nodes_kv = await natsio.ensure_bucket(
                js, s, subjects.NODES_BUCKET, ttl=natsio.NODE_TTL
            )
            self._models_kv = await natsio.ensure_bucket(js, s, subjects.MODELS_BUCKET)
            await natsio.workers_bucket(js, s)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            await self._heartbeat_once()
        except (TimeoutError, NatsError) as e:
            await self._close_connection()
            raise Unavailable(f"node agent cannot set up its KV buckets: {e}") from e
        except BaseException:
            await self._close_connection()
            raise
        self._state = AgentState.RUNNING
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"node-{self.node_id}-heartbeat"),
            asyncio.create_task(self._watch_loop(), name=f"node-{self.node_id}-watch"),
        ]
        assert self._inventory is not None
        log.warning(
            "node %s: up (%d GPUs from %s, %d CPUs), logs in %s",
            self.node_id,
            len(self._inventory.read()),
            self._inventory.source,
            gpu.cpu_count(),
            self.log_dir,
        )

    async def run(self) -> None:
        """Serve until :meth:`close`."""
        await self.start()
        await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def on_reconnect(self) -> None:
        """Watchers may have missed updates while NATS was away: rebuild the view."""
        self._resync.set()

    async def close(self) -> None:
        """Stop watching, stop every worker (each drains, bounded), delete the heartbeat.

        Placements stay assigned here (a restarted agent picks them up again; the
        scheduler moves them after its grace period if it does not come back), but
        say ``Starting`` so nobody counts them as ready. Safe to call twice.
        """
        if self._state is AgentState.CLOSED:
            return
        if self._state is AgentState.CLOSING:
            await self._closed.wait()
            return
        started = self._state is AgentState.RUNNING
        self._state = AgentState.CLOSING
        try:
            await cancel_and_wait(self._tasks)
            replicas = list(self._replicas.values())
            stopping = [asyncio.ensure_future(r.shutdown()) for r in replicas]
            if started and self._nc is not None and self.nc.is_connected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(3.0):
                        await self._say_stopped(replicas)
                        assert self._nodes_kv is not None
                        with contextlib.suppress(NatsError):
                            await self._nodes_kv.delete(self._node_key)
            if stopping:
                await asyncio.gather(*stopping, return_exceptions=True)
            self._replicas.clear()
        finally:
            if self._inventory is not None:
                self._inventory.close()
            await self._close_connection()
            self._state = AgentState.CLOSED
            self._closed.set()

    async def _say_stopped(self, replicas: list[_Replica]) -> None:
        kv = self._placements_kv
        assert kv is not None

        async def one(r: _Replica) -> None:
            p = r.placement
            if (
                p is None
                or p.state not in _RUNNING
                or (p.state, p.worker_id)
                == (
                    PlacementState.STARTING,
                    None,
                )
            ):
                return
            q = msgspec.structs.replace(
                p,
                state=PlacementState.STARTING,
                worker_id=None,
                reason=f"node agent {self.node_id} stopped",
                updated_at=time.time(),
            )
            with contextlib.suppress(TimeoutError, NatsError, KeyWrongLastSequenceError):
                await kv.update(r.key, msgspec.json.encode(q), last=r.rev)

        await asyncio.gather(*(one(r) for r in replicas), return_exceptions=True)

    async def _close_connection(self) -> None:
        if self._own_nc and self._nc is not None:
            self._hooks.remove(self.on_reconnect)
            await natsio.close_connection(self._nc)

    # --- heartbeat -----------------------------------------------------------------

    async def _heartbeat_once(self) -> None:
        assert self._nodes_kv is not None
        info = self._last_info = self.node_info()
        await self._nodes_kv.put(self._node_key, msgspec.json.encode(info))

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            natsio.raise_if_cancelled()
            await asyncio.sleep(interval)
            try:
                await self._heartbeat_once()
            except (TimeoutError, NatsError) as e:  # NATS away: workers keep serving
                log.debug("node %s: heartbeat failed: %s", self.node_id, e)
            except Exception:  # never let one bad beat stop the heartbeat
                log.exception("node %s: heartbeat failed", self.node_id)

    # --- placements ----------------------------------------------------------------

    def _mine(self, value: bytes | None) -> Placement | None:
        if not value:
            return None
        try:
            p = msgspec.json.decode(value, type=Placement)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("node %s: ignoring a bad placement: %s", self.node_id, e)
            return None
        return p if p.node_id == self.node_id else None

    def _on_entry(self, entry: KeyValue.Entry, *, force: bool = False) -> str | None:
        """Route one placements-bucket entry; returns the key if it is ours and live."""
        try:
            subjects.placement_key_parts(entry.key)
        except ValueError:
            return None
        p = None if _is_delete(entry.operation) else self._mine(entry.value)
        r = self._replicas.get(entry.key)
        if p is None:
            if r is not None:
                r.observe(None, entry.revision or 0, force=force)
            return None
        if r is None:
            r = self._replicas[entry.key] = _Replica(self, entry.key)
            r.observe(p, entry.revision or 0, force=True)
            r.task = asyncio.create_task(r.supervise(), name=f"node-{self.node_id}-{entry.key}")
        else:
            r.observe(p, entry.revision or 0, force=force)
        return entry.key

    async def _confirm_gone(self, key: str) -> None:
        """A replica of ours missing from a fresh watch's snapshot: stop it only once a
        read of its key says it is gone. nats-py can mark a snapshot complete before the
        entries already delivered to it arrive (it compares the consumer's pending count
        with what it has received), and believing that stopped healthy workers."""
        assert self._placements_kv is not None
        r = self._replicas.get(key)
        if r is None:
            return
        try:
            entry = await self._placements_kv.get(key)
        except NotFoundError:  # deleted or never there (KeyDeletedError is one too)
            r.observe(None, 0, force=True)
            return
        except (TimeoutError, NatsError) as e:
            log.debug("node %s: reading placement %s failed: %s", self.node_id, key, e)
            return  # keep what runs; the next rebuild looks again
        self._on_entry(entry, force=True)

    def _drop(self, r: _Replica) -> bool:
        """Forget a replica whose key is gone (called from its own task, no await between)."""
        if r.placement is not None or r.handle is not None:
            return False
        if self._replicas.get(r.key) is r:
            del self._replicas[r.key]
        return True

    async def _model_spec(self, model: str) -> ModelSpec | None:
        assert self._models_kv is not None
        try:
            entry = await self._models_kv.get(subjects.model_key(model))
        except KeyNotFoundError:
            return None
        except (TimeoutError, NatsError) as e:
            log.debug("node %s: reading model %r failed: %s", self.node_id, model, e)
            return None
        try:
            return msgspec.json.decode(entry.value or b"", type=ModelSpec)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("node %s: bad spec for model %r: %s", self.node_id, model, e)
            return None

    async def _watch_loop(self) -> None:
        backoff = 0.2
        while True:
            natsio.raise_if_cancelled()
            try:
                await self._watch_session()
                backoff = 0.2
            except (TimeoutError, NatsError) as e:
                log.info("node %s: placement watch lost (%s), retrying", self.node_id, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("node %s: placement watch failed, retrying", self.node_id)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _watch_session(self) -> None:
        """Watch every placement; the initial snapshot rebuilds the view from scratch."""
        assert self._placements_kv is not None
        self._resync.clear()
        reconnects = self.nc.stats["reconnects"]
        kv = self._placements_kv
        watcher = await kv.watchall()
        self.stats.resyncs += 1

        async def consume() -> None:
            seen: set[str] = set()
            synced = False
            async for entry in natsio.entries(kv, watcher):
                if entry is None:
                    if not synced:
                        synced = True
                        for key in [k for k in self._replicas if k not in seen]:
                            await self._confirm_gone(key)
                    continue
                mine = self._on_entry(entry, force=not synced)
                if mine is not None and not synced:
                    seen.add(mine)

        async def reconnected() -> None:
            while self.nc.stats["reconnects"] == reconnects:
                await asyncio.sleep(0.5)

        tasks = [
            asyncio.ensure_future(consume()),
            asyncio.ensure_future(self._resync.wait()),
            asyncio.ensure_future(reconnected()),
            # A watch whose consumer died with a NATS server delivers nothing, silently.
            asyncio.ensure_future(natsio.watch_lost(watcher)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0].done():
                tasks[0].result()
            log.info("node %s: rebuilding the placement view", self.node_id)
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await watcher.stop()
