"""``nebula up``: the whole fabric on one machine, as a tree of child processes.

Order matters both ways: NATS first, then the gateway and workers; on Ctrl-C the
gateway stops taking requests first, workers drain, NATS goes last.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nebula import procs
from nebula.embedded import EmbeddedNats
from nebula.errors import Unavailable
from nebula.settings import EmbeddedNatsSettings, GatewaySettings

DEMO_MODEL = "sim-chat"


@dataclass
class Stack:
    gateway: GatewaySettings
    nats_url: str | None
    nats_port: int
    data_dir: Path
    demo: bool
    echo: Callable[[str], None]
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
                await self._wait_http(
                    f"{base}/v1/models", lambda r: DEMO_MODEL in r.text, what=DEMO_MODEL
                )
            self.echo(f"gateway   {base}/v1  (OpenAI API; /health /ready /metrics)")
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
        g = self.gateway
        gateway_argv = procs.nebula_argv(
            "gateway", "--host", g.host, "--port", str(g.port),
            "--max-queue", str(g.max_queue), "--max-body-bytes", str(g.max_body_bytes),
            "--dispatch-timeout", str(g.dispatch_timeout),
            "--keepalive-timeout", str(g.keepalive_timeout),
        )  # fmt: skip
        await self._spawn("gateway", gateway_argv, env)
        if self.demo:
            demo_argv = procs.nebula_argv(
                "worker", "--model", DEMO_MODEL, "--engine", "sim", "--max-concurrency", "64",
                "--ttft-ms", "20", "--itl-ms", "10", "--max-tokens", "32",
            )  # fmt: skip
            await self._spawn("worker-sim-chat", demo_argv, env)

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
        # The gateway first (no new work), then workers (they drain in-flight jobs).
        for _name, proc in self._children:
            await procs.stop(proc)
        self._children.clear()
