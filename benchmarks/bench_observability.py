"""What observability costs: streamed requests/s and CPU per request with request
metrics and JSON logs ON versus OFF, at concurrency 64, in one run.

    python benchmarks/bench_observability.py [--seconds 8] [--rounds 4]   # needs wrk

Three stacks share one nats-server, each a gateway plus a worker (SIMULATED engine,
0 ms TTFT/ITL, 16-token streams) as separate processes:
- OFF: ``--no-request-metrics`` on the gateway, text logs at the default level
  (warnings only).
- METRICS: request metrics recorded, ``--log-format json`` at the default level, and
  ``/metrics`` scraped every second (a busy Prometheus).
- ON: as METRICS, plus the per-request log lines (``workers.worker=info``: one JSON
  line per request in the worker, what ``nebula logs --request-id`` finds).
Each round drives all stacks at once, one wrk each (concurrency 64 per stack): other
load on a shared machine then hits them alike. Besides req/s, the table has the CPU
time each stack's gateway + worker used per request (from /proc), the cost that does
not depend on what else the machine was doing: OFF/X of it is the throughput ratio a
CPU-bound fabric would see. (Driving one stack at a time was swamped by other load on
this machine: rounds ranged 0.70-1.20.)
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
from typing import Any

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


MODES = {
    # name: (request metrics, log format, log level, scrape /metrics)
    "off": (False, "text", "warning", False),
    "metrics": (True, "json", "warning", True),
    "on": (True, "json", "warning,workers.worker=info", True),
}


async def start_stack(name: str, mode: str, port: int, nats_url: str, tmp: Path) -> list[Any]:
    metrics, fmt, level, _ = MODES[mode]
    env = {"NEBULA_NATS_URL": nats_url, "NEBULA_LOG_FORMAT": fmt, "NEBULA_LOG_LEVEL": level}
    gw_args = ["gateway", "--port", str(port)] + ([] if metrics else ["--no-request-metrics"])
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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


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
    # As `nebula.logs.configure` sets them in every Nebula process.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
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
    ap.add_argument("--seconds", type=int, default=8, help="wrk duration per round")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-obs-"))
    base = 19000 + os.getpid() % 300
    ports = {mode: base + 300 * i for i, mode in enumerate(MODES)}
    async with EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats")) as nats:
        procs_: list[Any] = []
        pids: dict[str, list[int]] = {}
        try:
            for mode, port in ports.items():
                started = await start_stack(f"obs-{mode}", mode, port, nats.url, tmp)
                pids[mode] = [p.pid for p in started]
                procs_ += started
            for mode, port in ports.items():  # warm up: connections, caches
                await run_wrk(port, f"obs-{mode}", 2, scrape=False)
            rows: list[dict[str, dict[str, float]]] = []
            for _ in range(args.rounds):
                cpu0 = {mode: cpu_seconds(p) for mode, p in pids.items()}
                results = await asyncio.gather(
                    *(
                        run_wrk(port, f"obs-{mode}", args.seconds, scrape=MODES[mode][3])
                        for mode, port in ports.items()
                    )
                )
                row = dict(zip(ports, results, strict=True))
                for mode, res in row.items():
                    res["cpu_us"] = (cpu_seconds(pids[mode]) - cpu0[mode]) / res["requests"] * 1e6
                rows.append(row)
            json_lines = sum(
                1 for line in (tmp / "obs-on-worker.log").read_text().splitlines()
                if line.startswith("{")
            )  # fmt: skip
        finally:
            for p in procs_:
                await procs.stop(p)

    print(
        f"\nObservability cost — SIMULATED engine ({TOKENS}-token streams, 0 ms TTFT/ITL), "
        f"wrk at concurrency {CONCURRENCY} per stack, all stacks at once, {args.seconds}s per "
        f"round, {os.cpu_count()} cores shared by gateways, workers, nats-server and wrk\n"
    )
    print(
        "| round | req/s OFF / METRICS / ON | CPU us per request OFF / METRICS / ON | "
        "OFF/METRICS CPU | OFF/ON CPU | errors |"
    )
    print("|---|---|---|---|---|---|")

    def line(label: str, r: dict[str, dict[str, float]]) -> None:
        rps = " / ".join(f"{r[m]['rps']:.0f}" for m in MODES)
        cpu = " / ".join(f"{r[m]['cpu_us']:.0f}" for m in MODES)
        off = r["off"]["cpu_us"]
        errors = int(sum(r[m].get("errors", 0) for m in MODES))
        print(
            f"| {label} | {rps} | {cpu} | {off / r['metrics']['cpu_us']:.3f} | "
            f"{off / r['on']['cpu_us']:.3f} | {errors} |"
        )

    for i, r in enumerate(rows, 1):
        line(str(i), r)
    total: dict[str, dict[str, float]] = {}
    for m in MODES:
        n = sum(r[m]["requests"] for r in rows)
        total[m] = {
            "rps": sum(r[m]["rps"] for r in rows) / len(rows),
            "cpu_us": sum(r[m]["cpu_us"] * r[m]["requests"] for r in rows) / n,
            "errors": sum(r[m]["errors"] for r in rows),
        }
    line("all", total)
    print(f"\nON wrote {json_lines:,} JSON log lines in the worker (one per request).")
    tracker_us, log_us = per_request_costs()
    print(
        f"Measured alone, per request: gateway metrics {tracker_us:.1f} us, one JSON log "
        f"line {log_us:.1f} us (OFF spends {total['off']['cpu_us']:.0f} us in gateway + worker)."
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
