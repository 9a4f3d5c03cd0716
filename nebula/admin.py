"""Model lifecycle and cluster views over the KV buckets.

One implementation behind both the CLI (``nebula model ...``, ``nebula cluster
status``) and the gateway's admin API, so both validate and answer alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from nebula import natsio, procs, subjects
from nebula.errors import Conflict, ErrorEnvelope, InvalidRequest, ModelNotFound, Unavailable
from nebula.protocol import ModelSpec, NodeInfo, Placement, PlacementState
from nebula.settings import NatsSettings
from workers.engines.registry import ENGINES, EngineConfig

log = logging.getLogger(__name__)


_S = TypeVar("_S", bound=msgspec.Struct)


def _decode(entry: KeyValue.Entry, kind: type[_S]) -> _S | None:
    """A KV value anyone may have written: skip (and say) what does not decode."""
    try:
        return msgspec.json.decode(entry.value or b"", type=kind)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        log.warning("ignoring bad %s entry %r: %s", kind.__name__, entry.key, e)
        return None


# Continuations one stream may get (request migration): a bound, not a retry loop.
MAX_MIGRATIONS = 3


class LoadRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/models`` (and what the CLI builds from its flags)."""

    name: str
    engine: str
    model_path: str | None = None
    replicas: int = 1
    gpu_memory: float = 0.0
    # None: the engine's own slot count (vLLM: --max-num-seqs; 8 for the others).
    max_concurrency: int | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    engine_args: list[str] = msgspec.field(default_factory=list)
    engine_options: dict[str, str] = msgspec.field(default_factory=dict)
    max_queue: int = 256
    max_queue_bytes: int = 16 * 1024 * 1024
    max_output_tokens: int = 32768
    # LoRA adapters, name -> path on the nodes: each is served as its own model name.
    adapters: dict[str, str] = msgspec.field(default_factory=dict)
    # Request migration: continuations a stream may get on another replica (0: off).
    migrate: int = 0


class AdapterRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/models/{model}/adapters``."""

    name: str
    path: str


def _check_adapter(model: str, name: str, path: str) -> None:
    if not name or not name.strip() or name != name.strip():
        raise InvalidRequest("an adapter name must not be empty or padded", param="adapters")
    if name == model:
        raise InvalidRequest(
            f"adapter `{name}` has the name of its base model; pick another", param="adapters"
        )
    if not path:
        raise InvalidRequest(f"adapter `{name}` needs a path", param="adapters")


def _engine_config(req: LoadRequest) -> EngineConfig:
    return EngineConfig(
        model=req.name,
        options=req.engine_options,
        max_concurrency=req.max_concurrency,
        model_path=req.model_path,
        engine_args=tuple(req.engine_args),
        gpu_memory=req.gpu_memory,
        adapters=dict(req.adapters),
    )


CHECK_TIMEOUT = 300.0  # seconds for an engine's own check of a load (it imports the engine)
_CHECK_INVALID = 3  # the checker's exit code when the load is invalid (its verdict on fd 1)


async def check_engine(req: LoadRequest) -> None:
    """The engine's own checks (vLLM parses its flags), in a child process: they import
    the engine, seconds of CPU and hundreds of MiB that the process serving requests (the
    gateway hosts the admin API) must not pay in stalls and heap. Skipped where the
    engine's package is not installed; the worker checks again."""
    kind = ENGINES.get(req.engine)
    if kind.check is None or not kind.available():
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from nebula.admin import check_main; check_main()",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=procs.die_with_parent,
    )
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            out, err = await proc.communicate(msgspec.json.encode(req))
    except BaseException as e:  # the deadline, or the caller gave up
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(e, TimeoutError):
            raise Unavailable(
                f"the {req.engine} engine's check of this load took over {CHECK_TIMEOUT:.0f}s"
            ) from None
        raise
    if proc.returncode == 0:
        return
    if proc.returncode == _CHECK_INVALID:
        verdict = msgspec.json.decode(out, type=ErrorEnvelope).error
        raise InvalidRequest(verdict.message, param=verdict.param)
    tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-5:])
    raise Unavailable(f"the {req.engine} engine's check of this load failed: {tail}")


def check_main() -> None:
    """The checker child: a LoadRequest on stdin; exit 0 (valid) or _CHECK_INVALID with
    the error on stdout. Everything else the engine prints goes to stderr."""
    verdict = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # engines log to stdout: keep fd 1 for the verdict alone
    sys.stdout = sys.stderr
    req = msgspec.json.decode(sys.stdin.buffer.read(), type=LoadRequest)
    kind = ENGINES.get(req.engine)
    assert kind.check is not None
    try:
        kind.check(_engine_config(req))
    except InvalidRequest as e:
        verdict.write(e.to_json())
        verdict.close()
        sys.exit(_CHECK_INVALID)


def validate(req: LoadRequest) -> ModelSpec:
    if not req.name or not req.name.strip():
        raise InvalidRequest("model name must not be empty", param="name")
    kind = ENGINES.get(req.engine)
    if req.replicas < 1:
        raise InvalidRequest(f"replicas must be 1 or more, got {req.replicas}", param="replicas")
    if not 0.0 <= req.gpu_memory <= 1.0:
        raise InvalidRequest(
            f"gpu_memory is a fraction of one GPU between 0 and 1, got {req.gpu_memory}",
            param="gpu_memory",
        )
    if req.max_concurrency is not None and req.max_concurrency < 1:
        raise InvalidRequest("max_concurrency must be 1 or more", param="max_concurrency")
    for name in ("max_queue", "max_queue_bytes", "max_output_tokens"):
        if getattr(req, name) < 1:
            raise InvalidRequest(f"{name} must be 1 or more", param=name)
    if not 0 <= req.migrate <= MAX_MIGRATIONS:
        raise InvalidRequest(
            f"migrate is the continuations a stream may get, 0 to {MAX_MIGRATIONS}; "
            f"got {req.migrate}",
            param="migrate",
        )
    if req.migrate and req.engine == "openai":
        raise InvalidRequest(
            "migrate needs an engine that continues a final assistant message "
            "(vllm, sim); an arbitrary OpenAI-compatible upstream may not",
            param="migrate",
        )
    # Options, model path and `--` args by the engine kind's own rules; the deep check
    # (vLLM's own argument parser) runs in ClusterAdmin.load, off the event loop.
    kind.validate(_engine_config(req), deep=False)
    for name, path in req.adapters.items():
        _check_adapter(req.name, name, path)
    engine_args = list(req.engine_args)
    if req.adapters and kind.lora_flag and kind.lora_flag not in engine_args:
        # Stored in the spec: a replica restarted after every adapter was removed can
        # still take new ones at run time.
        engine_args.append(kind.lora_flag)
    return ModelSpec(
        name=req.name,
        engine=req.engine,
        model_path=req.model_path,
        replicas=req.replicas,
        gpu_memory=req.gpu_memory,
        max_concurrency=req.max_concurrency or 0,  # 0: the engine's own
        labels=dict(req.labels),
        engine_args=engine_args,
        engine_options=dict(req.engine_options),
        created_at=time.time(),
        max_queue=req.max_queue,
        max_queue_bytes=req.max_queue_bytes,
        max_output_tokens=req.max_output_tokens,
        adapters=dict(req.adapters),
        migrate=req.migrate,
    )


class ModelStatus(msgspec.Struct, kw_only=True):
    name: str
    engine: str
    replicas: int
    ready: int
    state: str
    reason: str = ""
    nodes: list[str] = msgspec.field(default_factory=list)
    queued: int = 0
    max_queue: int = 0
    # Jobs parked on the dead-letter subject, and batch items waiting.
    dead_letters: int = 0
    batch_queued: int = 0
    spec: ModelSpec | None = None
    placements: list[Placement] = msgspec.field(default_factory=list)


class NodeStatus(msgspec.Struct, kw_only=True):
    node_id: str
    heartbeat_age: float
    info: NodeInfo
    placements: list[str] = msgspec.field(default_factory=list)
    gpu_allocated: dict[int, float] = msgspec.field(default_factory=dict)


def summarize(
    spec: ModelSpec,
    placements: list[Placement],
    queued: int = 0,
    dead_letters: int = 0,
    batch_queued: int = 0,
) -> ModelStatus:
    ready = sum(p.state is PlacementState.READY for p in placements)
    by_state = {s: [p for p in placements if p.state is s] for s in PlacementState}
    reason = ""
    if ready >= spec.replicas:
        state = "Ready"
    elif by_state[PlacementState.FAILED]:
        state, reason = "Failed", by_state[PlacementState.FAILED][0].reason
    elif by_state[PlacementState.PENDING]:
        state, reason = "Pending", by_state[PlacementState.PENDING][0].reason
    elif not placements:
        state, reason = "Pending", "waiting for the scheduler"
    elif ready:
        state = "Degraded"
    else:
        state = "Starting"
        reason = next((p.reason for p in by_state[PlacementState.STARTING] if p.reason), "")
    nodes = sorted({p.node_id for p in placements if p.node_id})
    return ModelStatus(
        name=spec.name,
        engine=spec.engine,
        replicas=spec.replicas,
        ready=ready,
        state=state,
        reason=reason,
        nodes=nodes,
        queued=queued,
        max_queue=spec.max_queue,
        dead_letters=dead_letters,
        batch_queued=batch_queued,
        spec=spec,
        placements=sorted(placements, key=lambda p: p.replica),
    )


class ClusterAdmin:
    """``admin = await ClusterAdmin.open(nc, settings)``; the connection stays the caller's."""

    def __init__(
        self,
        nc: Client,
        models: KeyValue,
        placements: KeyValue,
        nodes: KeyValue,
        settings: NatsSettings,
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.js = nc.jetstream()
        self.models_kv = models
        self.placements_kv = placements
        self.nodes_kv = nodes

    @classmethod
    async def open(cls, nc: Client, settings: NatsSettings) -> ClusterAdmin:
        js = nc.jetstream()
        return cls(
            nc,
            await natsio.models_bucket(js, settings),
            await natsio.placements_bucket(js, settings),
            await natsio.nodes_bucket(js, settings),
            settings,
        )

    async def load(self, req: LoadRequest) -> ModelSpec:
        spec = validate(req)
        await self._check_names(spec.name, [spec.name, *spec.adapters])
        await check_engine(req)
        try:
            await self.models_kv.create(subjects.model_key(spec.name), msgspec.json.encode(spec))
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"model `{spec.name}` is already loaded; unload it first to change it",
                param="name",
            ) from None
        # The spec owns the queue bound: set it now (a stream left by an earlier load
        # or by a hand-run worker takes the new bound).
        await natsio.ensure_request_stream(self.js, self.settings, spec.name, spec, update=True)
        return spec

    async def unload(self, name: str) -> None:
        key = subjects.model_key(name)
        try:
            entry = await self.models_kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            raise ModelNotFound(f"model `{name}` is not loaded", param="name") from None
        if entry.value is None:
            raise ModelNotFound(f"model `{name}` is not loaded", param="name")
        await self.models_kv.delete(key)

    async def _check_names(self, owner: str, names: list[str]) -> None:
        """Model and adapter names are one namespace: /v1/models lists both."""
        for spec in (await self._specs()).values():
            for name in names:
                if spec.name != owner and (name == spec.name or name in spec.adapters):
                    raise Conflict(
                        f"`{name}` is already served (by model `{spec.name}`)", param="name"
                    )

    async def add_adapter(self, model: str, name: str, path: str) -> ModelSpec:
        """Serve LoRA adapter ``name`` on every replica of ``model`` (they load it now)."""
        _check_adapter(model, name, path)
        await self._check_names(model, [name])

        def change(spec: ModelSpec) -> ModelSpec:
            kind = ENGINES.get(spec.engine)
            if kind.lora_flag is None:
                raise InvalidRequest(
                    f"model `{model}` runs the {spec.engine} engine, which serves no adapters",
                    param="model",
                )
            if kind.lora_flag not in spec.engine_args:
                raise InvalidRequest(
                    f"model `{model}` was loaded without LoRA; load it with --lora NAME=PATH "
                    f"or `-- {kind.lora_flag}` to add adapters at run time",
                    param="model",
                )
            if name in spec.adapters:
                raise Conflict(f"model `{model}` already has adapter `{name}`", param="name")
            return msgspec.structs.replace(spec, adapters={**spec.adapters, name: path})

        return await self._update(model, change)

    async def remove_adapter(self, model: str, name: str) -> ModelSpec:
        def change(spec: ModelSpec) -> ModelSpec:
            if name not in spec.adapters:
                raise ModelNotFound(f"model `{model}` has no adapter `{name}`", param="name")
            return msgspec.structs.replace(
                spec, adapters={k: v for k, v in spec.adapters.items() if k != name}
            )

        return await self._update(model, change)

    async def _update(self, model: str, change: Callable[[ModelSpec], ModelSpec]) -> ModelSpec:
        """Read-modify-write of a model spec, retried when another writer got there first."""
        key = subjects.model_key(model)
        for _ in range(20):
            try:
                entry = await self.models_kv.get(key)
            except (KeyNotFoundError, NotFoundError):
                entry = None
            spec = _decode(entry, ModelSpec) if entry is not None and entry.value else None
            if entry is None or spec is None:
                raise ModelNotFound(f"model `{model}` is not loaded", param="model")
            new = change(spec)
            try:
                await self.models_kv.update(key, msgspec.json.encode(new), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return new
        raise Conflict(f"model `{model}` kept changing; try again", param="model")

    async def _specs(self) -> dict[str, ModelSpec]:
        out = {}
        for entry in (await natsio.read_all(self.models_kv)).values():
            spec = _decode(entry, ModelSpec)
            if spec is not None:
                out[spec.name] = spec
        return out

    async def _placements(self) -> list[Placement]:
        found = (
            _decode(e, Placement) for e in (await natsio.read_all(self.placements_kv)).values()
        )
        return [p for p in found if p is not None]

    async def queue_depths(self, models: list[str]) -> dict[str, int]:
        """Interactive jobs waiting, per model (each model has its own stream)."""
        depths: dict[str, int] = {}
        for name in models:
            with contextlib.suppress(Exception):
                info = await self.js.stream_info(subjects.req_stream(name))
                depths[name] = int(info.state.messages)
        return depths

    async def batch_depths(self) -> dict[str, int]:
        """Batch-job items waiting, per model."""
        return await self._per_model(subjects.JOB_STREAM)

    async def dead_letter_counts(self) -> dict[str, int]:
        """Jobs on the dead-letter stream, per model."""
        return await self._per_model(subjects.DLQ_STREAM)

    async def _per_model(self, stream: str) -> dict[str, int]:
        """Messages per model token on a stream whose subjects end in the model token."""
        try:
            info = await self.js.stream_info(stream, subjects_filter=">")
        except Exception:
            return {}
        out: dict[str, int] = {}
        for subject, count in (info.state.subjects or {}).items():
            try:
                name = subjects.model_from_token(subject.rsplit(".", 1)[-1])
            except ValueError:
                log.warning("ignoring messages on a subject Nebula did not name: %r", subject)
                continue
            out[name] = out.get(name, 0) + count
        return out

    async def models(self) -> list[ModelStatus]:
        specs = await self._specs()
        by_model: dict[str, list[Placement]] = {}
        for p in await self._placements():
            by_model.setdefault(p.model, []).append(p)
        depths = await self.queue_depths(list(specs))
        dead = await self._per_model(subjects.DLQ_STREAM)
        batch = await self._per_model(subjects.JOB_STREAM)
        return [
            summarize(
                spec,
                by_model.get(name, []),
                depths.get(name, 0),
                dead.get(name, 0),
                batch.get(name, 0),
            )
            for name, spec in sorted(specs.items())
        ]

    async def nodes(self) -> list[NodeStatus]:
        entries = await natsio.read_all(self.nodes_kv)
        placements = await self._placements()
        per_node: dict[str, list[Placement]] = {}
        for p in placements:
            if p.node_id:
                per_node.setdefault(p.node_id, []).append(p)
        now = time.time()
        out = []
        for entry in entries.values():
            info = _decode(entry, NodeInfo)
            if info is None:
                continue
            mine = per_node.get(info.node_id, [])
            alloc: dict[int, float] = {}
            for p in mine:
                for g in p.gpu_ids:
                    alloc[g] = round(alloc.get(g, 0.0) + p.memory_fraction, 4)
            out.append(
                NodeStatus(
                    node_id=info.node_id,
                    heartbeat_age=max(0.0, now - (info.heartbeat_at or now)),
                    info=info,
                    placements=sorted(f"{p.model}#{p.replica} {p.state.value}" for p in mine),
                    gpu_allocated=alloc,
                )
            )
        return sorted(out, key=lambda n: n.node_id)
