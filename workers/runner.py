"""Build an engine from options and run one worker around it (``nebula worker``)."""

from __future__ import annotations

import dataclasses

from nebula import natsio
from nebula.service import Service
from nebula.settings import NatsSettings, WorkerSettings
from workers.engines import ENGINES, Engine, EngineConfig
from workers.worker import Worker


def build_engine(
    kind: str,
    options: dict[str, str],
    *,
    model: str = "",
    max_concurrency: int | None = None,
    model_path: str | None = None,
    engine_args: tuple[str, ...] = (),
    gpu_memory: float = 0.0,
) -> Engine:
    """Engine options are strings (they come from flags and from KV model specs)."""
    cfg = EngineConfig(
        model=model,
        options=options,
        max_concurrency=max_concurrency,
        model_path=model_path,
        engine_args=engine_args,
        gpu_memory=gpu_memory,
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
        await self.engine.start()
        if self.settings.max_concurrency <= 0:
            # Slots follow the engine (vLLM: its --max-num-seqs).
            slots = self.engine.load().capacity or 8
            self.settings = dataclasses.replace(self.settings, max_concurrency=slots)
        nc = await natsio.connect(
            self.nats_settings, name=f"nebula-worker-{self.settings.model}", on_reconnect=self.hooks
        )
        self.worker = Worker(
            self.settings, self.engine, nc, self.nats_settings, node_id=self.node_id
        )
        self.hooks.add(self.worker.on_reconnect)
        await self.worker.start()

    async def close(self) -> None:
        if self.worker is not None:
            w, self.worker = self.worker, None
            await w.close()
            await natsio.close_connection(w.nc)
        await self.engine.stop()
