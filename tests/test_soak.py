"""A 30-second soak at moderate concurrency: zero errors, nothing leaked."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.conftest import Fabric

SOAK_SECONDS = float(os.environ.get("NEBULA_SOAK_SECONDS", "30"))


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 60)
async def test_soak(fabric: Fabric, unique: str) -> None:
    model = f"soak-{unique}"
    gw = await fabric.gateway()
    await fabric.worker(model, max_concurrency=8, itl_ms=1, max_tokens=24)
    await fabric.worker(model, max_concurrency=8, itl_ms=1, max_tokens=24)
    client = await fabric.client(gw)
    assert gw.gateway is not None
    nc = gw.gateway.nc
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "w"}])
    subs_before = len(nc._subs)
    tasks_before = len(asyncio.all_tasks())

    ok = 0
    errors: list[BaseException] = []
    stop_at = time.monotonic() + SOAK_SECONDS

    async def user(i: int) -> None:
        nonlocal ok
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            msgs = [{"role": "user", "content": f"user {i} turn {n}"}]
            try:
                if n % 3:
                    stream = await client.chat.completions.create(
                        model=model,
                        messages=msgs,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    chunks = [c async for c in stream]
                    assert chunks[-1].usage is not None
                    assert chunks[-1].usage.completion_tokens == 24
                else:
                    r = await client.chat.completions.create(model=model, messages=msgs)
                    assert r.usage is not None and r.usage.completion_tokens == 24
                ok += 1
            except Exception as e:
                errors.append(e)

    await asyncio.gather(*[user(i) for i in range(16)])
    print(
        f"soak: {ok} requests in {SOAK_SECONDS:.0f}s ({ok / SOAK_SECONDS:.0f}/s), "
        f"{len(errors)} errors"
    )
    assert not errors, errors[:3]
    assert ok > 100
    await asyncio.sleep(0.2)
    assert gw.gateway.dispatcher.calls == {}
    assert len(nc._subs) == subs_before
    assert len(asyncio.all_tasks()) <= tasks_before + 2
