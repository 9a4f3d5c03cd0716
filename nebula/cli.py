"""The ``nebula`` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from nebula.errors import NebulaError
from nebula.settings import (
    DEFAULT_MAX_BODY,
    DEFAULT_NATS_PORT,
    DEFAULT_NATS_URL,
    EmbeddedNatsSettings,
    GatewaySettings,
    NatsSettings,
    WorkerSettings,
    default_data_dir,
)

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
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Nebula: an OpenAI-compatible inference fabric over NATS JetStream."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def gateway_options(f: F) -> F:
    opts = [
        click.option("--host", default="127.0.0.1", show_default=True, envvar="NEBULA_HOST"),
        click.option("--port", default=8000, show_default=True, type=int, envvar="NEBULA_PORT"),
        click.option(
            "--max-queue",
            default=256,
            show_default=True,
            type=click.IntRange(min=1),
            help="Jobs that may wait per model before requests get 429.",
        ),
        click.option(
            "--max-body-bytes",
            default=DEFAULT_MAX_BODY,
            show_default=True,
            type=click.IntRange(min=1024),
            help="Larger request bodies get 413.",
        ),
        click.option(
            "--dispatch-timeout",
            default=30.0,
            show_default=True,
            type=click.FloatRange(min=0.1),
            help="Seconds a job may wait for a worker (then 503 or 504).",
        ),
        click.option(
            "--keepalive-timeout",
            default=5.0,
            show_default=True,
            type=click.FloatRange(min=0.5),
            help="Silence after which a worker is considered dead.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _gateway_settings(kw: dict[str, Any]) -> GatewaySettings:
    return GatewaySettings(
        host=kw["host"],
        port=kw["port"],
        max_queue=kw["max_queue"],
        max_body_bytes=kw["max_body_bytes"],
        dispatch_timeout=kw["dispatch_timeout"],
        keepalive_timeout=kw["keepalive_timeout"],
    )


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


def worker_options(f: F) -> F:
    opts = [
        click.option("--model", required=True, help="Model name clients ask for."),
        click.option(
            "--engine", type=click.Choice(["sim", "openai"]), default="sim", show_default=True
        ),
        click.option(
            "--max-concurrency",
            default=8,
            show_default=True,
            type=click.IntRange(min=1),
            help="Jobs this worker runs at once.",
        ),
        click.option(
            "--ttft-ms",
            default=0.0,
            show_default=True,
            type=float,
            help="sim: time to first token.",
        ),
        click.option(
            "--itl-ms", default=0.0, show_default=True, type=float, help="sim: inter-token latency."
        ),
        click.option(
            "--max-tokens",
            default=16,
            show_default=True,
            type=int,
            help="sim: tokens when the request sets no limit.",
        ),
        click.option(
            "--upstream-url", default=None, help="openai: base URL such as http://127.0.0.1:8001/v1"
        ),
        click.option("--upstream-api-key", default=None, envvar="NEBULA_UPSTREAM_API_KEY"),
        click.option(
            "--upstream-model", default=None, help="openai: model name upstream (default: --model)."
        ),
        click.option("--worker-id", default=None, hidden=True),
        click.option("--node-id", default="", hidden=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@nats_url_option
@worker_options
def worker(nats_url: str, **kw: Any) -> None:
    """Run one engine worker for one model."""
    from nebula.procs import run_until_signal
    from workers.runner import WorkerProcess, build_engine

    options = {
        "ttft_ms": str(kw["ttft_ms"]),
        "itl_ms": str(kw["itl_ms"]),
        "max_tokens": str(kw["max_tokens"]),
        "upstream_url": kw["upstream_url"] or "",
        "upstream_api_key": kw["upstream_api_key"] or "",
        "upstream_model": kw["upstream_model"] or "",
    }

    async def serve(stop: asyncio.Event) -> None:
        engine = build_engine(kw["engine"], options, max_concurrency=kw["max_concurrency"])
        settings = WorkerSettings(
            model=kw["model"], max_concurrency=kw["max_concurrency"], worker_id=kw["worker_id"]
        )
        async with WorkerProcess(settings, _nats(nats_url), engine, node_id=kw["node_id"]) as wp:
            assert wp.worker is not None
            click.echo(
                f"nebula worker {wp.worker.worker_id}: serving {kw['model']!r} "
                f"with the {kw['engine']} engine",
                err=True,
            )
            await stop.wait()

    _run(run_until_signal(serve))


@main.command("nats")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "nats_port", default=DEFAULT_NATS_PORT, show_default=True, type=int)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="JetStream store (default: a per-user data folder).",
)
def nats_cmd(host: str, nats_port: int, data_dir: Path | None) -> None:
    """Run the embedded NATS server (JetStream on) with the config from nats/."""
    from nebula.embedded import EmbeddedNats
    from nebula.procs import run_until_signal

    data = data_dir or default_data_dir()

    async def serve(stop: asyncio.Event) -> None:
        settings = EmbeddedNatsSettings(host=host, port=nats_port, store_dir=data / "nats")
        async with EmbeddedNats(settings, log_file=data / "nats.log") as server:
            click.echo(f"nebula nats: {server.url} (store {settings.store_dir})", err=True)
            await stop.wait()

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
@gateway_options
def up(demo: bool, nats_url: str | None, nats_port: int, data_dir: Path | None, **kw: Any) -> None:
    """Everything on one machine: NATS, gateway (and with --demo a sim-chat worker)."""
    from nebula.procs import run_until_signal
    from nebula.up import Stack

    stack = Stack(
        gateway=_gateway_settings(kw),
        nats_url=nats_url,
        nats_port=nats_port,
        data_dir=data_dir or default_data_dir(),
        demo=demo,
        echo=lambda line: click.echo(line, err=True),
    )
    _run(run_until_signal(stack.run))


if __name__ == "__main__":
    main()
