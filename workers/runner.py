"""Build an engine from options and run one worker around it (``nebula worker``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid

import msgspec
from nats.aio.client import Client

from nebula import natsio, subjects
from nebula.protocol import WorkerInfo
from nebula.service import Service
from nebula.settings import NatsSettings, WorkerSettings
from workers.engines import ENGINES, Engine, EngineConfig
from workers.worker import Worker

log = logging.getLogger(__name__)


def build_engine(
    kind: str,
    options: dict[str, str],
    *,
    model: str = "",
    max_concurrency: int | None = None,
    model_path: str | None = None,
    engine_args: tuple[str, ...] = (),
    gpu_memory: float = 0.0,
    adapters: dict[str, str] | None = None,
) -> Engine:
    """Engine options are strings (they come from flags and from KV model specs)."""
    cfg = EngineConfig(
        model=model,
        options=options,
        max_concurrency=max_concurrency,
        model_path=model_path,
        engine_args=engine_args,
        gpu_memory=gpu_memory,
        adapters=adapters or {},
    )
    return ENGINES.build(kind, cfg)


class WorkerProcess(Service):
    """Connection + engine + worker, started and stopped in the right order."""

    def __init__(
        self,
        settings: WorkerSettings,
        nats_settings: NatsSettings,
        engine: Engine,
        *,
        node_id: str = "",
    ) -> None:
        self.settings = settings
        self.nats_settings = nats_settings
        self.engine = engine
        self.node_id = node_id
        self.hooks = natsio.ReconnectHooks()
        self.worker: Worker | None = None

    async def start(self) -> None:
        nc = await natsio.connect(
            self.nats_settings, name=f"nebula-worker-{self.settings.model}", on_reconnect=self.hooks
        )
        try:
            if not self.settings.worker_id:
                wid = f"w{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self.settings = dataclasses.replace(self.settings, worker_id=wid)
            # Loading takes from seconds to many minutes: say what is happening meanwhile.
            # The beats stop on their own, never cancelled: a NATS request cancelled on a
            # new connection can leave nats-py's request inbox half set up (its prefix
            # set, its subscription not), and every later request of the process hangs.
            loaded = asyncio.Event()
            beats = asyncio.create_task(self._starting_beats(nc, loaded))
            try:
                await self.engine.start()
            finally:
                loaded.set()
                await beats
        except BaseException:
            await natsio.close_connection(nc)
            raise
        if self.settings.max_concurrency <= 0:
            # Slots follow the engine (vLLM: its --max-num-seqs).
            slots = self.engine.load().capacity or 8
            self.settings = dataclasses.replace(self.settings, max_concurrency=slots)
        self.worker = Worker(
            self.settings, self.engine, nc, self.nats_settings, node_id=self.node_id
        )
        self.hooks.add(self.worker.on_reconnect)
        await self.worker.start()

    async def _starting_beats(self, nc: Client, loaded: asyncio.Event) -> None:
        """Heartbeats with ``ready`` false and the engine's phase until the engine is up:
        the node agent shows the phase as the placement's reason (``cluster status``)."""
        s = self.settings
        assert s.worker_id
        key = subjects.worker_key(s.model, s.worker_id)
        started, said, said_at = time.time(), "", 0.0
        try:
            kv = await natsio.workers_bucket(nc.jetstream(), self.nats_settings)
        except Exception as e:  # the worker's own start reports NATS trouble
            log.debug("no starting heartbeats: %s", e)
            return
        while not loaded.is_set():
            phase = getattr(self.engine, "phase", "") or "starting the engine"
            # Again and again, not only on a change: worker entries expire (bucket TTL).
            if phase != said or time.monotonic() - said_at > s.heartbeat_interval:
                info = WorkerInfo(
                    worker_id=s.worker_id,
                    model=s.model,
                    engine=self.engine.kind,
                    node_id=self.node_id,
                    started_at=started,
                    ready=False,
                    phase=phase,
                )
                with contextlib.suppress(Exception):
                    await kv.put(key, msgspec.json.encode(info))
                    said, said_at = phase, time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loaded.wait(), 0.5)

    async def close(self) -> None:
        if self.worker is not None:
            w, self.worker = self.worker, None
            await w.close()
            await natsio.close_connection(w.nc)
        try:  # a hung engine may not stop: its process group is cleared by the agent
            await asyncio.wait_for(self.engine.stop(), 60.0)
        except TimeoutError:
            log.error("the engine did not stop within 60s; leaving it")
