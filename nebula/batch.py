"""``nebula batch embed INPUT.jsonl -o OUTPUT.jsonl --model NAME``: resumable batch runs.

Input rows are ``{"id": ..., "text": ...}`` or the OpenAI Batch format
(``{"custom_id", "method", "url", "body"}``, as ``vllm run-batch`` reads); the
output uses the matching format, one row per input row, in completion order.

Resuming: a state file beside the output (``OUTPUT.nebula.json``) keeps the job id
and how many rows were submitted. Run the same command again after a crash or
Ctrl-C: rows already in the output are kept (a half-written last line is
dropped), results stored in NATS meanwhile are written, and only rows never
submitted are submitted. Every input row ends with exactly one output row.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

from nebula.client import BatchClient, Result
from nebula.errors import InvalidRequest
from nebula.protocol import BatchJob


@dataclass(frozen=True, slots=True)
class Row:
    item_id: str
    body: bytes
    openai_format: bool


def read_rows(path: Path, model: str) -> list[Row]:
    """Validate every row before anything is submitted: a bad file fails at once."""
    rows: list[Row] = []
    seen: set[str] = set()
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InvalidRequest(f"{path}:{n}: not JSON: {e}", param="input") from None
            if not isinstance(obj, dict):
                raise InvalidRequest(f"{path}:{n}: a row must be an object", param="input")
            if "custom_id" in obj:
                item_id, body = str(obj["custom_id"]), obj.get("body")
                if not isinstance(body, dict) or "input" not in body:
                    raise InvalidRequest(f"{path}:{n}: body.input is missing", param="input")
                url = obj.get("url", "/v1/embeddings")
                if url != "/v1/embeddings":
                    raise InvalidRequest(f"{path}:{n}: url {url!r} is not /v1/embeddings")
                body = {**body, "model": model}
                openai_format = True
            elif "id" in obj and "text" in obj:
                item_id = str(obj["id"])
                if not isinstance(obj["text"], str):
                    raise InvalidRequest(f"{path}:{n}: text must be a string", param="text")
                body = {"input": obj["text"], "model": model}
                openai_format = False
            else:
                raise InvalidRequest(
                    f'{path}:{n}: a row needs "id" and "text", or OpenAI batch "custom_id"'
                )
            if item_id in seen:
                raise InvalidRequest(f"{path}:{n}: id {item_id!r} appears twice", param="id")
            seen.add(item_id)
            rows.append(Row(item_id, json.dumps(body).encode(), openai_format))
    return rows


class _Vector(msgspec.Struct):
    embedding: msgspec.Raw


class _Answer(msgspec.Struct):
    data: list[_Vector]


def output_row(row: Row, result: Result) -> bytes:
    """The output line, spliced from the stored answer's bytes (its vector is not
    decoded and encoded again)."""
    body = result.body if result.body[:1] == b"{" else b'{"error":{"message":"?"}}'
    rid = msgspec.json.encode(row.item_id)
    if row.openai_format:
        return b'{"id":"batch_req_%s","custom_id":%s,"response":{"status_code":%d,' \
            b'"request_id":%s,"body":%s},"error":null}\n' % (
                uuid.uuid4().hex.encode(), rid, result.status, rid, body
            )  # fmt: skip
    if result.ok:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, IndexError):
            vector = msgspec.json.decode(body, type=_Answer).data[0].embedding
            return b'{"id":%s,"embedding":%s}\n' % (rid, bytes(vector))
    obj: Any = msgspec.json.decode(body) if result.body[:1] == b"{" else {}
    error = obj.get("error", obj) if isinstance(obj, dict) else obj
    return msgspec.json.encode({"id": row.item_id, "error": error}) + b"\n"


def _is_failure(obj: dict[str, Any]) -> bool:
    if "custom_id" in obj:
        return bool(obj["response"]["status_code"] != 200)
    return "error" in obj


def _done_ids(output: Path) -> tuple[set[str], int]:
    """Ids already written (and how many failed); a half-written last line (killed
    mid-write) is cut off."""
    if not output.exists():
        return set(), 0
    data = output.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with output.open("r+b") as f:
            f.truncate(len(keep))
    done = set()
    failed = 0
    for line in keep.splitlines():
        obj = json.loads(line)
        done.add(str(obj.get("custom_id", obj.get("id"))))
        failed += _is_failure(obj)
    return done, failed


@dataclass
class _State:
    path: Path
    job_id: str
    model: str
    submitted: int = 0

    @classmethod
    def load(cls, path: Path, model: str) -> _State:
        if path.exists():
            raw = json.loads(path.read_text())
            if raw["model"] != model:
                raise InvalidRequest(
                    f"{path} belongs to a run for model `{raw['model']}`; remove it to start over"
                )
            return cls(path, raw["job_id"], raw["model"], int(raw.get("submitted", 0)))
        return cls(path, uuid.uuid4().hex, model)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"job_id": self.job_id, "model": self.model, "submitted": self.submitted})
        )
        os.replace(tmp, self.path)


class Progress:
    def __init__(self, total: int, out: TextIO, clock: Callable[[], float] = time.monotonic):
        self.total, self.out, self.clock = total, out, clock
        self.start = clock()
        self.last = 0.0
        self.base = 0

    def show(self, done: int, *, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self.last < 0.2:
            return
        self.last = now
        rate = (done - self.base) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "-"
        self.out.write(f"\r{done}/{self.total} items  {rate:,.0f} items/s  ETA {eta_text}   ")
        if final:
            self.out.write("\n")
        self.out.flush()


async def embed_file(
    client: BatchClient, input_path: Path, output: Path, model: str, *, quiet: bool = False
) -> tuple[BatchJob, int, int]:
    """Run (or resume) one file; returns (job, rows written now, failed rows in total)."""
    rows = read_rows(input_path, model)
    by_id = {r.item_id: r for r in rows}
    state = _State.load(output.with_name(output.name + ".nebula.json"), model)
    done, failed = _done_ids(output)
    job = await client.create(model, total=len(rows), job_id=state.job_id)
    state.save()
    progress = Progress(len(rows), sys.stderr)
    progress.base = len(done)
    written = 0
    with output.open("ab") as out:
        # Results that landed while we were away come first.
        async for result in client.results(job.job_id, follow=False):
            if result.item_id in by_id and result.item_id not in done:
                out.write(output_row(by_id[result.item_id], result))
                done.add(result.item_id)
                written += 1
                failed += not result.ok
        out.flush()
        start = state.submitted
        todo = [(i, r) for i, r in enumerate(rows[start:], start) if r.item_id not in done]

        def acked(n: int) -> None:
            # Rows before this index are in the queue (or done): never submitted again.
            state.submitted = todo[n - 1][0] + 1 if n else start
            state.save()

        await client.submit(job, ((r.item_id, r.body) for _, r in todo), on_acked=acked)
        state.submitted = len(rows)
        state.save()
        job = await client.finish_submitting(job)
        if not quiet:
            progress.show(len(done))
        if len(done) < len(rows):
            async for result in client.results(job.job_id):
                if result.item_id not in by_id or result.item_id in done:
                    continue
                out.write(output_row(by_id[result.item_id], result))
                out.flush()
                done.add(result.item_id)
                written += 1
                failed += not result.ok
                if not quiet:
                    progress.show(len(done))
                if len(done) >= len(rows):
                    break
    if not quiet:
        progress.show(len(done), final=True)
    await client.purge(job.job_id)
    state.path.unlink(missing_ok=True)
    return job, written, failed
