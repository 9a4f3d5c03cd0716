"""What observability costs: streamed requests/s with request metrics and JSON logs
ON versus OFF, at concurrency 64, in one run.

    python benchmarks/bench_observability.py [--seconds 8] [--rounds 3]   # needs wrk

Two stacks share one nats-server: each is a gateway plus a worker (SIMULATED engine,
0 ms TTFT/ITL, 16-token streams), as separate processes.
- ON: request metrics recorded, ``--log-format json`` with the per-request lines on
  (``workers.worker=info``: one JSON line per request in the worker, the lines
  ``nebula logs --request-id`` finds), and ``/metrics`` scraped every second as a
  (busy) Prometheus would.
- OFF: ``--no-request-metrics`` on the gateway, text logs at the default level
  (warnings only).
Each round drives BOTH stacks at once, one wrk each: on a shared 2-core machine any
other load then hits both alike, and as they compete for the same cores the stack
that spends more CPU per request serves fewer, so ON/OFF is the cost. (Taking turns
instead, ``--alternate``, was swamped by other load on this machine: rounds ranged
0.70-1.20.) The table has each round's pair and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fabric import body, wrk  # noqa: E402

from nebula import procs  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.settings import EmbeddedNatsSettings  # noqa: E402

TOKENS = 16
CONCURRENCY = 64


async def start_stack(
    name: str, port: int, nats_url: str, tmp: Path, *, on: bool
) -> list[asyncio.subprocess.Process]:
    env = {"NEBULA_NATS_URL": nats_url}
    if on:
        env |= {"NEBULA_LOG_FORMAT": "json", "NEBULA_LOG_LEVEL": "warning,workers.worker=info"}
    else:
        env |= {"NEBULA_LOG_FORMAT": "text", "NEBULA_LOG_LEVEL": "warning"}
    gw_args = ["gateway", "--port", str(port)] + ([] if on else ["--no-request-metrics"])
    gw = await procs.spawn(procs.nebula_argv(*gw_args), env=env, log_file=tmp / f"{name}-gw.log")
    wk = await procs.spawn(
        procs.nebula_argv(
            "worker", "--model", name, "--engine", "sim", "--max-concurrency", "128",
            "--max-tokens", str(TOKENS),
        ),
        env=env,
        log_file=tmp / f"{name}-worker.log",
    )  # fmt: skip
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if name in (await http.get(f"http://127.0.0.1:{port}/v1/models")).text:
                    return [wk, gw]
            await asyncio.sleep(0.1)
    raise SystemExit(f"stack {name} did not come up; see {tmp}")


async def scrape_every(url: str, period: float) -> None:
    async with httpx.AsyncClient() as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                await http.get(url)
            await asyncio.sleep(period)


def payload(model: str) -> bytes:
    return body(TOKENS).replace(b'"bench-sim"', f'"{model}"'.encode())


async def run_wrk(port: int, model: str, seconds: int, *, scrape: bool) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}"
    scraper = asyncio.create_task(scrape_every(f"{url}/metrics", 1.0)) if scrape else None
    try:
        return await asyncio.to_thread(wrk, url, CONCURRENCY, seconds, payload(model))
    finally:
        if scraper is not None:
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper


def per_request_costs(n: int = 50_000) -> tuple[float, float]:
    """Microseconds per request of the gateway's accounting (one Tracker from arrival
    to outcome) and of one JSON log line with its request id (formatted and written)."""
    import logging
    import time

    from prometheus_client import CollectorRegistry

    from gateway.metrics import GatewayMetrics, Tracker
    from nebula import logs

    m = GatewayMetrics(CollectorRegistry())
    t0 = time.perf_counter()
    for _ in range(n):
        t = Tracker(m, "chat")
        t.bind("model")
        t.started(0.001)
        t.first_token()
        t.finish("completed", 200, "12 16")
    tracker_us = (time.perf_counter() - t0) / n * 1e6
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logs.JsonFormatter("worker"))
        handler.addFilter(logs._RequestIdFilter())
        log = logging.getLogger("bench.obs")
        log.propagate = False
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        logs.REQUEST_ID.set("0123456789abcdef0123456789abcdef")
        t0 = time.perf_counter()
        for i in range(n):
            log.info("request %s attempt %d %s: %s in %.1f ms", "rid", 1, "chat", "completed", i)
        log_us = (time.perf_counter() - t0) / n * 1e6
        log.removeHandler(handler)
    return tracker_us, log_us


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=8, help="wrk duration per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="OFF/ON pairs")
    ap.add_argument("--alternate", action="store_true", help="Drive one stack at a time.")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-obs-"))
    base = 19000 + os.getpid() % 500
    ports = {"off": base, "on": base + 500}
    async with EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats")) as nats:
        stacks = []
        try:
            for mode, port in ports.items():
                stacks += await start_stack(f"obs-{mode}", port, nats.url, tmp, on=mode == "on")
            # Warm both (imports, JIT-free but caches, connections).
            for mode, port in ports.items():
                await run_wrk(port, f"obs-{mode}", 2, scrape=False)
            rows = []
            for _ in range(args.rounds):
                if args.alternate:
                    off = await run_wrk(ports["off"], "obs-off", args.seconds, scrape=False)
                    on = await run_wrk(ports["on"], "obs-on", args.seconds, scrape=True)
                else:
                    off, on = await asyncio.gather(
                        run_wrk(ports["off"], "obs-off", args.seconds, scrape=False),
                        run_wrk(ports["on"], "obs-on", args.seconds, scrape=True),
                    )
                rows.append((off, on))
            json_lines = sum(
                1 for line in (tmp / "obs-on-worker.log").read_text().splitlines()
                if line.startswith("{")
            )  # fmt: skip
        finally:
            for p in stacks:
                await procs.stop(p)

    print(
        f"\nObservability cost — SIMULATED engine ({TOKENS}-token streams, 0 ms TTFT/ITL), "
        f"wrk at concurrency {CONCURRENCY} per stack, {args.seconds}s per cell, "
        f"{'one stack at a time' if args.alternate else 'both stacks at once'}, "
        f"{os.cpu_count()} cores shared by gateways, workers, nats-server and wrk\n"
    )
    print("| round | OFF req/s | ON req/s | ON/OFF | OFF p99 (ms) | ON p99 (ms) | errors |")
    print("|---|---|---|---|---|---|---|")
    for i, (off, on) in enumerate(rows, 1):
        print(
            f"| {i} | {off['rps']:.0f} | {on['rps']:.0f} | {on['rps'] / off['rps']:.3f} | "
            f"{off['p99']:.1f} | {on['p99']:.1f} | {int(off['errors'] + on['errors'])} |"
        )
    total_off = sum(r[0]["rps"] for r in rows)
    total_on = sum(r[1]["rps"] for r in rows)
    print(
        f"| all | {total_off / len(rows):.0f} | {total_on / len(rows):.0f} | "
        f"{total_on / total_off:.3f} | | | |"
    )
    print(f"\nON wrote {json_lines:,} JSON log lines in the worker (one per request).")
    tracker_us, log_us = per_request_costs()
    served = (total_off + (0 if args.alternate else total_on)) / len(rows)  # req/s, all stacks
    cpu_us = (os.cpu_count() or 1) * 1e6 / max(served, 1)
    print(
        f"Per request, measured alone: gateway metrics {tracker_us:.1f} us, one JSON log "
        f"line {log_us:.1f} us; a request costs the fabric about {cpu_us:.0f} us of CPU "
        "(all cores busy at this run's rate)."
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
