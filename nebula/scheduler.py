"""The scheduler: reconciles desired models x replicas against live nodes.

Several may run; one leads through a lease in the leader bucket (its TTL is the
lease TTL). The leader ``create``\\s the key, then refreshes it with
``update(last=revision)`` every third of the TTL, and steps down when it could
not for 0.6 TTL. A standby polls the key: it ``create``\\s it when it is gone
(expired, or deleted by a leader's clean close, which it also sees live) and
takes it with ``update(last=<revision it saw>)`` when no refresh came for 0.7
TTL. So failover takes less than the lease TTL, and never two lead at once.

The leader watches models, nodes and placements, keeps the whole view in memory,
rebuilds it from KV whenever it becomes leader or NATS reconnects, and after each
burst of changes (debounced) runs :func:`nebula.placement.plan` and writes only
what changed. Writes are optimistic (``update`` with the revision it saw), so a
node agent's state changes are never clobbered: on conflict the scheduler
re-reads the key and plans again.

A node is down when its heartbeat is older than ``node_ttl`` (by local receive
time, so clocks need not agree) or its key was deleted. Its replicas stay put for
``node_grace`` longer and only then move, so a short blip reshuffles nothing.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nebula import natsio, subjects
from nebula.errors import Unavailable
from nebula.metrics import NatsCollector
from nebula.placement import PlacementKey, check_strategy, plan
from nebula.protocol import ModelSpec, NodeInfo, Placement, PlacementState
from nebula.service import Service, cancel_and_wait
from nebula.settings import NatsSettings, SchedulerSettings

log = logging.getLogger(__name__)

# Fractions of the lease TTL: the leader steps down when it could not refresh for
# _STEP_DOWN; a standby takes over a lease not refreshed for _TAKEOVER.
_STEP_DOWN = 0.6
_TAKEOVER = 0.7

# JetStream error codes for a failed expected-last-sequence check.
_WRONG_LAST = (10071, 10164)


class SchedulerState(enum.StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class SchedulerStats:
    elections: int = 0  # times this instance became leader
    resyncs: int = 0  # view rebuilt from KV (leadership, reconnect, watcher loss)
    passes: int = 0  # reconcile passes
    writes: int = 0  # placements put
    deletes: int = 0  # placements deleted
    conflicts: int = 0  # writes refused because someone else wrote first
    errors: int = 0  # writes that failed otherwise (NATS down)
    last_plan_s: float = 0.0


class _Resync(Exception):
    """The view may have missed updates (reconnect, watcher gone): rebuild it."""


class _NodeView:
    __slots__ = ("deleted", "down_since", "info", "last_seen")

    def __init__(self, info: NodeInfo | None, last_seen: float, down_since: float | None) -> None:
        self.info = info
        self.last_seen = last_seen
        self.deleted = False
        self.down_since = down_since  # set when deleted or never heard of


def _shape(info: NodeInfo | None) -> object:
    """What placement looks at: heartbeats that change only load trigger no pass."""
    if info is None:
        return None
    return (tuple(sorted(g.index for g in info.gpus)), tuple(sorted(info.labels.items())))


def _is_delete(op: str | None) -> bool:
    return op in (KV_DEL, KV_PURGE)


def _default_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _SchedulerCollector(Collector):
    """Leadership, and (on the leader, whose view is complete) placements by state."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler

    def collect(self) -> Iterable[Metric]:
        leader = GaugeMetricFamily(
            "nebula_scheduler_leader", "1 while this scheduler holds the leader lease."
        )
        leader.add_metric([], 1.0 if self.s.is_leader else 0.0)
        placements = GaugeMetricFamily(
            "nebula_placements",
            "Replica placements by state, as the leading scheduler sees them.",
            labels=["state"],
        )
        if self.s.is_leader:
            counts = dict.fromkeys(PlacementState, 0)
            for p in list(self.s._placements.values()):
                counts[p.state] += 1
            for state, n in counts.items():
                placements.add_metric([state.value], n)
        return [leader, placements]


class Scheduler(Service):
    """``async with Scheduler(nc, settings) as s: await s.run()``.

    ``nc`` is a connected client (reconnecting by itself, see
    :func:`nebula.natsio.connect`); the scheduler never closes it.
    """

    def __init__(
        self,
        nc: Client,
        settings: SchedulerSettings | None = None,
        *,
        nats_settings: NatsSettings | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings or SchedulerSettings()
        check_strategy(self.settings.strategy)
        self.nc = nc
        self.nats_settings = nats_settings or NatsSettings()
        self.scheduler_id = self.settings.scheduler_id or _default_id()
        self.stats = SchedulerStats()
        self._state = SchedulerState.NEW
        self._leader = False
        self._leader_id: str | None = None  # last holder seen on the leader key
        self._lease_rev = 0
        self._seen_rev, self._seen_at = 0, 0.0  # standby: lease revision and when first seen
        self._lease_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lease_sub: Subscription | None = None
        self._closed = asyncio.Event()
        self._ttl = self.settings.lease_ttl
        self._lease_js = nc.jetstream(timeout=max(self._ttl / 3, 0.2))
        self._js = nc.jetstream()
        self._probe_js = nc.jetstream(timeout=1.0)
        self._visible_at = 0.0  # when the nodes bucket last answered a probe
        self._nodes_seq = 0  # newest nodes-bucket stream sequence the watch delivered
        # (_nodes_seq, when) as a probe first found the watch behind the stream
        self._lagging: tuple[int, float] = (-1, 0.0)
        self._lease_kv: KeyValue | None = None
        self._models_kv: KeyValue | None = None
        self._nodes_kv: KeyValue | None = None
        self._placements_kv: KeyValue | None = None
        # The view (leader only), rebuilt from KV on every session.
        self._models: dict[str, ModelSpec] = {}
        self._nodes: dict[str, _NodeView] = {}
        self._placements: dict[PlacementKey, Placement] = {}
        self._revs: dict[PlacementKey, int] = {}  # last revision seen per key, tombstones too
        self._synced: set[str] = set()
        self._dirty = asyncio.Event()
        self._idle = asyncio.Event()
        self._leading = asyncio.Event()
        self._node_sig: object = None
        self.registry = registry or CollectorRegistry()
        self.reconcile_seconds = Histogram(
            "nebula_scheduler_reconcile_duration_seconds",
            "One reconcile pass of the leading scheduler (placement writes included).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.registry.register(_SchedulerCollector(self))
        self.registry.register(NatsCollector("scheduler", lambda: self.nc))

    # --- lifecycle ---------------------------------------------------------------

    @property
    def state(self) -> SchedulerState:
        return self._state

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def leader_id(self) -> str | None:
        """Who holds the lease as far as this instance last saw (``None``: nobody)."""
        return self.scheduler_id if self._leader else self._leader_id

    async def start(self) -> None:
        if self._state is not SchedulerState.NEW:
            return
        s = self.nats_settings
        try:
            # Lease calls time out fast: a refresh stuck longer than ttl/3 is a failed one.
            self._lease_kv = await natsio.ensure_bucket(
                self._lease_js, s, subjects.LEADER_BUCKET, ttl=self.settings.lease_ttl
            )
            self._models_kv = await natsio.ensure_bucket(self._js, s, subjects.MODELS_BUCKET)
            self._placements_kv = await natsio.ensure_bucket(
                self._js, s, subjects.PLACEMENTS_BUCKET
            )
            self._nodes_kv = await natsio.ensure_bucket(
                self._js, s, subjects.NODES_BUCKET, ttl=natsio.NODE_TTL
            )
            status = await self._lease_kv.status()
            if status.ttl and abs(status.ttl - self._ttl) > 0.01:
                # The bucket (made by whoever came first) is the truth: a lease that
                # expires before we refresh it would let a second leader in.
                log.warning(
                    "leader bucket has TTL %.1fs, not the configured %.1fs: using %.1fs",
                    status.ttl,
                    self._ttl,
                    status.ttl,
                )
                self._ttl = status.ttl
            # Every write to the leader key, seen live: a standby learns at once that
            # the key is gone instead of waiting for its next poll.
            self._lease_sub = await self.nc.subscribe(
                subjects.kv_subject(subjects.LEADER_BUCKET, subjects.LEADER_KEY),
                cb=self._on_lease_msg,
            )
        except (TimeoutError, NatsError) as e:
            raise Unavailable(f"scheduler cannot set up its KV buckets: {e}") from e
        self._state = SchedulerState.RUNNING
        self._task = asyncio.create_task(self._election_loop(), name="scheduler-election")

    async def run(self) -> None:
        """Serve until :meth:`close` (elections and reconciling run in the background)."""
        await self.start()
        assert self._task is not None
        closed = asyncio.create_task(self._closed.wait())
        try:
            await asyncio.wait({self._task, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise exc

    async def close(self) -> None:
        """Stop leading and hand the lease over at once. Safe to call twice."""
        if self._state is SchedulerState.CLOSED:
            return
        if self._state is SchedulerState.CLOSING:
            await self._closed.wait()
            return
        self._state = SchedulerState.CLOSING
        was_leader = self._leader
        if self._task is not None:
            await cancel_and_wait([self._task])
        rev = self._lease_rev
        if was_leader and self._lease_kv is not None and self.nc.is_connected:
            # Only our own revision: never delete a successor's lease.
            with contextlib.suppress(TimeoutError, NatsError):
                await asyncio.wait_for(
                    self._lease_kv.delete(subjects.LEADER_KEY, last=rev), self._ttl
                )
        if self._lease_sub is not None:
            with contextlib.suppress(NatsError):
                await self._lease_sub.unsubscribe()
        self._state = SchedulerState.CLOSED
        self._closed.set()

    async def wait_leader(self) -> None:
        """Until this instance leads (bound it with ``asyncio.timeout``)."""
        await self._leading.wait()

    async def wait_idle(self) -> None:
        """Until this instance leads, its view is complete, and no pass is due or running.

        Nodes in their grace period may still trigger a pass later.
        """
        await self._idle.wait()

    # --- leader election ---------------------------------------------------------

    async def _on_lease_msg(self, msg: Msg) -> None:
        # Core subscribers see every publish, refused ones too: only a delete is worth
        # a look (a refused one costs one needless create attempt).
        if msg.headers and _is_delete(msg.headers.get(KV_OP)):
            self._leader_id = None
            self._lease_event.set()

    async def _election_loop(self) -> None:
        """Standby: watch the lease's revision; take the lease when it is gone or stale.

        Max-age expiry alone lags (the server expires a little after the TTL, and
        publishes nothing), so a standby that has seen no refresh for ``_TAKEOVER`` of
        the TTL takes the lease with ``update(last=<the revision it saw>)``: that only
        succeeds if the leader really did not refresh, and the leader has stepped down
        by then (``_STEP_DOWN`` < ``_TAKEOVER``, both counted from no later than its
        last refresh).
        """
        ttl = self._ttl
        poll = min(0.25, ttl / 10)
        while True:
            natsio.raise_if_cancelled()
            self._lease_event.clear()
            acquired: float | None = None
            try:
                async with asyncio.timeout(ttl):
                    acquired = await self._try_acquire()
            except KeyWrongLastSequenceError:
                pass  # another standby was quicker
            except (TimeoutError, NatsError) as e:
                log.debug("scheduler %s: lease check failed: %s", self.scheduler_id, e)
            if acquired is not None:
                await self._lead(acquired)
                continue
            # A delete (clean close) is seen live; anything else at the next poll.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await self._lease_event.wait()

    async def _try_acquire(self) -> float | None:
        """Take the lease if it is free or stale; return when the winning write was sent."""
        assert self._lease_kv is not None
        kv = self._lease_kv
        me = self.scheduler_id.encode()
        try:
            entry = await kv.get(subjects.LEADER_KEY)
        except KeyNotFoundError:
            self._leader_id = None
            sent = time.monotonic()
            self._lease_rev = await kv.create(subjects.LEADER_KEY, me)
            return sent
        rev = entry.revision or 0
        now = time.monotonic()  # no earlier than when the server stored `rev`
        if entry.value == me:
            # Ours from before a NATS outage made us step down: nobody else writes our id.
            self._lease_rev = await kv.update(subjects.LEADER_KEY, me, last=rev)
            return now
        if rev != self._seen_rev:
            self._seen_rev, self._seen_at = rev, now
            self._leader_id = (entry.value or b"").decode(errors="replace") or None
            return None
        if now - self._seen_at < self._ttl * _TAKEOVER:
            return None
        self._lease_rev = await kv.update(subjects.LEADER_KEY, me, last=rev)
        log.warning("scheduler %s: lease of %s went stale", self.scheduler_id, self._leader_id)
        return now

    async def _lead(self, acquired_at: float) -> None:
        self._leader = True
        self._leading.set()
        self.stats.elections += 1
        log.warning("scheduler %s: leading", self.scheduler_id)
        work = asyncio.create_task(self._leader_work(), name="scheduler-leader")
        hold = asyncio.create_task(self._hold_lease(acquired_at), name="scheduler-lease")
        try:
            await asyncio.wait({work, hold}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._leader = False
            self._leading.clear()
            self._idle.clear()
            await cancel_and_wait([work, hold])
            if self._state is SchedulerState.RUNNING:
                log.warning("scheduler %s: no longer leading", self.scheduler_id)

    async def _hold_lease(self, acquired_at: float) -> None:
        """Refresh the lease every ttl/3; return (step down) before it may have lapsed.

        The server counts the TTL from when it stored our last refresh, which is no
        earlier than when we sent it, and a standby takes over no earlier than
        ``_TAKEOVER`` of the TTL after it saw that refresh: stepping down by
        ``sent + _STEP_DOWN * ttl`` means two leaders never write at once, however
        slow or dead NATS is.
        """
        ttl = self._ttl
        deadline = acquired_at + ttl * _STEP_DOWN
        wait = ttl / 3
        while True:
            natsio.raise_if_cancelled()
            await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
            sent = time.monotonic()
            if sent >= deadline:
                log.warning("scheduler %s: lease lapsed (NATS unreachable)", self.scheduler_id)
                return
            try:
                async with asyncio.timeout(deadline - sent):
                    refreshed = await self._refresh_lease()
            except (TimeoutError, NatsError) as e:
                log.debug("scheduler %s: lease refresh failed: %s", self.scheduler_id, e)
                wait = min(ttl / 10, 0.25)
                continue
            if not refreshed:
                log.warning("scheduler %s: lease taken over", self.scheduler_id)
                return
            deadline, wait = sent + ttl * _STEP_DOWN, ttl / 3

    async def _refresh_lease(self) -> bool:
        assert self._lease_kv is not None
        me = self.scheduler_id.encode()
        try:
            self._lease_rev = await self._lease_kv.update(
                subjects.LEADER_KEY, me, last=self._lease_rev
            )
            return True
        except KeyWrongLastSequenceError:
            # A refresh that timed out may still have landed: the key is ours if it says so.
            try:
                entry = await self._lease_kv.get(subjects.LEADER_KEY)
            except KeyNotFoundError:
                return False
            if entry.value == me and entry.revision is not None:
                self._lease_rev = entry.revision
                return True
            return False

    # --- the leader's view -------------------------------------------------------

    async def _leader_work(self) -> None:
        backoff = 0.1
        while True:
            natsio.raise_if_cancelled()
            try:
                await self._session()
            except _Resync as e:
                log.info("scheduler %s: rebuilding view: %s", self.scheduler_id, e)
                backoff = 0.1
            except (TimeoutError, NatsError) as e:
                log.warning("scheduler %s: view lost (%s), rebuilding", self.scheduler_id, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                # A bug must not cost the cluster its scheduler: log it, rebuild, go on.
                log.exception("scheduler %s: reconcile failed, rebuilding", self.scheduler_id)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _session(self) -> None:
        """Watch the three buckets and reconcile until the view may be stale."""
        assert self._models_kv and self._nodes_kv and self._placements_kv
        self.stats.resyncs += 1
        self._models.clear()
        self._nodes.clear()
        self._nodes_seq, self._lagging = 0, (-1, 0.0)
        self._placements.clear()
        self._revs.clear()
        self._synced.clear()
        self._node_sig = None
        self._idle.clear()
        self._dirty.set()
        reconnects = self.nc.stats["reconnects"]
        watched: list[tuple[str, KeyValue, Callable[[KeyValue.Entry], None]]] = [
            (subjects.MODELS_BUCKET, self._models_kv, self._on_model),
            (subjects.NODES_BUCKET, self._nodes_kv, self._on_node),
            (subjects.PLACEMENTS_BUCKET, self._placements_kv, self._on_placement),
        ]
        watchers: list[KeyValue.KeyWatcher] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            for name, kv, handler in watched:
                w = await kv.watchall()
                watchers.append(w)
                tasks.append(asyncio.create_task(self._consume(name, kv, w, handler)))
                tasks.append(asyncio.create_task(self._guard(name, w)))
            tasks.append(asyncio.create_task(self._reconcile_loop()))
            tasks.append(asyncio.create_task(self._tick_loop(reconnects)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # raises what ended the session
            raise _Resync("a session task ended")
        finally:
            await cancel_and_wait(tasks)
            for w in watchers:
                with contextlib.suppress(Exception):
                    await w.stop()

    async def _guard(self, name: str, watcher: KeyValue.KeyWatcher) -> None:
        """A watch whose consumer died with a NATS server delivers nothing, silently."""
        await natsio.watch_lost(watcher)
        raise _Resync(f"{name} watcher lost its consumer")

    async def _consume(
        self,
        name: str,
        kv: KeyValue,
        watcher: KeyValue.KeyWatcher,
        handler: Callable[[KeyValue.Entry], None],
    ) -> None:
        async for entry in natsio.entries(kv, watcher):
            if entry is None:  # the initial snapshot is complete
                self._synced.add(name)
                self._mark_dirty()
                continue
            try:
                handler(entry)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
                log.warning("scheduler: ignoring bad %s entry %r: %s", name, entry.key, e)
        raise _Resync(f"{name} watcher stopped")

    def _mark_dirty(self) -> None:
        self._dirty.set()
        self._idle.clear()

    def _on_model(self, entry: KeyValue.Entry) -> None:
        name = subjects.model_from_key(entry.key)
        if _is_delete(entry.operation):
            if self._models.pop(name, None) is not None:
                self._mark_dirty()
            return
        spec = msgspec.json.decode(entry.value or b"", type=ModelSpec)
        if spec.name != name:
            raise ValueError(f"model key {entry.key!r} holds model {spec.name!r}")
        if self._models.get(name) != spec:
            self._models[name] = spec
            self._mark_dirty()

    def _on_node(self, entry: KeyValue.Entry) -> None:
        self._nodes_seq = max(self._nodes_seq, entry.revision or 0)
        node_id = subjects.node_from_key(entry.key)
        now = time.monotonic()
        nv = self._nodes.get(node_id)
        if _is_delete(entry.operation):
            if nv is not None and not nv.deleted:
                nv.deleted = True
                nv.down_since = now
                self._mark_dirty()
            return
        info = msgspec.json.decode(entry.value or b"", type=NodeInfo)
        if nv is None:
            self._nodes[node_id] = _NodeView(info, now, None)
            self._mark_dirty()
            return
        if not self._alive(nv, now) or _shape(nv.info) != _shape(info):
            self._mark_dirty()
        nv.info, nv.last_seen, nv.deleted, nv.down_since = info, now, False, None

    def _on_placement(self, entry: KeyValue.Entry) -> None:
        key = subjects.placement_key_parts(entry.key)
        rev = entry.revision or 0
        if rev <= self._revs.get(key, 0):
            return  # our own write, already applied when it was acked
        self._revs[key] = rev
        if _is_delete(entry.operation):
            if self._placements.pop(key, None) is not None:
                self._mark_dirty()
            return
        p = msgspec.json.decode(entry.value or b"", type=Placement)
        if self._placements.get(key) != p:
            self._placements[key] = p
            self._mark_dirty()

    # --- node liveness -----------------------------------------------------------

    def _alive(self, nv: _NodeView, now: float) -> bool:
        return (
            nv.info is not None and not nv.deleted and now - nv.last_seen <= self.settings.node_ttl
        )

    def _classify(self, now: float) -> tuple[dict[str, NodeInfo], set[str], set[str]]:
        """Live nodes, nodes in their grace period, and dead ones."""
        live: dict[str, NodeInfo] = {}
        grace: set[str] = set()
        dead: set[str] = set()
        for node_id, nv in self._nodes.items():
            if self._alive(nv, now):
                assert nv.info is not None
                live[node_id] = nv.info
                continue
            down = nv.down_since
            if down is None:
                down = nv.last_seen + self.settings.node_ttl
            (grace if now < down + self.settings.node_grace else dead).add(node_id)
        return live, grace, dead

    def _signature(self, now: float) -> object:
        _, grace, dead = self._classify(now)
        return (frozenset(grace), frozenset(dead))

    async def _tick_loop(self, reconnects: int) -> None:
        s = self.settings
        tick = max(0.02, min(0.25, s.node_ttl / 4, s.node_grace / 4))
        while True:
            await asyncio.sleep(tick)
            if self.nc.stats["reconnects"] != reconnects:
                raise _Resync("reconnected to NATS")
            if len(self._synced) < 3:
                continue
            now = time.monotonic()
            silent = [nv for nv in self._nodes.values() if nv.info is not None and not nv.deleted]
            if any(not self._alive(nv, now) for nv in silent) and not await self._nodes_visible():
                # The nodes bucket has no leader (a NATS server died, an election runs):
                # no heartbeat can land, so silence says nothing about the nodes. Their
                # clocks stand still until the bucket answers again.
                for nv in silent:
                    nv.last_seen = time.monotonic()
                continue
            if self._signature(now) != self._node_sig:
                self._mark_dirty()

    async def _nodes_visible(self) -> bool:
        """True when heartbeats can land in the nodes bucket and reach this view: its
        stream answers (it has a leader) and holds nothing newer than the watch gave
        us. A watch whose consumer died with a NATS server delivers nothing while the
        beats go on landing: that is this view's blindness too, not the nodes' death,
        and the view is rebuilt. Asked at most once a second."""
        now = time.monotonic()
        if now - self._visible_at < 1.0:
            return True
        try:
            info = await self._probe_js.stream_info(subjects.kv_stream(subjects.NODES_BUCKET))
        except NotFoundError:
            return True  # no bucket: nothing to wait for
        except Exception:
            return False
        if info.state.messages and (info.state.last_seq or 0) > self._nodes_seq:
            # Beats landed that the watch has not delivered: one in flight, or a dead
            # watch. Still none delivered a second later: start afresh.
            seq, since = self._lagging
            if seq != self._nodes_seq:
                self._lagging = (self._nodes_seq, now)
            elif now - since >= 1.0:
                raise _Resync("the nodes watch fell behind its stream")
            return False
        self._visible_at = time.monotonic()
        return True

    # --- reconciling -------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.settings.debounce)
            if len(self._synced) < 3 or not self.nc.is_connected:
                await asyncio.sleep(self.settings.debounce)
                continue
            self._dirty.clear()
            ok = await self._reconcile_once()
            self.stats.passes += 1
            if not ok:
                self._mark_dirty()
                await asyncio.sleep(0.5)  # NATS trouble: do not spin
            elif not self._dirty.is_set():
                self._idle.set()

    async def _reconcile_once(self) -> bool:
        now = time.monotonic()
        # A node some placement names but that never beat in this view (died while
        # there was no leader, or before a NATS restart): its grace starts now.
        for p in self._placements.values():
            if p.node_id is not None and p.node_id not in self._nodes:
                self._nodes[p.node_id] = _NodeView(None, now, now)
        live, grace, dead = self._classify(now)
        self._node_sig = (frozenset(grace), frozenset(dead))
        t0 = time.perf_counter()
        result = plan(
            self._models,
            live,
            self._placements,
            strategy=self.settings.strategy,
            grace_nodes=grace,
            now=time.time(),
        )
        self.stats.last_plan_s = time.perf_counter() - t0
        ops: list[tuple[PlacementKey, Placement | None]] = list(result.changed.items())
        ops += [(key, None) for key in result.deleted]
        ok = await self._apply(ops) if ops else True
        self.reconcile_seconds.observe(time.perf_counter() - t0)
        if dead:
            # Forget dead nodes nothing refers to any more (unless one beat meanwhile).
            referenced = {p.node_id for p in self._placements.values()}
            later = time.monotonic()
            for node_id in dead - referenced:
                nv = self._nodes.get(node_id)
                if nv is not None and not self._alive(nv, later):
                    del self._nodes[node_id]
            # What this pass saw, less the forgotten: a change since still triggers a pass.
            self._node_sig = (frozenset(grace), frozenset(dead & self._nodes.keys()))
        return ok

    async def _apply(self, ops: list[tuple[PlacementKey, Placement | None]]) -> bool:
        """Pipelined writes: a bounded number in flight, each acked by JetStream."""
        ok = True
        pending = iter(ops)

        async def writer() -> None:
            nonlocal ok
            for key, p in pending:
                if not await self._write(key, p):
                    ok = False

        n = min(self.settings.max_inflight_writes, len(ops))
        await asyncio.gather(*(writer() for _ in range(n)))
        return ok

    async def _write(self, key: PlacementKey, p: Placement | None) -> bool:
        kv = self._placements_kv
        assert kv is not None
        kv_key = subjects.placement_key(*key)
        rev = self._revs.get(key, 0)
        try:
            if p is None:
                await kv.delete(kv_key, last=rev)
                self._placements.pop(key, None)
                self.stats.deletes += 1
                return True
            data = msgspec.json.encode(p)
            try:
                new_rev = await kv.update(kv_key, data, last=rev)
            except KeyWrongLastSequenceError:
                if key in self._placements:
                    raise
                # We believed it absent; a tombstone we never saw (or purged) is in the way.
                new_rev = await kv.create(kv_key, data)
            if new_rev > self._revs.get(key, 0):
                self._revs[key] = new_rev
                self._placements[key] = p
            self.stats.writes += 1
            return True
        except (KeyWrongLastSequenceError, APIError) as e:
            if isinstance(e, KeyWrongLastSequenceError) or e.err_code in _WRONG_LAST:
                # Someone (a node agent) wrote first: adopt their version and plan again.
                self.stats.conflicts += 1
                await self._refresh(key, kv_key)
                return True
            self.stats.errors += 1
            log.warning("scheduler: writing placement %s failed: %s", kv_key, e)
            return False
        except (TimeoutError, NatsError) as e:
            self.stats.errors += 1
            log.debug("scheduler: writing placement %s failed: %s", kv_key, e)
            return False

    async def _refresh(self, key: PlacementKey, kv_key: str) -> None:
        kv = self._placements_kv
        assert kv is not None
        try:
            entry = await kv.get(kv_key)
        except KeyNotFoundError as e:
            # Deleted: the tombstone's revision guards the next create. Never written
            # (or purged): nothing to guard.
            self._revs[key] = (e.entry.revision or 0) if e.entry is not None else 0
            self._placements.pop(key, None)
        except (TimeoutError, NatsError):
            pass
        else:
            rev = entry.revision or 0
            if rev > self._revs.get(key, 0) and entry.value:
                self._revs[key] = rev
                self._placements[key] = msgspec.json.decode(entry.value, type=Placement)
        self._mark_dirty()


async def run_scheduler(nats_settings: NatsSettings, settings: SchedulerSettings) -> None:
    """Connect, run one scheduler until cancelled, then close it and drain the connection."""
    nc = await natsio.connect(nats_settings, name="nebula-scheduler")
    try:
        async with Scheduler(nc, settings, nats_settings=nats_settings) as scheduler:
            await scheduler.run()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
