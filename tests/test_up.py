"""`nebula up --demo`, the main command, end to end: serves, then Ctrl-C leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
from openai import AsyncOpenAI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_up_demo_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port, nats_port = _free_port(), _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "up", "--demo", "--port", str(port),
        "--nats-port", str(nats_port), "--data-dir", str(tmp_path),
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not any("Ctrl-C" in line for line in lines):
                line = (await proc.stdout.readline()).decode()
                assert line, "nebula up exited early:\n" + "".join(lines)
                lines.append(line)
        banner = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in banner and "sim-chat" in banner
        family = _descendants(proc.pid)
        assert len(family) >= 4, family  # nats-server, gateway, scheduler, node (+ worker)

        async with AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        ) as client:
            models = [m async for m in client.models.list()]
            assert [m.id for m in models] == ["sim-chat"]
            assert "simulated" in models[0].owned_by
            r = await client.chat.completions.create(
                model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert r.usage is not None and r.usage.completion_tokens == 4

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            rest = (await proc.stdout.read()).decode()
            assert await proc.wait() == 0
        assert "nebula stopped" in rest
        leftovers = [pid for pid in family if _alive(pid)]
        assert not leftovers, f"processes left behind: {leftovers}"
        async with httpx.AsyncClient() as http:
            try:
                await http.get(f"http://127.0.0.1:{port}/health", timeout=1)
                raise AssertionError("gateway still answering after Ctrl-C")
            except httpx.ConnectError:
                pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
