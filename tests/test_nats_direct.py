"""Anyone with a NATS client can submit jobs: the README's example, kept true."""

from __future__ import annotations

import asyncio
import json
import uuid

from nats.aio.client import Client

from nebula import subjects
from tests.conftest import Fabric


async def test_publish_job_with_plain_nats_py(fabric: Fabric, nc: Client, unique: str) -> None:
    model = f"direct/{unique}"
    await fabric.worker(model, max_tokens=5)
    # What a client in any language does (README, "NATS interface"):
    request_id = uuid.uuid4().hex
    reply = f"my.replies.{request_id}"
    frames: asyncio.Queue = asyncio.Queue()
    sub = await nc.subscribe(reply, cb=frames.put)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ack = await nc.jetstream().publish(
        subjects.req_subject(model),  # nebula.v1.req.direct_2F<unique>
        json.dumps(body).encode(),
        headers={"Nebula-Request-Id": request_id, "Nebula-Reply": reply,
                 "Nebula-Endpoint": "chat"},
    )  # fmt: skip
    assert ack.stream.startswith("NEBULA_REQ_")  # the model's own stream
    kinds, sse = [], b""
    while True:
        msg = await asyncio.wait_for(frames.get(), 5)
        kind = msg.headers["Nebula-Kind"]
        kinds.append(kind)
        sse += msg.data
        if kind in ("end", "error"):
            break
    await sub.unsubscribe()
    assert kinds[0] == "start" and kinds[-1] == "end"
    events = [line[6:] for line in sse.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert len(text.split()) == 5
    assert subjects.req_subject(model) == f"nebula.v1.req.direct_2F{unique}"
