"""Run the gateway on a real uvicorn socket (CLI, `nebula up`, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource

import uvicorn
from prometheus_client import CollectorRegistry

from gateway.app import Gateway, create_app
from gateway.connections import ConnectionGuard
from nebula import natsio
from nebula.errors import Unavailable
from nebula.service import Service
from nebula.settings import GatewaySettings, NatsSettings

log = logging.getLogger(__name__)


def _raise_fd_limit() -> None:
    """Each client connection is a file descriptor; the usual soft limit (1024) would
    refuse connections long before max_connections, so take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class GatewayServer(Service):
    """``async with GatewayServer(...) as s: ... s.base_url``; port 0 picks a free port."""

    def __init__(
        self,
        settings: GatewaySettings,
        nats_settings: NatsSettings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.nats_settings = nats_settings
        self.registry = registry
        self.hooks = natsio.ReconnectHooks()
        self.gateway: Gateway | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = settings.port
        self.guard: ConnectionGuard | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    async def start(self) -> None:
        nc = await natsio.connect(
            self.nats_settings, name="nebula-gateway", on_reconnect=self.hooks
        )
        self.gateway = Gateway(
            self.settings, self.nats_settings, nc, registry=self.registry, hooks=self.hooks
        )
        await self.gateway.start()
        _raise_fd_limit()
        self.guard = ConnectionGuard(
            header_timeout=self.settings.header_timeout,
            max_connections=self.settings.max_connections,
        )
        config = uvicorn.Config(
            create_app(self.gateway),
            host=self.settings.host,
            port=self.settings.port,
            loop="none",  # run on the caller's loop
            http=self.guard.protocol,  # type: ignore[arg-type]
            timeout_keep_alive=self.settings.idle_timeout,
            log_level="warning",
            log_config=None,  # uvicorn's lines go through our handler (JSON or text) too
            access_log=False,
            # A hard cap only: close() drains for drain_timeout and then ends every
            # open stream with an error event itself.
            timeout_graceful_shutdown=int(self.settings.drain_timeout) + 10,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                task, self._task = self._task, None
                # uvicorn logs a bind error and raises SystemExit: say it as one error.
                with contextlib.suppress(SystemExit):
                    await task
                raise Unavailable(
                    f"the gateway cannot listen on {self.settings.host}:{self.settings.port} "
                    "(see the error above)"
                )
            await asyncio.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop listening at once (a new connection is refused, so a load balancer tries
        another gateway instead of getting an error), let every request already accepted
        finish for drain_timeout, end the rest with an OpenAI error (an SSE error event on
        a stream) and refuse what still arrives, then leave NATS cleanly."""
        gw = self.gateway
        if self._server is not None:
            # (no such attribute when uvicorn never got to listen: a failed start)
            for listener in getattr(self._server, "servers", ()):
                listener.close()  # open connections stay; uvicorn closes idle ones
            self._server.should_exit = True
        if gw is not None and not await gw.dispatcher.wait_idle(self.settings.drain_timeout):
            log.warning(
                "%d request(s) still open after %gs; ending them",
                len(gw.dispatcher.calls),
                self.settings.drain_timeout,
            )
            gw.draining = True
            gw.dispatcher.fail_all(
                Unavailable(
                    "the gateway is shutting down; retry the request",
                    retry_after=self.settings.retry_after,
                )
            )
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        if self.gateway is not None:
            gw, self.gateway = self.gateway, None
            gw.draining = True
            await gw.close()
            await natsio.close_connection(gw.nc)
