"""What the gateway knows about models: live workers (heartbeats) and desired models.

Kept in memory from KV watches, so resolving a model costs a dict lookup, not a
NATS round trip per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.js.kv import KeyValue

from nebula import natsio, subjects
from nebula.errors import ModelNotFound
from nebula.natsio import WORKER_LIVE_WINDOW, entries, watch_lost
from nebula.protocol import ModelSpec, WorkerInfo
from nebula.service import cancel_and_wait

log = logging.getLogger(__name__)

# Heartbeats of crashed workers are forgotten after this many seconds.
FORGET_AFTER = 600.0
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0


@dataclass(slots=True)
class _Seen:
    info: WorkerInfo
    at: float


class ModelRegistry:
    def __init__(self) -> None:
        self._workers: dict[str, dict[str, _Seen]] = {}
        self._desired: dict[str, ModelSpec] = {}
        self._adapters: dict[str, str] = {}  # LoRA adapter name -> its base model
        self._tasks: list[asyncio.Task[None]] = []
        self._synced: list[asyncio.Event] = []
        self._bad_keys: set[str] = set()

    # --- queries -------------------------------------------------------------

    def live_workers(self, model: str) -> list[WorkerInfo]:
        now = time.monotonic()
        seen = self._workers.get(model)
        if not seen:
            return []
        return [s.info for s in seen.values() if s.info.ready and now - s.at < WORKER_LIVE_WINDOW]

    def resolve(self, model: str) -> str:
        """The model whose queue serves ``model`` (itself, or an adapter's base model);
        404 unless the model is desired, an adapter of one, or a worker announced it.

        A worker that crashed leaves its heartbeat behind: its model stays known
        (requests get 503 "no ready replica", not 404) until a clean stop or
        :data:`FORGET_AFTER`.
        """
        if model in self._desired or self._workers.get(model):
            return model
        base = self._adapters.get(model)
        if base is not None:
            return base
        raise ModelNotFound(f"The model `{model}` does not exist or is not loaded.", param="model")

    def ready_models(self) -> dict[str, WorkerInfo]:
        """Models with at least one live, ready worker -> one of its heartbeats."""
        out: dict[str, WorkerInfo] = {}
        now = time.monotonic()
        for model, seen in list(self._workers.items()):
            for wid in [w for w, s in seen.items() if now - s.at > FORGET_AFTER]:
                del seen[wid]
            live = self.live_workers(model)
            if live:
                out[model] = live[0]
        return out

    def base(self, model: str) -> str:
        """An adapter's base model; any other name as it is."""
        return self._adapters.get(model, model)

    def served_adapters(self, model: str) -> set[str]:
        """Adapters that some live, ready replica of ``model`` has loaded."""
        return {a for info in self.live_workers(model) for a in info.adapters}

    def spec(self, model: str) -> ModelSpec | None:
        return self._desired.get(model)

    def desired(self) -> dict[str, ModelSpec]:
        return dict(self._desired)

    # --- watching ----------------------------------------------------------------

    async def watch(self, workers: KeyValue, models: KeyValue | None = None) -> None:
        """(Re)start the watches and return once the current state has been read."""
        await self.stop()
        self._synced = [asyncio.Event()]
        self._tasks = [
            asyncio.create_task(self._keep_watching(workers, self._on_worker, self._synced[0]))
        ]
        if models is not None:
            self._synced.append(asyncio.Event())
            self._tasks.append(
                asyncio.create_task(self._keep_watching(models, self._on_model, self._synced[1]))
            )
        for ev in self._synced:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ev.wait(), 5.0)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def _keep_watching(
        self, kv: KeyValue, handle: Callable[[KeyValue.Entry, bool], None], synced: asyncio.Event
    ) -> None:
        """A watch that ends, fails or loses its consumer (a NATS server died) is
        started again, with backoff: the model list must never freeze."""
        delay = _BACKOFF_MIN
        while True:
            try:
                watcher = await kv.watchall()

                async def consume(watcher: KeyValue.KeyWatcher = watcher) -> None:
                    nonlocal delay
                    replay = True  # the current values first, then live updates
                    async for entry in entries(kv, watcher):
                        if entry is None:  # end of the current values
                            synced.set()
                            replay = False
                            delay = _BACKOFF_MIN
                            continue
                        try:
                            handle(entry, replay)
                        except (ValueError, msgspec.DecodeError) as e:
                            self._skip(entry.key, e)

                tasks = [
                    asyncio.ensure_future(consume()),
                    asyncio.ensure_future(watch_lost(watcher)),
                ]
                try:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    if tasks[0].done():
                        tasks[0].result()
                finally:
                    for t in tasks:
                        t.cancel()
                    with contextlib.suppress(Exception):
                        await watcher.stop()
                log.warning("KV watch of %s ended or lost; watching again", kv._name)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("KV watch of %s failed (%s); retrying in %.1fs", kv._name, e, delay)
            natsio.raise_if_cancelled()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _skip(self, key: str, err: Exception) -> None:
        if key not in self._bad_keys:
            if len(self._bad_keys) > 1024:
                self._bad_keys.clear()
            self._bad_keys.add(key)
            log.warning("ignoring KV key %r: %s", key, err)

    def _on_worker(self, entry: KeyValue.Entry, replay: bool = False) -> None:
        model_tok, _, wid = entry.key.partition(".")
        model = subjects.model_from_token(model_tok)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._workers.get(model, {}).pop(wid, None)
            return
        info = msgspec.json.decode(entry.value, type=WorkerInfo)
        seen = self._workers.setdefault(model, {})
        known = seen.get(wid)
        # A watch started again replays each worker's last beat: that proves nothing
        # about a worker we already track (it may have died since), so keep its time.
        at = known.at if replay and known is not None else time.monotonic()
        seen[wid] = _Seen(info, at)

    def _on_model(self, entry: KeyValue.Entry, replay: bool = False) -> None:
        name = subjects.model_from_token(entry.key)
        old = self._desired.pop(name, None)
        if old is not None:
            for adapter in old.adapters:
                self._adapters.pop(adapter, None)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            return
        spec = msgspec.json.decode(entry.value, type=ModelSpec)
        self._desired[name] = spec
        for adapter in spec.adapters:
            self._adapters[adapter] = name
