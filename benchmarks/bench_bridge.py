"""The `openai` bridge engine: a fast OpenAI-compatible backend served directly versus
the same backend behind Nebula (gateway -> NATS -> worker --engine openai), one run,
alternating rounds.

    python benchmarks/bench_bridge.py                # prints markdown tables

Two SIMULATED backends, each streaming a role chunk, 16 one-word content chunks and a
finish chunk at once, so what is measured is the cost of the path, not of a model:

- ``raw``: a raw ASGI app on uvicorn (httptools, uvloop), about as fast as a Python
  HTTP server gets: the hardest comparison for any proxy;
- ``fastapi``: the same answers from a FastAPI route returning a ``StreamingResponse``,
  the shape of vLLM's own API server and of most Python OpenAI-compatible servers.

TTFT at concurrency 1 comes from a lean Python client (asyncio + httptools,
keep-alive); throughput at concurrency 32 from wrk. Backend, gateway, worker,
nats-server and the load generator share this machine's cores; the CPU each process
spent per request during the fabric's wrk run is printed too (from /proc). Two
references from the same rounds: the fabric alone (a sim worker with the same
16-token shape, no upstream) and the bridge engine alone (driven in this process,
no fabric: its req/s and CPU per request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fabric import _Conn, pct, wrk  # noqa: E402

from nebula import procs  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.protocol import Endpoint  # noqa: E402
from nebula.settings import EmbeddedNatsSettings, OpenAIUpstreamSettings  # noqa: E402
from workers.engines.base import Job  # noqa: E402
from workers.engines.openai_bridge import OpenAIEngine  # noqa: E402

BACKENDS = ("raw", "fastapi")
CHUNKS = 16
CONCURRENCY = 32

# --- the SIMULATED backend (runs in its own process: `--serve-backend PORT`) ----------


def _stream_events(model: bytes, chat: bool, include_usage: bool) -> list[bytes]:
    obj = b"chat.completion.chunk" if chat else b"text_completion"
    head = (
        b'data: {"id":"cmpl-sim","object":"' + obj + b'","created":1,"model":"' + model + b'",'
        b'"choices":[{"index":0,' + (b'"delta":' if chat else b'"text":')
    )
    tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
    words = [b"w%d " % i for i in range(CHUNKS)]
    out = [head + b'{"role":"assistant","content":""}' + tail] if chat else []
    for w in words:
        piece = b'{"content":"' + w + b'"}' if chat else b'"' + w + b'"'
        out.append(head + piece + tail)
    out.append(
        head + (b"{}" if chat else b'""') + b',"logprobs":null,"finish_reason":"length"}]}\n\n'
    )
    if include_usage:
        out.append(
            b'data: {"id":"cmpl-sim","object":"' + obj + b'","created":1,"model":"' + model
            + b'","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d,'
            b'"total_tokens":%d}}\n\n' % (CHUNKS, CHUNKS + 5)
        )  # fmt: skip
    out.append(b"data: [DONE]\n\n")
    return out


def _full(model: str, chat: bool) -> bytes:
    text = "".join(f"w{i} " for i in range(CHUNKS))
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    return json.dumps(
        {
            "id": "cmpl-sim",
            "object": "chat.completion" if chat else "text_completion",
            "created": 1,
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": CHUNKS, "total_tokens": CHUNKS + 5},
        },
        separators=(",", ":"),
    ).encode()


_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON_HEADERS = [(b"content-type", b"application/json")]


async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A raw ASGI OpenAI-compatible server: as little work per request as possible."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    if scope["method"] == "GET" and path.endswith("/models"):
        body = json.dumps({"object": "list", "data": [{"id": "any", "object": "model"}]})
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body.encode()})
        return
    raw = b""
    more = True
    while more:
        msg = await receive()
        raw += msg.get("body", b"")
        more = msg.get("more_body", False)
    req = json.loads(raw)
    chat = path.endswith("/chat/completions")
    if not req.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": _full(req["model"], chat)})
        return
    usage = bool((req.get("stream_options") or {}).get("include_usage"))
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    for event in _stream_events(req["model"].encode(), chat, usage):
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def fastapi_backend() -> Any:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "any", "object": "model"}]})

    async def answer(request: Request, chat: bool) -> Response:
        req = await request.json()
        if not req.get("stream"):
            return Response(_full(req["model"], chat), media_type="application/json")
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        events = _stream_events(req["model"].encode(), chat, usage)

        async def gen() -> Any:
            for event in events:
                yield event

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, False)

    return app


def serve_backend(kind: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        backend if kind == "raw" else fastapi_backend(),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


# --- measuring -------------------------------------------------------------------------


def request_body(model: str, stream: bool = True) -> bytes:
    return json.dumps(
        {
            "model": model,
            "stream": stream,
            "max_tokens": CHUNKS,
            "messages": [{"role": "user", "content": "bridge benchmark"}],
        }
    ).encode()


async def ttft(base: str, model: str, n: int) -> tuple[float, float]:
    """TTFT p50, p99 (ms) of ``n`` sequential streaming requests on one keep-alive conn."""
    b = request_body(model)
    path = "/v1/chat/completions"
    host, port = base.removeprefix("http://").split(":")
    request = (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), host.encode(), len(b))
    ) + b
    conn = _Conn(*await asyncio.open_connection(host, int(port)))
    firsts: list[float] = []
    try:
        for i in range(n + 10):
            first, _ = await conn.post(request)
            if i >= 10:  # warm-up
                firsts.append(first * 1e3)
    finally:
        conn.writer.close()
    return pct(firsts, 50), pct(firsts, 99)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_ready(url: str, model: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            try:
                if model in (await http.get(url)).text:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} never listed {model}")


def model_of(kind: str) -> str:
    return f"bench-{kind}"


async def engine_alone(url: str, model: str, conc: int, per_user: int) -> tuple[float, float]:
    """The bridge engine called in this process, no fabric: (req/s, CPU ms per request)."""
    engine = OpenAIEngine(OpenAIUpstreamSettings(url=url + "/v1"), max_concurrency=conc)
    await engine.start()
    job = Job(
        request_id="x",
        model=model,
        endpoint=Endpoint.CHAT,
        body=request_body(model),
        stream=True,
        include_usage=False,
    )

    async def user(k: int) -> None:
        for _ in range(k):
            async for _out in engine.generate(job):
                pass

    try:
        await user(20)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*[user(per_user) for _ in range(conc)])
        cpu1, t1 = time.process_time(), time.perf_counter()
    finally:
        await engine.stop()
    n = conc * per_user
    return n / (t1 - t0), (cpu1 - cpu0) / n * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per measurement")
    ap.add_argument("--requests", type=int, default=300, help="TTFT requests per measurement")
    ap.add_argument("--slots", type=int, default=64, help="each worker's --max-concurrency")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="raw,fastapi or one of them")
    args = ap.parse_args()
    kinds = [k for k in args.backends.split(",") if k]
    if not kinds or set(kinds) - set(BACKENDS):
        raise SystemExit(f"--backends takes {','.join(BACKENDS)}")

    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-bridge-"))
    base_port = 19000 + os.getpid() % 300 * 3
    gateway = f"http://127.0.0.1:{base_port}"
    upstream = {k: f"http://127.0.0.1:{base_port + 1 + i}" for i, k in enumerate(BACKENDS)}
    children: list[asyncio.subprocess.Process] = []
    rows: list[tuple[str, dict[str, Any]]] = []
    sims: list[dict[str, Any]] = []
    async with EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats")) as nats:
        env = {"NEBULA_NATS_URL": nats.url}
        assert nats.proc is not None
        pids = {"nats-server": nats.proc.pid}

        async def spawn(name: str, argv: list[str], **kw: Any) -> None:
            child = await procs.spawn(argv, log_file=tmp / f"{name}.log", **kw)
            children.append(child)
            pids[name] = child.pid

        try:
            await spawn("gateway", procs.nebula_argv("gateway", "--port", str(base_port)), env=env)
            # The fabric alone, for reference: a sim engine with the same 16-token shape.
            slots = ["--max-concurrency", str(args.slots)]
            sim = ["--engine", "sim", "--max-tokens", str(CHUNKS), *slots]
            await spawn(
                "worker-sim",
                procs.nebula_argv("worker", "--model", model_of("sim"), *sim),
                env=env,
            )
            for k in kinds:
                port = upstream[k].rsplit(":", 1)[1]
                await spawn(f"backend-{k}", [sys.executable, __file__, "--serve-backend", k, port])
            for k in kinds:
                # A bridge worker checks its upstream once at start: backends first.
                await wait_ready(upstream[k] + "/v1/models", "any")
                bridge = ["--engine", "openai", "--upstream-url", upstream[k] + "/v1"]
                bridge += slots
                await spawn(
                    f"worker-{k}",
                    procs.nebula_argv("worker", "--model", model_of(k), *bridge),
                    env=env,
                )
            await wait_ready(gateway + "/v1/models", model_of("sim"))
            for k in kinds:
                await wait_ready(gateway + "/v1/models", model_of(k))
                wrk(upstream[k], CONCURRENCY, 1, request_body(model_of(k)))  # warm both paths
                wrk(gateway, CONCURRENCY, 1, request_body(model_of(k)))
            for _ in range(args.rounds):
                for k in kinds:
                    m = model_of(k)
                    r: dict[str, Any] = {}
                    r["d_ttft"] = await ttft(upstream[k], m, args.requests)
                    r["n_ttft"] = await ttft(gateway, m, args.requests)
                    r["d_wrk"] = wrk(upstream[k], CONCURRENCY, args.seconds, request_body(m))
                    mine = {"backend": f"backend-{k}", "worker": f"worker-{k}"}
                    mine |= {"gateway": "gateway", "nats-server": "nats-server"}
                    before = {n: cpu_seconds(pids[p]) for n, p in mine.items()}
                    r["n_wrk"] = wrk(gateway, CONCURRENCY, args.seconds, request_body(m))
                    n = max(1, r["n_wrk"]["requests"])
                    r["cpu"] = {
                        n_: (cpu_seconds(pids[p]) - before[n_]) / n * 1e3 for n_, p in mine.items()
                    }
                    r["alone"] = await engine_alone(upstream[k], m, CONCURRENCY, 50)
                    rows.append((k, r))
                m = model_of("sim")
                sims.append(
                    {
                        "ttft": await ttft(gateway, m, args.requests),
                        "wrk": wrk(gateway, CONCURRENCY, args.seconds, request_body(m)),
                    }
                )
        finally:
            for child in reversed(children):
                await procs.stop(child)

    print(
        f"\n`openai` bridge benchmark: SIMULATED OpenAI-compatible backends ({CHUNKS} content "
        "chunks per stream), direct vs through Nebula, alternating rounds; "
        f"{os.cpu_count()} cores shared by backend, gateway, worker, nats-server and client\n"
    )
    print(
        "| backend | TTFT p50 / p99 direct (ms) | TTFT p50 / p99 Nebula (ms) | added p50 (ms) | "
        f"req/s direct c={CONCURRENCY} | req/s Nebula c={CONCURRENCY} | ratio | "
        "wrk p50 / p99 Nebula (ms) | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows:
        d, n, dw, nw = r["d_ttft"], r["n_ttft"], r["d_wrk"], r["n_wrk"]
        print(
            f"| {k} | {d[0]:.2f} / {d[1]:.2f} | {n[0]:.2f} / {n[1]:.2f} | {n[0] - d[0]:.2f} | "
            f"{dw['rps']:.0f} | {nw['rps']:.0f} | {nw['rps'] / dw['rps']:.2f}x | "
            f"{nw['p50']:.2f} / {nw['p99']:.2f} | {int(dw['errors'] + nw['errors'])} |"
        )
    for s_ in sims:
        t, w = s_["ttft"], s_["wrk"]
        print(
            f"| (fabric alone: sim engine) | | {t[0]:.2f} / {t[1]:.2f} | | | {w['rps']:.0f} | | "
            f"{w['p50']:.2f} / {w['p99']:.2f} | {int(w['errors'])} |"
        )
    print("\nCPU per request through Nebula (ms, during its wrk run); the bridge engine alone:\n")
    names = list(rows[0][1]["cpu"])
    print(
        "| backend | "
        + " | ".join(names)
        + f" | engine alone: req/s c={CONCURRENCY} | engine alone: CPU ms/request |"
    )
    print("|---" * (len(names) + 3) + "|")
    for k, r in rows:
        alone = f" | {r['alone'][0]:.0f} | {r['alone'][1]:.3f} |"
        print(f"| {k} | " + " | ".join(f"{r['cpu'][n_]:.2f}" for n_ in names) + alone)
    print()
    for k in kinds:
        mine_rows = [r for kk, r in rows if kk == k]
        added = [r["n_ttft"][0] - r["d_ttft"][0] for r in mine_rows]
        ratio = [r["n_wrk"]["rps"] / r["d_wrk"]["rps"] for r in mine_rows]
        print(
            f"{k}: added TTFT p50 {min(added):.2f}-{max(added):.2f} ms "
            f"(median {statistics.median(added):.2f}); Nebula/direct req/s at c={CONCURRENCY} "
            f"{min(ratio):.2f}-{max(ratio):.2f}x (median {statistics.median(ratio):.2f}x)"
        )
    sim_ttft = [s_["ttft"][0] for s_ in sims]
    print(
        f"fabric alone (sim engine): TTFT p50 {min(sim_ttft):.2f}-{max(sim_ttft):.2f} ms, "
        f"{min(s_['wrk']['rps'] for s_ in sims):.0f}-{max(s_['wrk']['rps'] for s_ in sims):.0f} "
        f"req/s at c={CONCURRENCY}"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if "--serve-backend" in sys.argv:
        i = sys.argv.index("--serve-backend")
        serve_backend(sys.argv[i + 1], int(sys.argv[i + 2]))
    else:
        uvloop.run(main())
