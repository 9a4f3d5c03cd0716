"""``nebula up``: the whole fabric on one machine, as a tree of child processes.

Order matters both ways: NATS first, then gateway, scheduler and node agent (which
starts workers for placements); on Ctrl-C the gateway stops taking requests
first, the node agent drains its workers, the scheduler goes, NATS goes last.
``--demo`` loads ``sim-chat`` through the same path as ``nebula model load``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nebula import natsio, procs
from nebula.admin import ClusterAdmin, LoadRequest
from nebula.embedded import EmbeddedNats
from nebula.errors import Conflict, Unavailable
from nebula.settings import (
    EmbeddedNatsSettings,
    GatewaySettings,
    NatsSettings,
    env_name,
    settings_fields,
)

DEMO_MODEL = "sim-chat"
DEMO_LOAD = LoadRequest(
    name=DEMO_MODEL,
    engine="sim",
    max_concurrency=64,
    engine_options={"ttft_ms": "20", "itl_ms": "10", "max_tokens": "32"},
)
# Stop order on the way down.
_STOP_ORDER = ("gateway", "node", "scheduler")


@dataclass
class Stack:
    gateway: GatewaySettings
    nats_url: str | None
    nats_port: int
    data_dir: Path
    demo: bool
    echo: Callable[[str], None]
    gpus: str | None = None
    node_id: str | None = None
    _children: list[tuple[str, asyncio.subprocess.Process]] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    async def run(self, stop: asyncio.Event) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        nats: EmbeddedNats | None = None
        try:
            if self.nats_url is None:
                nats = EmbeddedNats(
                    EmbeddedNatsSettings(port=self.nats_port, store_dir=self.data_dir / "nats"),
                    log_file=self.log_dir / "nats.log",
                )
                await nats.start()
                url = nats.url
                self.echo(f"nats      {url}  (JetStream store {self.data_dir / 'nats'})")
            else:
                url = self.nats_url
                self.echo(f"nats      {url}  (external)")
            await self._start_children(url)
            base = f"http://{self.gateway.host}:{self.gateway.port}"
            await self._wait_http(f"{base}/ready", lambda r: r.status_code == 200)
            if self.demo:
                await self._load_demo(url)
                await self._wait_http(
                    f"{base}/v1/models", lambda r: DEMO_MODEL in r.text, what=DEMO_MODEL
                )
            self.echo(f"gateway   {base}/v1  (OpenAI API; /health /ready /metrics)")
            self.echo("control   nebula model load|unload|list, nebula cluster status")
            if self.demo:
                self.echo(f"model     {DEMO_MODEL}  (simulated engine)")
                self.echo(
                    f"try:      curl {base}/v1/chat/completions -H 'Content-Type: "
                    f'application/json\' -d \'{{"model":"{DEMO_MODEL}","messages":'
                    f'[{{"role":"user","content":"hi"}}]}}\''
                )
            self.echo(f"logs      {self.log_dir}   Ctrl-C stops everything")
            await self._until_stop_or_child_exit(stop)
        finally:
            await self._stop_children()
            if nats is not None:
                await nats.close()
            self.echo("nebula stopped")

    async def _start_children(self, nats_url: str) -> None:
        env = {"NEBULA_NATS_URL": nats_url}
        # The gateway child gets its settings the way any process does: NEBULA_* variables.
        gateway_env = dict(env)
        for f, _ in settings_fields(GatewaySettings):
            value = getattr(self.gateway, f.name)
            if value is not None:
                gateway_env[env_name(f)] = str(value)
        await self._spawn("gateway", procs.nebula_argv("gateway"), gateway_env)
        await self._spawn("scheduler", procs.nebula_argv("scheduler"), env)
        node_argv = procs.nebula_argv("node", "--log-dir", str(self.log_dir / "workers"))
        if self.gpus:
            node_argv += ["--gpus", self.gpus]
        if self.node_id:
            node_argv += ["--node-id", self.node_id]
        await self._spawn("node", node_argv, env)

    async def _load_demo(self, nats_url: str) -> None:
        settings = NatsSettings(url=nats_url)
        nc = await natsio.connect(settings, name="nebula-up")
        try:
            admin = await ClusterAdmin.open(nc, settings)
            try:
                await admin.load(DEMO_LOAD)
            except Conflict:
                pass  # loaded by an earlier `nebula up --demo`: desired state persists
        finally:
            await natsio.close_connection(nc)

    async def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        proc = await procs.spawn(argv, env=env, log_file=self.log_dir / f"{name}.log")
        self._children.append((name, proc))

    async def _wait_http(
        self,
        url: str,
        ok: Callable[[httpx.Response], bool],
        *,
        what: str = "gateway",
        timeout: float = 60.0,
    ) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                for name, proc in self._children:
                    if proc.returncode is not None:
                        raise Unavailable(
                            f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log"
                        )
                try:
                    if ok(await client.get(url)):
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise Unavailable(f"{what} did not become ready in {timeout:.0f}s; see {self.log_dir}")

    async def _until_stop_or_child_exit(self, stop: asyncio.Event) -> None:
        waits = {asyncio.ensure_future(p.wait()): n for n, p in self._children}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            if fut in waits:
                self.echo(f"{waits[fut]} exited unexpectedly; see {self.log_dir}/{waits[fut]}.log")
        stopper.cancel()
        for fut in waits:
            fut.cancel()

    async def _stop_children(self) -> None:
        # The gateway first (no new work), then the node agent (its workers drain).
        rank = {name: i for i, name in enumerate(_STOP_ORDER)}
        for _name, proc in sorted(self._children, key=lambda c: rank.get(c[0], len(rank))):
            await procs.stop(proc, timeout=60.0)
        self._children.clear()
