"""Interactive latency while a batch job drains on the same worker, one run.

    python benchmarks/bench_priority.py [--requests 200] [--items 20000] [--rounds 2]

One `sim` chat worker (ttft 20 ms, 16 tokens at 2 ms), a gateway and nats-server as
separate processes. Interactive chat requests (concurrency 2, over HTTP) are timed
with the worker idle, then while a batch job of chat items fills every free slot
of the same worker. Prints p50/p99 of both and the ratio (the issue's bound: p99
within 2x of idle), and how many batch items finished meanwhile (the batch must
keep running, not merely pause).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula import procs  # noqa: E402
from nebula.client import BatchClient  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.settings import EmbeddedNatsSettings  # noqa: E402

MODEL = "bench-prio"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


async def interactive(http: httpx.AsyncClient, n: int, conc: int = 2) -> list[float]:
    lat: list[float] = []
    todo = iter(range(n))

    async def user() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=CHAT)
            r.raise_for_status()
            lat.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(user() for _ in range(conc)))
    return lat


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nebula-prio-"))
    port = 19000 + os.getpid() % 1000
    rows = []
    async with EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats")) as nats:
        env = {"NEBULA_NATS_URL": nats.url}
        gw = await procs.spawn(
            procs.nebula_argv("gateway", "--port", str(port)), env=env, log_file=tmp / "gw.log"
        )
        wk = await procs.spawn(
            procs.nebula_argv(
                "worker", "--model", MODEL, "--engine", "sim", "--ttft-ms", "20",
                "--itl-ms", "2", "--max-tokens", "16", "--max-concurrency", "8",
            ),
            env=env,
            log_file=tmp / "worker.log",
        )  # fmt: skip
        try:
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http,
                await BatchClient.connect(nats.url) as client,
            ):
                for _ in range(600):
                    try:
                        if MODEL in (await http.get("/v1/models")).text:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
                await interactive(http, 20)  # warm up
                for _ in range(args.rounds):
                    idle = await interactive(http, args.requests)
                    job = await client.create(MODEL, total=args.items, endpoint="chat")
                    await client.submit(job, ((str(i), CHAT) for i in range(args.items)))
                    while (await client.status(job.job_id)).done < 50:
                        await asyncio.sleep(0.05)
                    before = (await client.status(job.job_id)).done
                    busy = await interactive(http, args.requests)
                    status = await client.status(job.job_id)
                    rows.append((idle, busy, status.done - before, status.done < args.items))
                    await client.cancel(job.job_id)
                    while not (await client.status(job.job_id)).complete:
                        await asyncio.sleep(0.1)
                    await client.purge(job.job_id)
        finally:
            await procs.stop(wk)
            await procs.stop(gw)
    print(
        f"\nInteractive chat during a batch job on the same worker (sim engine, 8 slots, "
        f"ttft 20 ms + 16 tokens at 2 ms; {os.cpu_count()} cores, all processes on one "
        f"machine), {args.requests} requests at concurrency 2\n"
    )
    print(
        "| round | idle p50 / p99 | during batch p50 / p99 | p99 ratio "
        "| batch items done meanwhile |"
    )
    print("|---|---|---|---|---|")
    for i, (idle, busy, items, running) in enumerate(rows, 1):
        print(
            f"| {i} | {pct(idle, 50):.0f} / {pct(idle, 99):.0f} ms | {pct(busy, 50):.0f} / "
            f"{pct(busy, 99):.0f} ms | {pct(busy, 99) / pct(idle, 99):.2f}x | {items}"
            f"{'' if running else ' (batch had finished)'} |"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
