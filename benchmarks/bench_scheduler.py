"""Scheduler scale benchmark: 1,000 simulated nodes, 5,000 replicas.

    python benchmarks/bench_scheduler.py            # prints a markdown table

Starts its own nats-server (port 0, temporary store) and runs the scheduler as a
separate process, as in production; this process plays the node agents (1,000
heartbeats, every 2 s) and the user, and watches the placements bucket.

1. place: all model specs are written at t0; done when every one of the 5,000
   replicas is visible in KV as placed (Starting, on a node).
2. lose 10% of nodes: 100 node agents stop and delete their heartbeat at t0; done
   when every replica they ran is placed on another node. The scheduler waits
   ``--grace`` seconds before moving them (a real cluster waits longer so a NATS
   blip reshuffles nothing); the table shows the total and the time beyond it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue  # noqa: E402

from nebula import natsio, subjects  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.protocol import GpuInfo, ModelSpec, NodeInfo, Placement  # noqa: E402
from nebula.scheduler import Scheduler  # noqa: E402
from nebula.settings import EmbeddedNatsSettings, NatsSettings, SchedulerSettings  # noqa: E402

FRACTIONS = [0.0, 0.1, 0.25, 0.5, 1.0]  # 0.0: a CPU engine


async def gather_bounded(coros: list[Awaitable[object]], limit: int = 256) -> None:
    it = iter(coros)

    async def worker() -> None:
        for c in it:
            await c

    await asyncio.gather(*(worker() for _ in range(min(limit, len(coros)))))


class Watch:
    """Latest placement per key, with O(1) progress counters for both phases."""

    def __init__(self) -> None:
        self.placements: dict[str, Placement] = {}
        self.placed = 0
        self.lost_nodes: set[str] = set()
        self.lost_keys: set[str] = set()
        self.recovered: set[str] = set()
        self.changed = asyncio.Event()

    @staticmethod
    def is_placed(p: Placement | None) -> bool:
        return p is not None and p.node_id is not None and p.state.value in ("Starting", "Ready")

    def apply(self, key: str, p: Placement | None) -> None:
        old = self.placements.pop(key, None)
        self.placed -= self.is_placed(old)
        if p is not None:
            self.placements[key] = p
            self.placed += self.is_placed(p)
        if key in self.lost_keys:
            if self.is_placed(p) and p is not None and p.node_id not in self.lost_nodes:
                self.recovered.add(key)
            else:
                self.recovered.discard(key)
        self.changed.set()

    async def run(self, kv: KeyValue) -> None:
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation in (KV_DEL, KV_PURGE):
                    self.apply(entry.key, None)
                else:
                    self.apply(entry.key, msgspec.json.decode(entry.value, type=Placement))
        finally:
            await watcher.stop()

    async def until(self, done: Callable[[], bool]) -> float:
        t0 = time.perf_counter()
        while not done():
            self.changed.clear()
            await self.changed.wait()
        return time.perf_counter() - t0


def build(nodes: int, replicas: int, seed: int) -> tuple[list[NodeInfo], list[ModelSpec]]:
    rng = random.Random(seed)
    infos = [
        NodeInfo(
            node_id=f"node-{i:04d}",
            hostname=f"node-{i:04d}",
            gpus=[GpuInfo(index=g, name="sim-80GB") for g in range(rng.randint(4, 8))],
            cpu_count=64,
            labels={"zone": f"z{i % 4}"},
        )
        for i in range(nodes)
    ]
    specs: list[ModelSpec] = []
    total = 0
    while total < replicas:
        n = min(rng.randint(1, 50), replicas - total)
        name = f"bench/model-{len(specs):04d}"
        specs.append(
            ModelSpec(name=name, engine="sim", replicas=n, gpu_memory=rng.choice(FRACTIONS))
        )
        total += n
    return infos, specs


async def child(url: str, strategy: str, grace: float) -> None:
    """The scheduler process: ``ready`` once it leads, ``idle <s> <writes>`` once its
    first view is built and reconciled, its stats as JSON when stopped."""
    logging.basicConfig(level=logging.ERROR)  # keep the table clean
    nats = NatsSettings(url=url)
    nc = await natsio.connect(nats, name="bench-scheduler")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    settings = SchedulerSettings(strategy=strategy, node_grace=grace)
    async with Scheduler(nc, settings, nats_settings=nats) as sched:
        await sched.wait_leader()
        t0 = time.perf_counter()
        print("ready", flush=True)
        await sched.wait_idle()
        print(f"idle {time.perf_counter() - t0:.3f} {sched.stats.writes}", flush=True)
        await stop.wait()
    print(json.dumps(asdict(sched.stats)), flush=True)
    await nc.close()


class Child:
    """One scheduler process."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.argv = [__file__, "--child", url, "--strategy", args.strategy]
        self.argv += ["--grace", str(args.grace)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.argv, stdout=asyncio.subprocess.PIPE
        )
        assert (await self.line()) == "ready"

    async def line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode().strip()

    async def stop(self) -> dict[str, float]:
        """SIGTERM (a clean close hands the lease over); the stats it printed."""
        if self.proc is None:
            return {}
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(self.proc.communicate(), 30)
        lines = out.decode().strip().splitlines()
        return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


async def main(args: argparse.Namespace) -> None:
    infos, specs = build(args.nodes, args.replicas, args.seed)
    with tempfile.TemporaryDirectory(prefix="nebula-bench-") as tmp:
        store = Path(tmp)
        async with EmbeddedNats(
            EmbeddedNatsSettings(port=0, store_dir=store), log_file=store / "nats.log"
        ) as server:
            nats = NatsSettings(url=server.url)
            nc = await natsio.connect(nats, name="bench-driver")
            js = nc.jetstream()
            models = await natsio.ensure_bucket(js, nats, subjects.MODELS_BUCKET)
            placements = await natsio.ensure_bucket(js, nats, subjects.PLACEMENTS_BUCKET)
            nodes = await natsio.ensure_bucket(js, nats, subjects.NODES_BUCKET, ttl=natsio.NODE_TTL)
            encoded = {n.node_id: msgspec.json.encode(n) for n in infos}
            beating = set(encoded)

            async def beat_once() -> None:
                await gather_bounded(
                    [nodes.put(subjects.node_key(n), encoded[n]) for n in list(beating)]
                )

            async def heartbeats() -> None:
                while True:
                    await asyncio.sleep(2.0)
                    with contextlib.suppress(Exception):
                        await beat_once()

            await beat_once()
            hb = asyncio.create_task(heartbeats())
            watch = Watch()
            watching = asyncio.create_task(watch.run(placements))
            first, second = Child(server.url, args), Child(server.url, args)
            try:
                await first.start()
                await first.line()  # idle: it has read the 1,000 nodes

                # Phase 1: the user loads every model at once.
                t0 = time.perf_counter()
                await gather_bounded(
                    [models.put(subjects.model_key(s.name), msgspec.json.encode(s)) for s in specs]
                )
                written = time.perf_counter() - t0
                await asyncio.wait_for(watch.until(lambda: watch.placed >= args.replicas), 60)
                place_s = time.perf_counter() - t0

                # Phase 2: 10% of node agents go away (clean shutdown: key deleted).
                rng = random.Random(args.seed + 1)
                lost = set(rng.sample(sorted(encoded), len(encoded) // 10))
                watch.lost_nodes = lost
                watch.lost_keys = {k for k, p in watch.placements.items() if p.node_id in lost}
                watch.recovered = set()
                t0 = time.perf_counter()
                beating.difference_update(lost)
                await gather_bounded([nodes.delete(subjects.node_key(n)) for n in lost])
                await asyncio.wait_for(
                    watch.until(lambda: len(watch.recovered) == len(watch.lost_keys)), 60
                )
                recover_s = time.perf_counter() - t0

                # Phase 3: a new leader rebuilds the whole view from KV and finds that
                # nothing needs writing.
                stats = await first.stop()
                await second.start()
                _, took, writes = (await second.line()).split()
                rebuild_s, rebuild_writes = float(took), int(writes)
            finally:
                await first.stop()
                await second.stop()
                hb.cancel()
                watching.cancel()
                await asyncio.gather(hb, watching, return_exceptions=True)
                await nc.close()

    gpus = sum(len(n.gpus) for n in infos)
    live = args.nodes - len(lost)
    print(
        f"\n{args.nodes} nodes ({gpus} GPUs), {len(specs)} models, {args.replicas} replicas, "
        f"strategy {args.strategy}; scheduler in its own process; "
        f"model specs written in {written:.2f}s\n"
    )
    rows = [
        ("place all replicas (specs written at t0)", args.replicas, args.nodes, place_s),
        ("lose 10% of nodes: re-place their replicas", len(watch.lost_keys), len(lost), recover_s),
        ("... of which node grace (configured wait)", "", "", args.grace),
        ("... beyond the grace (detect, plan, write)", "", "", recover_s - args.grace),
        (
            f"new leader: rebuild view from KV, reconcile ({rebuild_writes} writes)",
            args.replicas,
            live,
            rebuild_s,
        ),
    ]
    print("| phase | replicas | nodes | seconds |")
    print("| --- | ---: | ---: | ---: |")
    for phase, replicas, n, secs in rows:
        print(f"| {phase} | {replicas} | {n} | {secs:.2f} |")
    if stats:
        print(
            f"\nscheduler: {stats['passes']} passes, {stats['writes']} writes, "
            f"{stats['conflicts']} conflicts, {stats['errors']} errors, "
            f"last plan {stats['last_plan_s'] * 1000:.0f} ms"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=5000)
    ap.add_argument("--strategy", choices=["binpack", "spread"], default="binpack")
    ap.add_argument("--grace", type=float, default=0.5, help="node grace period (s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", metavar="NATS_URL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        asyncio.run(child(a.child, a.strategy, a.grace))
    else:
        asyncio.run(main(a))
