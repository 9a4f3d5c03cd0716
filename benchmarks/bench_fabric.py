"""Fabric benchmark: HTTP -> gateway -> NATS -> worker (SIMULATED engine, 0 ms TTFT/ITL)
versus the same sim engine called in-process, side by side in one run.

    python benchmarks/bench_fabric.py            # prints a markdown table

Latency (TTFT, total) is measured with a lean Python streaming client (asyncio +
httptools on uvloop, keep-alive connections); throughput with wrk (a C load
generator: a Python client saturates 2 cores before the server does).
Gateway, worker and nats-server run as separate processes, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httptools
import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula import procs  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.protocol import Endpoint  # noqa: E402
from nebula.settings import EmbeddedNatsSettings, SimSettings  # noqa: E402
from workers.engines.base import Job  # noqa: E402
from workers.engines.sim import SimEngine  # noqa: E402

MODEL = "bench-sim"
TOKENS = 16
LONG_TOKENS = 4000


def body(max_tokens: int, stream: bool = True) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "benchmark the fabric please"}],
        }
    ).encode()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def _timed(
    user: Callable[[int], Awaitable[None]],
    conc: int,
    n: int,
    ttft: list[float],
    total: list[float],
) -> dict[str, float]:
    """Run ``conc`` users sharing ``n`` requests; percentiles of what they recorded."""
    t0 = time.perf_counter()
    await asyncio.gather(*[user(n // conc) for _ in range(conc)])
    wall = time.perf_counter() - t0
    return {
        "ttft50": pct(ttft, 50),
        "ttft99": pct(ttft, 99),
        "tot50": pct(total, 50),
        "tot99": pct(total, 99),
        "rps": len(total) / wall,
    }


async def inprocess(conc: int, n: int) -> dict[str, float]:
    """The sim engine alone: the ceiling the fabric is compared with."""
    engine = SimEngine(SimSettings(max_concurrency=conc, max_tokens=TOKENS))
    ttft: list[float] = []
    total: list[float] = []
    b = body(TOKENS)

    async def one() -> None:
        job = Job(
            request_id="x",
            model=MODEL,
            endpoint=Endpoint.CHAT,
            body=b,
            stream=True,
            include_usage=False,
        )
        t0 = time.perf_counter()
        first = None
        async for out in engine.generate(job):
            if first is None and out.tokens:
                first = time.perf_counter() - t0
        ttft.append(first or 0.0)
        total.append(time.perf_counter() - t0)

    async def user(k: int) -> None:
        for _ in range(k):
            await one()

    return await _timed(user, conc, n, ttft, total)


class _Conn:
    """A lean keep-alive HTTP/1.1 client (asyncio + httptools, the C parser uvicorn uses),
    so client-side overhead stays small next to what is measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.first: float | None = None
        self.done = False
        self.t0 = 0.0

    # httptools callbacks
    def on_status(self, _: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, chunk: bytes) -> None:
        if self.first is None and b'"content":"' in chunk.replace(b'"content":""', b""):
            self.first = time.perf_counter() - self.t0

    def on_message_complete(self) -> None:
        self.done = True

    async def post(self, request: bytes) -> tuple[float, float]:
        self.parser = httptools.HttpResponseParser(self)
        self.first, self.done, self.t0 = None, False, time.perf_counter()
        self.writer.write(request)
        while not self.done:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.parser.feed_data(data)
        assert self.status == 200, self.status
        total = time.perf_counter() - self.t0
        return (self.first if self.first is not None else total), total


async def python_client(url: str, conc: int, n: int) -> dict[str, float]:
    ttft: list[float] = []
    total: list[float] = []
    b = body(TOKENS)
    host, port = url.removeprefix("http://").split(":")
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (host.encode(), len(b))
    ) + b

    async def user(k: int, record: bool = True) -> None:
        conn = _Conn(*await asyncio.open_connection(host, int(port)))
        try:
            for _ in range(k):
                first, whole = await conn.post(request)
                if record:
                    ttft.append(first)
                    total.append(whole)
        finally:
            conn.writer.close()

    await user(5, record=False)  # warm-up code paths
    return await _timed(user, conc, n, ttft, total)


def wrk(
    url: str, conc: int, seconds: int, payload: bytes, path: str = "/v1/chat/completions"
) -> dict[str, float]:
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    out = subprocess.run(
        [
            exe,
            f"-t{min(2, conc)}",
            f"-c{conc}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(ROOT / "benchmarks" / "post.lua"),
            f"{url}{path}",
        ],
        env={**os.environ, "NEBULA_BODY": payload.decode()},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("NEBULA_JSON "))
    s = json.loads(line.split(" ", 1)[1])
    secs = s["duration_us"] / 1e6
    return {
        "rps": s["requests"] / secs,
        "p50": s["p50_us"] / 1000,
        "p99": s["p99_us"] / 1000,
        "errors": s["socket_errors"] + s["non2xx"],
        "requests": s["requests"],
    }


async def long_stream_tokens_per_s(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        t0 = time.perf_counter()
        n = 0
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            content=body(LONG_TOKENS),
            headers={"Content-Type": "application/json"},
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content":"' in line:
                    n += 1
        dt = time.perf_counter() - t0
    return (n - 1) / dt  # minus the empty role chunk


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=8, help="wrk duration per row")
    ap.add_argument("--requests", type=int, default=640, help="Python-client requests per row")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-"))
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    async with EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats")) as nats:
        env = {"NEBULA_NATS_URL": nats.url}
        gw = await procs.spawn(
            procs.nebula_argv("gateway", "--port", str(port)),
            env=env,
            log_file=tmp / "gateway.log",
        )
        wk = await procs.spawn(
            procs.nebula_argv(
                "worker",
                "--model",
                MODEL,
                "--engine",
                "sim",
                "--max-concurrency",
                "128",
                "--max-tokens",
                str(TOKENS),
            ),
            env=env,
            log_file=tmp / "worker.log",
        )
        try:
            async with httpx.AsyncClient() as http:
                for _ in range(300):
                    try:
                        if MODEL in (await http.get(f"{url}/v1/models")).text:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
            rows = []
            for conc in (1, 16, 64):
                base = await inprocess(conc, max(args.requests, conc * 10))
                fab = await python_client(url, conc, max(args.requests // 2, conc * 4))
                w = wrk(url, conc, args.seconds, body(TOKENS))
                rows.append((conc, base, fab, w))
            w_long = wrk(url, 16, args.seconds, body(1000))
            tps_one = await long_stream_tokens_per_s(url)
        finally:
            await procs.stop(wk)
            await procs.stop(gw)

    print(
        f"\nNebula fabric benchmark — SIMULATED engine (0 ms TTFT/ITL, {TOKENS} tokens, "
        f"streaming), {os.cpu_count()} cores, gateway + worker + nats-server + load "
        "generator on one machine\n"
    )
    print(
        "| concurrency | in-process TTFT p50 / p99 (ms) | fabric TTFT p50 / p99 (ms) | "
        "fabric overhead p50 (ms) | fabric total p50 / p99 (ms, Python client) | "
        "in-process req/s | fabric req/s (wrk) | wrk latency p50 / p99 (ms) | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for conc, base, fab, w in rows:
        print(
            f"| {conc} | {base['ttft50'] * 1e3:.3f} / {base['ttft99'] * 1e3:.3f} | "
            f"{fab['ttft50'] * 1e3:.2f} / {fab['ttft99'] * 1e3:.2f} | "
            f"{(fab['ttft50'] - base['ttft50']) * 1e3:.2f} | "
            f"{fab['tot50'] * 1e3:.2f} / {fab['tot99'] * 1e3:.2f} | "
            f"{base['rps']:.0f} | {w['rps']:.0f} | {w['p50']:.2f} / {w['p99']:.2f} | "
            f"{int(w['errors'])} |"
        )
    print("\n| long streams | tokens/s relayed |")
    print("|---|---|")
    print(f"| 1 stream of {LONG_TOKENS} tokens (Python client) | {tps_one:,.0f} |")
    print(f"| 16 concurrent streams of 1000 tokens (wrk) | {w_long['rps'] * 1000:,.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    uvloop.run(main())
