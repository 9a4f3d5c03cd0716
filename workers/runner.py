"""Build an engine from options and run one worker around it (``nebula worker``)."""

from __future__ import annotations

from nebula import natsio
from nebula.errors import InvalidRequest
from nebula.service import Service
from nebula.settings import NatsSettings, OpenAIUpstreamSettings, SimSettings, WorkerSettings
from workers.engines import ENGINE_KINDS, Engine
from workers.engines.openai_bridge import OpenAIEngine
from workers.engines.sim import SimEngine
from workers.worker import Worker


def build_engine(kind: str, options: dict[str, str], *, max_concurrency: int) -> Engine:
    """Engine options are strings (they come from flags and from KV model specs)."""
    if kind == "sim":
        return SimEngine(
            SimSettings(
                ttft_ms=float(options.get("ttft_ms", 0)),
                itl_ms=float(options.get("itl_ms", 0)),
                max_tokens=int(options.get("max_tokens", 16)),
                max_concurrency=max_concurrency,
            )
        )
    if kind == "openai":
        url = options.get("upstream_url")
        if not url:
            raise InvalidRequest("the openai engine needs --upstream-url", param="upstream_url")
        return OpenAIEngine(
            OpenAIUpstreamSettings(
                url=url,
                api_key=options.get("upstream_api_key") or None,
                upstream_model=options.get("upstream_model") or None,
            ),
            max_concurrency=max_concurrency,
        )
    if kind == "hf":
        from workers.engines.hf import HFEngine, HFSettings

        path = options.get("model_path")
        if not path:
            raise InvalidRequest("the hf engine needs --model-path", param="model_path")
        return HFEngine(HFSettings(model_path=path, max_concurrency=max_concurrency))
    raise InvalidRequest(
        f"unknown engine {kind!r}; available here: {', '.join(ENGINE_KINDS)}", param="engine"
    )


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
