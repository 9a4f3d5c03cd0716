"""The ``nebula`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from nebula import logs
from nebula.admin import ClusterAdmin, ModelStatus, NodeStatus
from nebula.cli_options import options_from, take
from nebula.errors import EngineError, NebulaError, Unavailable
from nebula.logs import FORMATS
from nebula.settings import (
    DEFAULT_NATS_PORT,
    DEFAULT_NATS_URL,
    EmbeddedNatsSettings,
    GatewaySettings,
    NatsSettings,
    NodeSettings,
    SchedulerSettings,
    WorkerSettings,
    default_data_dir,
)
from workers.engines.registry import ENGINES

F = TypeVar("F", bound=Callable[..., Any])


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when present; Nebula errors end with one clear line, not a traceback."""
    try:
        try:
            import uvloop

            uvloop.run(coro)
        except ImportError:
            asyncio.run(coro)
    except NebulaError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def nats_url_option(f: F) -> F:
    return click.option(
        "--nats-url",
        envvar="NEBULA_NATS_URL",
        default=DEFAULT_NATS_URL,
        show_default=True,
        help="NATS server (or comma-separated cluster URLs).",
    )(f)


def _nats(url: str) -> NatsSettings:
    return NatsSettings.from_env(url=url)


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option(
    "--log-level",
    envvar="NEBULA_LOG_LEVEL",
    default=None,
    help="Level, optionally per component: `info` or `warning,gateway=debug,workers=info` "
    "(logger prefixes). [env: NEBULA_LOG_LEVEL; default: warning]",
)
@click.option(
    "--log-format",
    envvar="NEBULA_LOG_FORMAT",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="text (readable) or json (one object per line). [env: NEBULA_LOG_FORMAT]",
)
@click.option(
    "--log-file",
    envvar="NEBULA_LOG_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Append logs to this file instead of stderr. [env: NEBULA_LOG_FILE]",
)
@click.pass_context
def main(
    ctx: click.Context, verbose: int, log_level: str | None, log_format: str, log_file: Path | None
) -> None:
    """Nebula: an OpenAI-compatible inference fabric over NATS JetStream."""
    level = log_level or ("warning", "info", "debug")[min(verbose, 2)]
    try:
        logs.configure(
            component=ctx.invoked_subcommand or "nebula", level=level, fmt=log_format, file=log_file
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--log-level") from None
    # Child processes (nebula up's children, a node agent's workers) log alike: they
    # read the same variables. The file is per process, so it is not passed on.
    os.environ["NEBULA_LOG_LEVEL"] = level
    os.environ["NEBULA_LOG_FORMAT"] = log_format


gateway_options = options_from(GatewaySettings)


def _gateway_settings(kw: dict[str, Any]) -> GatewaySettings:
    return GatewaySettings.from_env(**take(GatewaySettings, kw))


@main.command()
@nats_url_option
@gateway_options
def gateway(nats_url: str, **kw: Any) -> None:
    """Run the OpenAI-compatible HTTP gateway."""
    from gateway.server import GatewayServer
    from nebula.procs import run_until_signal

    async def serve(stop: asyncio.Event) -> None:
        async with GatewayServer(_gateway_settings(kw), _nats(nats_url)) as server:
            click.echo(f"nebula gateway: OpenAI API on {server.base_url}/v1", err=True)
            waiter = asyncio.ensure_future(server.wait_closed())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()

    _run(run_until_signal(serve))


def engine_options(f: F) -> F:
    """Every engine kind's flags (from the engine registry), for `worker` and `model load`."""
    for opt in reversed(ENGINES.options()):
        f = click.option(opt.flag, type=opt.type, default=None, help=opt.help, envvar=opt.env)(f)
    return f


def _engine_options(kw: dict[str, Any]) -> dict[str, str]:
    """The engine flags that were given, as the string options engines and specs carry."""
    out = {}
    for key in (o.name for o in ENGINES.options()):
        value = kw.pop(key, None)
        if value is not None:
            out[key] = f"{value:g}" if isinstance(value, float) else str(value)
    return out


@main.command()
@nats_url_option
@click.option("--model", required=True, help="Model name clients ask for.")
@click.option("--engine", type=click.Choice(ENGINES.names), default="sim", show_default=True)
@click.option("--model-path", default=None, help="Weights directory or hub id for the engine.")
@click.option("--gpu-memory", default=0.0, type=float, help="Fraction of one GPU (0: CPU).")
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME=PATH",
    help="LoRA adapter served as model NAME (repeatable; engines that take adapters: vllm).",
)
@options_from(WorkerSettings)
@engine_options
@click.option("--worker-id", default=None, hidden=True)
@click.option("--node-id", default="", hidden=True)
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
def worker(nats_url: str, **kw: Any) -> None:
    """Run one engine worker for one model (`-- args` go to the engine: vLLM's flags)."""
    from nebula.procs import run_until_signal
    from workers.runner import WorkerProcess, build_engine

    options = _engine_options(kw)
    wkw = take(WorkerSettings, kw)
    if wkw.get("max_concurrency") is None and "NEBULA_MAX_CONCURRENCY" not in os.environ:
        wkw["max_concurrency"] = 0  # not given: the engine's own slots (vLLM's --max-num-seqs)
    settings = WorkerSettings.from_env(model=kw["model"], worker_id=kw["worker_id"], **wkw)
    try:  # bad engine flags fail here, at once, before anything loads
        engine = build_engine(
            kw["engine"],
            options,
            model=kw["model"],
            max_concurrency=settings.max_concurrency or None,
            model_path=kw["model_path"],
            engine_args=tuple(kw["engine_args"]),
            gpu_memory=kw["gpu_memory"],
            adapters=_adapters(kw["loras"]),
        )
    except NebulaError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(1)

    broken = ""

    async def serve(stop: asyncio.Event) -> None:
        nonlocal broken
        async with WorkerProcess(settings, _nats(nats_url), engine, node_id=kw["node_id"]) as wp:
            assert wp.worker is not None
            # The loaded model (torch, transformers: millions of objects) lives as long as
            # this process: keep it out of the collector's full passes, each of which
            # walked all of it holding the GIL (measured with the hf engine: 0.3 s of CPU
            # per pass, the engine's forward pass stalled meanwhile).
            gc.freeze()
            click.echo(
                f"nebula worker {wp.worker.worker_id}: serving {kw['model']!r} "
                f"with the {kw['engine']} engine",
                err=True,
            )
            stopping = asyncio.ensure_future(stop.wait())
            hung = asyncio.ensure_future(wp.worker.broken.wait())
            await asyncio.wait({stopping, hung}, return_when=asyncio.FIRST_COMPLETED)
            for f in (stopping, hung):
                f.cancel()
            broken = wp.worker.broken_reason

    _run(run_until_signal(serve))
    gc.unfreeze()  # collectable again at exit (native bindings report what is left as leaks)
    if broken:  # a hung engine: exit non-zero, so the node agent restarts this worker
        click.echo(f"error: {broken}", err=True)
        sys.exit(3)


@main.command("nats")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "nats_port", default=DEFAULT_NATS_PORT, show_default=True, type=int)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="JetStream store (default: a per-user data folder).",
)
@click.option("--cluster", "cluster_name", default=None, help="Join a NATS cluster of this name.")
@click.option(
    "--routes",
    default="",
    help="Cluster members to connect to: nats-route://host:6222,... (with --cluster).",
)
@click.option("--cluster-port", default=6222, show_default=True, type=int, help="Route port.")
@click.option("--server-name", default=None, help="This member's unique name (with --cluster).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="A nats-server config file instead of nats/nebula.conf (e.g. nats/local-cluster/).",
)
def nats_cmd(
    host: str,
    nats_port: int,
    data_dir: Path | None,
    cluster_name: str | None,
    routes: str,
    cluster_port: int,
    server_name: str | None,
    config_file: Path | None,
) -> None:
    """Run the embedded NATS server (JetStream on) with the config from nats/.

    With --cluster it is one member of a NATS cluster (three for replicated
    streams): e.g. on each of three machines
    `nebula nats --cluster nebula --server-name n1 --routes nats-route://h1:6222,...`.
    """
    from nebula.embedded import EmbeddedNats
    from nebula.procs import run_until_signal
    from nebula.up import describe_exit

    data = data_dir or default_data_dir()
    if routes and not cluster_name:
        raise click.UsageError("--routes needs --cluster NAME")

    async def serve(stop: asyncio.Event) -> None:
        settings = EmbeddedNatsSettings(
            host=host,
            port=nats_port,
            store_dir=data / "nats",
            config_file=config_file,
            server_name=server_name,
            cluster_name=cluster_name,
            cluster_port=cluster_port,
            routes=tuple(r.strip() for r in routes.split(",") if r.strip()),
        )
        async with EmbeddedNats(settings, log_file=data / "nats.log") as server:
            click.echo(f"nebula nats: {server.url} (store {settings.store_dir})", err=True)
            assert server.proc is not None
            died = asyncio.ensure_future(server.proc.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait((died, stopper), return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if died.done():  # the wrapper must not outlive its server
                raise Unavailable(
                    f"nats-server exited with {describe_exit(died.result())}; "
                    f"see {data / 'nats.log'}"
                )
            died.cancel()

    _run(run_until_signal(serve))


@main.command()
@click.option("--demo", is_flag=True, help="Also serve the simulated chat model `sim-chat`.")
@click.option(
    "--nats-url",
    default=None,
    envvar="NEBULA_NATS_URL",
    help="Use this NATS instead of starting an embedded one.",
)
@click.option("--nats-port", default=DEFAULT_NATS_PORT, show_default=True, type=int)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where NATS data and logs go (default: a per-user data folder).",
)
@click.option("--gpus", default=None, help="Simulated GPUs for the local node, e.g. 2x80GiB.")
@click.option("--node-id", default=None, help="Local node id (default: host name).")
@gateway_options
@click.pass_context
def up(
    ctx: click.Context,
    demo: bool,
    nats_url: str | None,
    nats_port: int,
    data_dir: Path | None,
    gpus: str | None,
    node_id: str | None,
    **kw: Any,
) -> None:
    """Everything on one machine: NATS, gateway, scheduler, node agent (--demo: sim-chat)."""
    from nebula.procs import run_until_signal
    from nebula.up import Stack

    if ctx.get_parameter_source("nats_port") is click.core.ParameterSource.COMMANDLINE:
        nats_url = None  # an explicit --nats-port means: run an embedded NATS
    stack = Stack(
        gateway=_gateway_settings(kw),
        nats_url=nats_url,
        nats_port=nats_port,
        data_dir=data_dir or default_data_dir(),
        demo=demo,
        echo=lambda line: click.echo(line, err=True),
        gpus=gpus,
        node_id=node_id,
    )
    _run(run_until_signal(stack.run))


# --- control plane ------------------------------------------------------------


@contextlib.asynccontextmanager
async def _admin(nats_url: str) -> AsyncIterator[ClusterAdmin]:
    from nebula import natsio

    settings = _nats(nats_url)
    try:
        nc = await natsio.connect(settings, name="nebula-cli", connect_timeout=3.0)
    except NebulaError as e:
        raise Unavailable(f"{e.message} (is `nebula up` or `nebula nats` running?)") from None
    try:
        yield await ClusterAdmin.open(nc, settings)
    finally:
        await natsio.close_connection(nc)


@main.group()
def model() -> None:
    """Load, unload and list models (desired state in JetStream KV)."""


@model.command("load")
@click.argument("name")
@nats_url_option
@click.option("--engine", required=True, help=f"{' | '.join(ENGINES.names)}.")
@click.option("--model-path", default=None, help="Weights directory or hub id for the engine.")
@click.option("--replicas", default=1, show_default=True, type=int)
@click.option(
    "--gpu-memory",
    default=0.0,
    show_default=True,
    type=float,
    help="Fraction of one GPU per replica (0 = CPU engine).",
)
@click.option(
    "--max-concurrency",
    default=None,
    type=int,
    help="Jobs each replica runs at once [default: the engine's slots: vLLM's --max-num-seqs, "
    "else 8].",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only place on nodes with this label (repeatable).",
)
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests that may wait for this model (then 429), for every gateway alike.",
)
@click.option(
    "--max-queue-bytes",
    default=16 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bytes of requests that may wait for this model (then 429).",
)
@click.option(
    "--max-output-tokens",
    default=32768,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest max_tokens a request may ask for (400 beyond).",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME=PATH",
    help="LoRA adapter served as model NAME (repeatable; engines that take adapters: vllm).",
)
@click.option(
    "--migrate",
    default=0,
    show_default=True,
    type=click.IntRange(min=0, max=3),
    help="Request migration: continuations a stream may get on another replica when "
    "its worker dies mid-answer (0: off; never for guided decoding, tools or n>1).",
)
@engine_options
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every replica is Ready (or Failed).",
)
@click.option("--timeout", default=300.0, show_default=True, type=float)
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
def model_load(name: str, nats_url: str, **kw: Any) -> None:
    """Load model NAME: `nebula model load NAME --engine sim [-- engine args...]`."""
    from nebula.admin import LoadRequest
    from nebula.settings import parse_labels

    options = _engine_options(kw)

    async def go() -> None:
        req = LoadRequest(
            name=name,
            engine=kw["engine"],
            model_path=kw["model_path"],
            replicas=kw["replicas"],
            gpu_memory=kw["gpu_memory"],
            max_concurrency=kw["max_concurrency"],
            labels=parse_labels(kw["labels"]),
            engine_args=list(kw["engine_args"]),
            engine_options=options,
            max_queue=kw["max_queue"],
            max_queue_bytes=kw["max_queue_bytes"],
            max_output_tokens=kw["max_output_tokens"],
            adapters=_adapters(kw["loras"]),
            migrate=kw["migrate"],
        )
        async with _admin(nats_url) as admin:
            await admin.load(req)
            click.echo(f"loading {name!r} ({req.engine}, {req.replicas} replica(s))")
            if kw["wait"]:
                await _wait_ready(admin, name, kw["timeout"])

    _run(go())


async def _wait_ready(admin: ClusterAdmin, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        status = next((m for m in await admin.models() if m.name == name), None)
        if status is not None:
            line = f"{status.state} {status.ready}/{status.replicas}" + (
                f": {status.reason}" if status.reason else ""
            )
            if line != last:
                click.echo(f"  {line}")
                last = line
            if status.state == "Ready":
                return
            if status.state == "Failed":
                raise EngineError(f"model {name!r} failed to start: {status.reason}")
        await asyncio.sleep(0.5)
    raise Unavailable(f"model {name!r} not ready after {timeout:.0f}s ({last})")


@model.command("unload")
@click.argument("name")
@nats_url_option
def model_unload(name: str, nats_url: str) -> None:
    """Unload model NAME: its replicas drain in-flight requests and stop."""

    async def go() -> None:
        async with _admin(nats_url) as admin:
            await admin.unload(name)
        click.echo(f"unloading {name!r}")

    _run(go())


def _adapters(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {pair!r}", param_hint="--lora")
        out[name] = path
    return out


@model.group("adapter")
def model_adapter() -> None:
    """LoRA adapters of a loaded model, added and removed at run time."""


@model_adapter.command("add")
@click.argument("model_name", metavar="MODEL")
@click.argument("name")
@click.argument("path")
@nats_url_option
def adapter_add(model_name: str, name: str, path: str, nats_url: str) -> None:
    """Serve adapter NAME (a LoRA directory at PATH on the nodes) on MODEL's replicas."""

    async def go() -> None:
        async with _admin(nats_url) as admin:
            await admin.add_adapter(model_name, name, path)
        click.echo(f"adapter {name!r} added to {model_name!r}: replicas load it now")

    _run(go())


@model_adapter.command("remove")
@click.argument("model_name", metavar="MODEL")
@click.argument("name")
@nats_url_option
def adapter_remove(model_name: str, name: str, nats_url: str) -> None:
    """Stop serving adapter NAME; MODEL's replicas unload it."""

    async def go() -> None:
        async with _admin(nats_url) as admin:
            await admin.remove_adapter(model_name, name)
        click.echo(f"adapter {name!r} removed from {model_name!r}")

    _run(go())


# Xinference users type launch/terminate.
model.add_command(model_load, "launch")
model.add_command(model_unload, "terminate")


@model.command("list")
@nats_url_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def model_list(nats_url: str, as_json: bool) -> None:
    """Desired models with replicas wanted/ready, state and nodes."""

    async def go() -> None:
        async with _admin(nats_url) as admin:
            models = await admin.models()
        if as_json:
            click.echo(msgspec.json.encode(models).decode())
            return
        rows = [
            [m.name, m.engine, f"{m.ready}/{m.replicas}",
             m.state + (f" ({m.reason})" if m.reason else ""), f"{m.queued}/{m.max_queue}",
             ",".join(m.nodes) or "-"]
            for m in models
        ]  # fmt: skip
        click.echo(_table(["MODEL", "ENGINE", "READY", "STATE", "QUEUED", "NODES"], rows))

    _run(go())


@main.group()
def cluster() -> None:
    """Cluster views."""


@cluster.command("status")
@nats_url_option
@click.option(
    "--gateway-url",
    envvar="NEBULA_GATEWAY_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Gateway(s) whose /metrics give request rates and TTFT (comma-separated).",
)
@click.option("--watch", is_flag=True, help="A live view, refreshed every --interval seconds.")
@click.option("--interval", default=2.0, show_default=True, type=float)
@click.option("--json", "as_json", is_flag=True)
def cluster_status(
    nats_url: str, gateway_url: str, watch: bool, interval: float, as_json: bool
) -> None:
    """Nodes (heartbeat, GPUs, memory, placements), models (replicas, queue depth, dead
    letters) and traffic per model from the gateways (req/s, TTFT p50/p99)."""
    import httpx

    from nebula import status as st

    urls = [u.strip() for u in gateway_url.split(",") if u.strip()]

    async def go() -> None:
        prev: dict[str, st.GatewayScrape] = {}
        live: Any = None
        async with _admin(nats_url) as admin, httpx.AsyncClient(timeout=2.0) as http:
            try:
                while True:
                    scrapes = [await st.scrape(http, u) for u in urls]
                    report = st.ClusterStatus(
                        nodes=await admin.nodes(),
                        models=await admin.models(),
                        gateways=[st.combine(c, prev.get(c.url)) for c in scrapes],
                    )
                    prev = {c.url: c for c in scrapes}
                    if as_json:
                        click.echo(msgspec.json.encode(report).decode())
                    elif watch and live is None:
                        from rich.live import Live

                        live = Live(st.render(report), auto_refresh=False, screen=False)
                        live.start()
                    elif watch:
                        live.update(st.render(report), refresh=True)
                    else:
                        click.echo(_render_status(report.nodes, report.models))
                    if not watch:
                        return
                    await asyncio.sleep(interval)
            finally:
                if live is not None:
                    live.stop()

    _run(go())


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}G"


def _render_status(nodes: list[NodeStatus], models: list[ModelStatus]) -> str:
    node_rows = []
    for n in nodes:
        gpus = (
            " ".join(
                f"gpu{g.index}:{_gib(g.memory_free)}/{_gib(g.memory_total)}"
                f"(alloc {n.gpu_allocated.get(g.index, 0):.2f})"
                for g in n.info.gpus
            )
            or "cpu only"
        )
        node_rows.append([
            n.node_id, f"{n.heartbeat_age:.1f}s", gpus, str(n.info.cpu_count),
            f"{_gib(n.info.memory_free)}/{_gib(n.info.memory_total)}",
            ", ".join(n.placements) or "-",
        ])  # fmt: skip
    model_rows = [
        [m.name, f"{m.ready}/{m.replicas}", m.state + (f" ({m.reason})" if m.reason else ""),
         f"{m.queued}/{m.max_queue}", str(m.batch_queued), str(m.dead_letters),
         ",".join(m.nodes) or "-"]
        for m in models
    ]  # fmt: skip
    return (
        f"NODES ({len(nodes)})\n"
        + _table(["NODE", "HEARTBEAT", "GPUS free/total", "CPUS", "MEM free/total",
                  "PLACEMENTS"], node_rows)
        + f"\n\nMODELS ({len(models)})\n"
        + _table(["MODEL", "READY", "STATE", "QUEUED", "BATCH", "DEAD", "NODES"], model_rows)
    )  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "  ".join(header) + "\n(none)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


@main.command()
@nats_url_option
@options_from(SchedulerSettings)
def scheduler(nats_url: str, **kw: Any) -> None:
    """Run a scheduler (several may run: one leads, the others stand by)."""
    from nebula import natsio
    from nebula.metrics import serve_metrics
    from nebula.procs import run_until_signal
    from nebula.scheduler import Scheduler

    settings = SchedulerSettings.from_env(**take(SchedulerSettings, kw))
    if settings.strategy not in ("binpack", "spread"):
        raise click.BadParameter("binpack or spread", param_hint="--strategy")

    async def serve(stop: asyncio.Event) -> None:
        nc = await natsio.connect(_nats(nats_url), name="nebula-scheduler")
        metrics = None
        try:
            async with Scheduler(nc, settings, nats_settings=_nats(nats_url)) as sched:
                metrics = await serve_metrics(
                    sched.registry, settings.metrics_host, settings.metrics_port, "scheduler"
                )
                click.echo(f"nebula scheduler ({settings.strategy}) on {nats_url}", err=True)
                await stop.wait()
        finally:
            if metrics is not None:
                await metrics.close()
            await natsio.close_connection(nc)

    _run(run_until_signal(serve))


@main.command()
@nats_url_option
@options_from(NodeSettings, exclude=("labels", "simulated_gpus"))
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Node label, matched by `model load --label` (repeatable). [env: NEBULA_NODE_LABELS]",
)
@click.option(
    "--gpus",
    "simulated_gpus",
    default=None,
    help="Simulated GPUs instead of NVML: 2x80GiB or 80GiB,40GiB. [env: NEBULA_SIMULATED_GPUS]",
)
def node(nats_url: str, labels: tuple[str, ...], **kw: Any) -> None:
    """Run the node agent: inventory, heartbeats, one worker process per placement."""
    from nebula.metrics import serve_metrics
    from nebula.procs import run_until_signal
    from nebula.settings import NodeSettings, parse_labels
    from workers.node import NodeAgent

    overrides = take(NodeSettings, kw)
    if labels:
        overrides["labels"] = parse_labels(labels)
    settings = NodeSettings.from_env(**overrides)

    async def serve(stop: asyncio.Event) -> None:
        async with NodeAgent(settings, _nats(nats_url)) as agent:
            metrics = await serve_metrics(
                agent.registry,
                settings.metrics_host,
                settings.metrics_port,
                f"node {agent.node_id}",
            )
            click.echo(f"nebula node {agent.node_id} on {nats_url}", err=True)
            try:
                await stop.wait()
            finally:
                if metrics is not None:
                    await metrics.close()

    _run(run_until_signal(serve))


# --- logs -------------------------------------------------------------------------


@main.command("logs")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    envvar="NEBULA_DATA_DIR",
    help="Data folder of `nebula up` (its logs/ folder is read). [default: per-user data]",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option(
    "--component",
    default=None,
    help="gateway | scheduler | node | nats | worker (every worker) | worker:<file>.",
)
@click.option("--request-id", default=None, help="Only lines about this request.")
@click.option("-n", "--lines", default=None, type=int, help="Only the last N lines first.")
def logs_cmd(
    data_dir: Path | None,
    follow: bool,
    component: str | None,
    request_id: str | None,
    lines: int | None,
) -> None:
    """Every log file of `nebula up` (gateway, scheduler, node, nats, workers), merged in
    time order; each line is prefixed with its component."""
    root = (data_dir or default_data_dir()) / "logs"
    if not root.is_dir():
        raise click.ClickException(f"no logs in {root} (is that the data dir of `nebula up`?)")
    found, offsets = logs.merged(root, component=component, request_id=request_id)
    if lines is not None:
        found = found[-lines:] if lines > 0 else []
    width = max((len(ln.component) for ln in found), default=9)
    for ln in found:
        click.echo(f"{ln.component:<{width}} | {ln.text}")
    while follow:
        try:
            time.sleep(0.25)
        except KeyboardInterrupt:
            return
        for ln in logs.follow(root, offsets, component=component, request_id=request_id):
            click.echo(f"{ln.component:<{width}} | {ln.text}")


# --- batch jobs -----------------------------------------------------------------


@main.group()
def batch() -> None:
    """Batch jobs over NATS: submit, follow, resume, cancel."""


@batch.command("embed")
@click.argument("input_path", metavar="INPUT.jsonl", type=click.Path(path_type=Path, exists=True))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--model", required=True, help="An embedding model served by the fabric.")
@nats_url_option
@click.option("--quiet", is_flag=True, help="No progress line.")
def batch_embed(input_path: Path, output: Path, model: str, nats_url: str, quiet: bool) -> None:
    """Embed every row of INPUT.jsonl into OUTPUT; run it again to resume after a crash."""
    from nebula.batch import embed_file
    from nebula.client import BatchClient

    async def go() -> None:
        async with await BatchClient.connect(nats_url) as client:
            job, written, failed = await embed_file(client, input_path, output, model, quiet=quiet)
        click.echo(
            f"job {job.job_id}: {job.total} rows in {output} ({written} written now, "
            f"{failed} failed)",
            err=True,
        )

    _run(go())


@batch.command("status")
@click.argument("job_id")
@nats_url_option
def batch_status(job_id: str, nats_url: str) -> None:
    """Items done out of submitted, and the job's state."""
    from nebula.client import BatchClient

    async def go() -> None:
        async with await BatchClient.connect(nats_url) as client:
            st = await client.status(job_id)
        click.echo(
            f"job {job_id}  model {st.job.model}  state {st.job.state}  "
            f"done {st.done}/{st.job.total}  queued for the model {st.queued}"
        )

    _run(go())


@batch.command("cancel")
@click.argument("job_id")
@nats_url_option
def batch_cancel(job_id: str, nats_url: str) -> None:
    """Items not yet run end with a `cancelled` error result."""
    from nebula.client import BatchClient

    async def go() -> None:
        async with await BatchClient.connect(nats_url) as client:
            await client.cancel(job_id)
        click.echo(f"cancelling job {job_id}")

    _run(go())


if __name__ == "__main__":
    main()
