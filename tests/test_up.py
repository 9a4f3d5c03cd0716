"""`nebula up --demo`, the main command, end to end: serves, then Ctrl-C leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
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
            sim = [m for m in models if m.id == "sim-chat"]  # (+ all-minilm-l6-v2 with embed)
            assert sim and "simulated" in sim[0].owned_by
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


def _role(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if argv and argv[0].endswith(b"nats-server"):
        return "nats"
    if b"nebula.cli" in argv:
        i = argv.index(b"nebula.cli")
        rest = [a for a in argv[i + 1 :] if a and not a.startswith(b"-")]
        return rest[0].decode() if rest else None
    return None


def _children_by_role(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for child in _descendants(pid):
        role = _role(child)
        if role in ("nats", "gateway", "scheduler", "node") and _alive(child):
            # a direct child of `nebula up` (workers are the node agent's)
            stat = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid:
                out[role] = child
    return out


async def _start_up(tmp_path: Path, port: int, *extra: str, env: dict[str, str] | None = None):
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "up", "--port", str(port), "--data-dir",
        str(tmp_path), *extra,
        env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def _chat_ok(port: int, timeout: float = 60.0) -> None:
    """A chat completion succeeds (retrying while a restarted process comes back)."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Exception | None = None
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                           timeout=5) as client:  # fmt: skip
        while asyncio.get_running_loop().time() < deadline:
            try:
                r = await client.chat.completions.create(
                    model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                assert r.choices[0].message.content
                return
            except Exception as e:
                last = e
                await asyncio.sleep(0.25)
    raise AssertionError(f"no answer after a restart: {last!r}")


@contextlib.asynccontextmanager
async def _demo_up(
    tmp_path: Path,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, list[str]]]:
    """`nebula up --demo` with quick restarts, once it answers; its output lines are
    collected in the list as they come. Killed at the end if still running."""
    port, nats_port = _free_port(), _free_port()
    proc = await _start_up(
        tmp_path, port, "--demo", "--nats-port", str(nats_port),
        env={"NEBULA_UP_BACKOFF_INITIAL": "0.2"},
    )  # fmt: skip
    assert proc.stdout is not None
    out: list[str] = []

    async def read_all() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            out.append(line.decode())

    reader = asyncio.create_task(read_all())
    try:
        async with asyncio.timeout(90):
            while not any("Ctrl-C" in line for line in out):
                assert proc.returncode is None, "".join(out)
                await asyncio.sleep(0.1)
        await _chat_ok(port)
        yield proc, port, out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()


async def test_up_restarts_every_child_that_dies(tmp_path: Path) -> None:
    """SIGKILL of the gateway, the scheduler, the node agent and nats-server: each is
    restarted (new pid, logged), requests are answered again, nebula up keeps running."""
    async with _demo_up(tmp_path) as (proc, port, out):
        for role in ("gateway", "scheduler", "node", "nats"):
            before = _children_by_role(proc.pid)
            assert role in before, (role, before)
            os.kill(before[role], signal.SIGKILL)
            async with asyncio.timeout(30):
                while _children_by_role(proc.pid).get(role) in (None, before[role]):
                    assert proc.returncode is None, "".join(out)
                    await asyncio.sleep(0.1)
            await _chat_ok(port)
        text = "".join(out)
        for name in ("gateway", "scheduler", "node", "nats-server"):
            assert f"{name} exited with signal SIGKILL" in text, text
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            assert await proc.wait() == 0


async def test_up_stops_with_a_clear_message_when_a_child_crash_loops(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the gateway can never bind its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await _start_up(
            tmp_path, port, "--nats-port", str(_free_port()),
            env={"NEBULA_UP_BACKOFF_INITIAL": "0.1", "NEBULA_UP_MAX_CRASHES": "2"},
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 1, text
    assert "gateway crashed" in text and "gateway.log" in text, text
    assert "Traceback" not in text


async def test_up_says_when_the_nats_it_should_join_is_unreachable(tmp_path: Path) -> None:
    closed = _free_port()
    proc = await _start_up(
        tmp_path, _free_port(), env={"NEBULA_NATS_URL": f"nats://127.0.0.1:{closed}"}
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 1
    assert f"NATS at nats://127.0.0.1:{closed} is unreachable" in text and "--nats-port" in text
    assert "Traceback" not in text


async def test_nebula_nats_exits_when_its_server_dies(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nebula.cli", "nats", "--port", str(_free_port()),
        "--data-dir", str(tmp_path), env={**os.environ, "PYTHONPATH": os.getcwd()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            banner = (await proc.stdout.readline()).decode()  # printed once it serves
        assert banner.startswith("nebula nats:"), banner
        servers = [p for p in _descendants(proc.pid) if _role(p) == "nats"]
        os.kill(servers[0], signal.SIGKILL)
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
        assert proc.returncode == 1
        assert "nats-server exited with signal SIGKILL" in out.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_up_gateway_sigterm_drains_its_stream_then_comes_back(tmp_path: Path) -> None:
    """SIGTERM to the gateway child of `nebula up` (a rolling restart): the stream it
    is serving ends whole, the gateway exits 0 and nebula up starts it again."""
    async with _demo_up(tmp_path) as (proc, port, out):
        gateway = _children_by_role(proc.pid)["gateway"]
        body = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}],
                "stream": True, "max_tokens": 32}  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", url, json=body) as r:
                assert r.status_code == 200
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        if not events:
                            os.kill(gateway, signal.SIGTERM)  # mid-stream
                        events.append(line)
        assert events[-1] == "data: [DONE]" and "error" not in events[-2], events[-3:]
        assert sum('"finish_reason":"' in e for e in events) == 1, events
        async with asyncio.timeout(30):
            while _children_by_role(proc.pid).get("gateway") in (None, gateway):
                assert proc.returncode is None, "".join(out)
                await asyncio.sleep(0.1)
        await _chat_ok(port)
        assert "gateway exited with code 0" in "".join(out), "".join(out)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            assert await proc.wait() == 0
