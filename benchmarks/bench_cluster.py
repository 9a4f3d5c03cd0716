"""Cost of replication: the interactive request stream in memory on one server (R1)
versus file-backed and replicated on three (R3), side by side in one run on one
3-node NATS cluster (SIMULATED engine, 0 ms TTFT/ITL, so the queue is what differs).

    python benchmarks/bench_cluster.py            # prints a markdown table

Each storage choice gets its own gateway + worker processes (NEBULA_REQUEST_STORAGE
memory / file) and its own model; rows alternate so machine noise hits both.
TTFT with a lean keep-alive Python client; throughput with wrk (benchmarks/post.lua).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fabric import _Conn, pct, wrk  # noqa: E402

from nebula import procs  # noqa: E402
from nebula.embedded import EmbeddedCluster  # noqa: E402

TOKENS = 16
MODES = ("memory", "file")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(model: str) -> bytes:
    return json.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": "benchmark the queue please"}],
        }
    ).encode()


async def ttft(url: str, model: str, conc: int, n: int) -> dict[str, float]:
    """TTFT p50/p99 (ms) of ``n`` streaming requests from ``conc`` keep-alive users."""
    firsts: list[float] = []
    b = body(model)
    host, port = url.removeprefix("http://").split(":")
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (host.encode(), len(b))
    ) + b

    async def user(k: int, record: bool = True) -> None:
        conn = _Conn(*await asyncio.open_connection(host, int(port)))
        try:
            for _ in range(k):
                first, _total = await conn.post(request)
                if record:
                    firsts.append(first)
        finally:
            conn.writer.close()

    await user(5, record=False)
    t0 = time.perf_counter()
    await asyncio.gather(*[user(n // conc) for _ in range(conc)])
    wall = time.perf_counter() - t0
    return {
        "p50": pct(firsts, 50) * 1e3,
        "p99": pct(firsts, 99) * 1e3,
        "rps": len(firsts) / wall,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per row")
    ap.add_argument("--requests", type=int, default=300, help="Python-client requests per row")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-cluster-"))
    cluster = EmbeddedCluster(tmp, [free_port() for _ in range(3)], [free_port() for _ in range(3)])
    children: list[asyncio.subprocess.Process] = []
    urls: dict[str, str] = {}
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    async with cluster:
        try:
            for mode in MODES:
                env = {"NEBULA_NATS_URL": cluster.url, "NEBULA_REQUEST_STORAGE": mode}
                port = free_port()
                urls[mode] = f"http://127.0.0.1:{port}"
                children.append(
                    await procs.spawn(
                        procs.nebula_argv("gateway", "--port", str(port)),
                        env=env,
                        log_file=tmp / f"gateway-{mode}.log",
                    )
                )
                children.append(
                    await procs.spawn(
                        procs.nebula_argv(
                            "worker",
                            "--model",
                            f"bench-{mode}",
                            "--engine",
                            "sim",
                            "--max-concurrency",
                            "128",
                            "--max-tokens",
                            str(TOKENS),
                        ),
                        env=env,
                        log_file=tmp / f"worker-{mode}.log",
                    )
                )
            async with httpx.AsyncClient() as http:
                for mode in MODES:
                    for _ in range(600):
                        try:
                            if f"bench-{mode}" in (await http.get(f"{urls[mode]}/v1/models")).text:
                                break
                        except httpx.HTTPError:
                            pass
                        await asyncio.sleep(0.1)
                    else:
                        raise SystemExit(f"{mode} gateway never listed its model; see {tmp}")
            for _ in range(args.rounds):
                for conc in (1, 32):
                    for mode in MODES:
                        t = await ttft(urls[mode], f"bench-{mode}", conc, args.requests)
                        w = wrk(urls[mode], conc, args.seconds, body(f"bench-{mode}"))
                        results.setdefault((mode, conc), []).append({**w, "ttft50": t["p50"]})
        finally:
            for child in reversed(children):
                await procs.stop(child)

    print(
        f"\nCost of replication — SIMULATED engine (0 ms TTFT/ITL, {TOKENS} tokens, streaming), "
        f"3-node NATS cluster + gateway + worker + load generator on one machine "
        f"({os.cpu_count()} cores), {args.rounds} alternating rounds (range shown)\n"
    )
    print("| request stream | concurrency | req/s (wrk) | TTFT p50 (ms) | wrk p99 (ms) | errors |")
    print("|---|---|---|---|---|---|")

    def rng(xs: list[float], fmt: str) -> str:
        lo, hi = min(xs), max(xs)
        return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}} to {hi:{fmt}}"

    names = {"memory": "memory R1", "file": "file R3"}
    for conc in (1, 32):
        for mode in MODES:
            rs = results[(mode, conc)]
            print(
                f"| {names[mode]} | {conc} | {rng([r['rps'] for r in rs], ',.0f')} | "
                f"{rng([r['ttft50'] for r in rs], '.2f')} | {rng([r['p99'] for r in rs], '.1f')} "
                f"| {int(sum(r['errors'] for r in rs))} |"
            )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    uvloop.run(main())
