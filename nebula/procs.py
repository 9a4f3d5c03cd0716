"""Child processes: started with a parent-death signal, stopped in order, never left behind."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO

from nebula.service import await_chain

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (a ``preexec_fn``: it
    runs in the child between fork and exec)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def nebula_argv(*args: str, python: str | None = None) -> list[str]:
    """The command line of a Nebula subcommand, run by this same interpreter unless
    ``python`` names another (which must have Nebula installed)."""
    return [python or sys.executable, "-m", "nebula.cli", *args]


async def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
) -> asyncio.subprocess.Process:
    """Own session (so a terminal's Ctrl-C reaches only the parent, which stops children
    in order) and a parent-death signal (so a killed parent leaves no orphans)."""
    out: IO[bytes] | None = open(log_file, "ab") if log_file else None
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    finally:
        if out is not None:
            out.close()


def kill_group(pid: int) -> None:
    """SIGKILL what is left of the process group a child led (``spawn`` gives each child
    its own session): processes it started, such as vLLM's engine core, die with it.
    Call it once the child has exited; a group that is already empty is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def wait_group(proc: asyncio.subprocess.Process) -> int:
    """Wait for a child to exit, then clear its process group."""
    code = await proc.wait()
    kill_group(proc.pid)
    return code


async def stop(proc: asyncio.subprocess.Process, timeout: float = 15.0) -> int:
    """SIGTERM, wait (the child drains), then SIGKILL; then its process group."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    kill_group(proc.pid)
    return proc.returncode or 0


async def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop_event)``; SIGINT/SIGTERM set the event so main can shut down in order."""
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
    # SIGUSR1: every task's stack to stderr, for a process that seems stuck.
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    try:
        await main(stop_event)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def _dump_tasks() -> None:
    print_tasks("SIGUSR1")


def print_tasks(why: str) -> None:
    """Every asyncio task's await chain, to stderr."""
    tasks = asyncio.all_tasks()
    print(f"--- {why}: {len(tasks)} asyncio tasks ---", file=sys.stderr)
    for task in tasks:
        print(await_chain(task), file=sys.stderr)
    sys.stderr.flush()
