"""``hf``: sentence-transformers embeddings in-process (CPU, or GPU when present).

Concurrent requests are batched dynamically: the first waiting request opens a
batch, more join it for up to ``batch_wait_ms`` or until ``max_batch`` texts,
then a forward pass runs in a thread (torch releases the GIL, so the worker
keeps streaming other frames meanwhile) and the rows go back to their requests.
Interactive requests join the next batch ahead of batch-job items.

On CPU, ``passes`` forward passes run at once, each with its share of the cores as
torch threads: two single-threaded passes did 1.13-1.18x the texts/s of one pass on
two threads here (a two-thread pass stops at every op's barrier, and waits longer
whenever the event loop or nats-server takes one of its cores). On GPU one pass at a
time.

A pass pads every text to its longest one, so a batch of mixed lengths wastes
compute (about 40% on short texts, measured): when only batch-job texts wait, a
pass takes texts of similar length from the oldest ``pool_factor * max_batch``
(always including the oldest, so none starves), as ``encode`` does when it sorts
a whole corpus. Passes are made of texts, not requests: a batch item of many
texts may span passes, its rows filled in as they finish.

torch and sentence-transformers are imported when the engine starts, so the rest
of Nebula runs without the ``embed`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from nebula.errors import EngineError, InvalidRequest, NebulaError, Unavailable
from nebula.openai_types import MAX_EMBEDDING_INPUTS, EmbeddingRequest
from nebula.protocol import Endpoint
from workers.engines.base import EngineLoad, Job, Output

log = logging.getLogger(__name__)

_SWITCH_INTERVAL = 0.0005  # seconds; see start()
MAX_CPU_PASSES = 4  # more passes at once would each be too slow for an interactive text


def _cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class HFSettings:
    model_path: str
    device: str | None = None  # None: cuda when available, else cpu
    # Texts per forward pass; 0: 128 with one pass at a time, 64 with several. One pass on
    # all cores: 64 short texts did 0.90-0.93x the work per second of encode's best batch
    # (128), 128 did 0.95-0.97x (medians, three runs of benchmarks/bench_hf_passes.py).
    # Passes at once, one core each: 64 measured like 128 (bench_embed packed 0.94-0.97x
    # against 0.93-1.02x), and an interactive text waits for shorter passes (during a
    # batch p50 153-239 ms against 264-292 ms with one 2-thread pass of 128, where
    # passes of 128 at once gave p99 743-792 ms; benchmarks/bench_hf_interactive.py).
    max_batch: int = 0
    # A pass with interactive texts in it is topped up with batch texts only to this
    # size: an interactive request never waits for a full batch-sized pass of its own.
    interactive_batch: int = 32
    batch_wait_ms: float = 2.0  # how long a batch waits for more texts
    max_concurrency: int = 64
    torch_threads: int = 0  # per pass; 0: the cores divided among the passes
    passes: int = 0  # passes at once; 0: on CPU one per core (at most 4), on GPU 1
    # While another pass runs, a new one waits (up to this long) for interactive_batch
    # texts: under a steady stream of small requests, passes of a few texts each would
    # do a fraction of the work per second of fuller ones.
    fill_wait_ms: float = 20.0
    # Batch-job texts sorted by length together (see module doc), from this many passes'
    # worth: at 128 texts a pass, a pool of 4 passes measured like one of 8 (medians 0.96x
    # and 0.97x of encode's best). A worker holds max_batch * (pool_factor + passes) batch
    # items, each of which must finish within the batch ack_wait.
    pool_factor: int = 4


class _Item(msgspec.Struct):
    object: str
    index: int
    embedding: list[float] | str


class _Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class _Response(msgspec.Struct):
    object: str
    data: list[_Item]
    model: str
    usage: _Usage


@dataclass(eq=False)
class _Pending:
    """One request's texts; its rows fill in as passes finish (a long request, or a
    batch item of many texts, may span several passes)."""

    texts: list[str]
    future: asyncio.Future[Any]
    priority: int  # 0 interactive, 1 batch job
    seq: int = 0
    vectors: list[Any] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    left: int = 0


@dataclass(eq=False, slots=True)
class _Text:
    """One text waiting for a pass: the unit passes are made of."""

    pending: _Pending
    index: int
    length: int  # characters: encode's own proxy for tokens when it sorts by length


def parse_embedding_request(body: bytes) -> tuple[EmbeddingRequest, list[str]]:
    """Validate as the gateway does (a NATS publisher may skip the gateway)."""
    try:
        req = msgspec.json.decode(body, type=EmbeddingRequest)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidRequest(f"invalid embeddings request: {e}", param="input") from None
    n = req.count()
    if n == 0:
        raise InvalidRequest("input must not be empty", param="input")
    if n > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"input has {n} items; at most {MAX_EMBEDDING_INPUTS} per request", param="input"
        )
    texts = req.texts()
    if texts is None:
        raise InvalidRequest(
            "this model takes text input; token arrays are not supported", param="input"
        )
    return req, texts


class HFEngine:
    kind = "hf"

    def __init__(self, settings: HFSettings) -> None:
        self.settings = settings
        self.owned_by = "nebula (sentence-transformers)"
        self._model: Any = None
        self._tokenizer: Any = None
        self._forward: Callable[[list[str]], tuple[Any, list[int]]] | None = None
        self.dimension = 0
        self.max_tokens = 0
        self._queue: list[_Text] = []
        self._wakeup = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        self._running = 0
        self._seq = 0
        self.forward_passes = 0
        # Decided again when torch loads (on GPU: 1).
        self.passes = settings.passes or min(_cores(), MAX_CPU_PASSES)
        # The tokenizer is not safe to call from two threads at once (its padding and
        # truncation state is shared): passes tokenize one at a time (~2% of a pass).
        self._tokenize_lock = threading.Lock()

    @property
    def batch_slots(self) -> int:
        """Batch-job items the worker may hand over at once: the passes running, a pool
        waiting."""
        return self.max_batch * (self.settings.pool_factor + self.passes)

    @property
    def max_batch(self) -> int:
        """Texts per forward pass (see HFSettings.max_batch)."""
        return self.settings.max_batch or (128 if self.passes == 1 else 64)

    async def start(self) -> None:
        self._model = await asyncio.to_thread(self._load)
        self._tokenizer = self._model.tokenizer
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_tokens = int(self._model.get_max_seq_length() or 512)
        await asyncio.to_thread(self._pick_forward)
        # A pass runs in a thread whose Python steps between torch ops need the GIL,
        # while the event loop encodes and publishes the previous pass's results: at
        # the default 5 ms switch interval the pass waited on the loop (measured:
        # packed batch 0.84-0.89x of direct encode, 0.88-0.94x at 0.5 ms).
        sys.setswitchinterval(_SWITCH_INTERVAL)
        self._batcher = asyncio.create_task(self._batch_loop(), name="hf-batcher")

    def _load(self) -> Any:
        if not os.path.isdir(self.settings.model_path):
            raise Unavailable(f"model directory {self.settings.model_path!r} does not exist")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only, never a hub
        # OpenMP threads that spin while they wait take the cores this worker's event loop
        # (and anything else on the machine) needs: measured, a pass then costs up to 3x
        # more CPU. Read once, when torch loads; an explicit setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise Unavailable(
                "the hf engine needs the embed extra: pip install 'nebula-fabric[embed]'"
            ) from e
        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cpu":
            self.passes = self.settings.passes or 1
        threads = self.settings.torch_threads
        if not threads and device == "cpu":
            threads = max(1, _cores() // self.passes)
        if threads > 0:
            torch.set_num_threads(threads)
        return SentenceTransformer(self.settings.model_path, device=device)

    async def health(self) -> bool:
        return self._model is not None and self._batcher is not None and not self._batcher.done()

    async def abort(self, request_id: str) -> None:
        return None  # a request's texts are dropped when its future is cancelled

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=self._running,
            waiting=len(self._queue),
            capacity=self.settings.max_concurrency,
        )

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
            self._batcher = None
        for t in self._queue:
            if not t.pending.future.done():
                t.pending.future.set_exception(Unavailable("the engine stopped"))
        self._queue.clear()

    async def generate(self, job: Job) -> AsyncIterator[Output]:
        if job.endpoint is not Endpoint.EMBEDDING:
            raise InvalidRequest(
                f"`{job.model}` is an embedding model: use /v1/embeddings", param="model"
            )
        req, texts = self._parse(job.model, job.body)
        vectors, counts = await self.embed(texts, priority=job.priority)
        yield Output(chunk=self._respond(job.model, req, vectors, counts), tokens=0)

    async def embed_bodies(self, model: str, bodies: list[bytes]) -> list[tuple[bytes, int]]:
        """Many batch-job embedding requests (a packed job message) as ONE submission:
        each body parsed and answered on its own (a bad one fails alone), their texts
        queued together. Per item this skips a job, an async generator and a task
        (measured: ~8% of a packed batch's worker CPU went to the event loop)."""
        parsed: list[tuple[EmbeddingRequest, list[str]] | NebulaError] = []
        texts: list[str] = []
        for body in bodies:
            try:
                req, own = self._parse(model, body)
            except NebulaError as e:
                parsed.append(e)
                continue
            parsed.append((req, own))
            texts.extend(own)
        vectors, counts = await self.embed(texts, priority=1) if texts else ([], [])
        out: list[tuple[bytes, int]] = []
        at = 0
        for p in parsed:
            if isinstance(p, NebulaError):
                out.append((p.to_json(), p.status))
                continue
            req, own = p
            end = at + len(own)
            try:
                out.append((self._respond(model, req, vectors[at:end], counts[at:end]), 200))
            except NebulaError as e:
                out.append((e.to_json(), e.status))
            at = end
        return out

    def _parse(self, model: str, body: bytes) -> tuple[EmbeddingRequest, list[str]]:
        req, texts = parse_embedding_request(body)
        dims = req.dimensions
        if dims is not None and dims != self.dimension:
            raise InvalidRequest(
                f"`{model}` has {self.dimension} dimensions and cannot shorten them",
                param="dimensions",
            )
        return req, texts

    def _respond(
        self, model: str, req: EmbeddingRequest, vectors: list[Any], counts: list[int]
    ) -> bytes:
        """The OpenAI response body; an input over the model's length fails the request."""
        for i, n in enumerate(counts):
            if n > self.max_tokens:
                raise InvalidRequest(
                    f"input[{i}] has {n} tokens; `{model}` takes at most {self.max_tokens}",
                    param="input",
                )
        fmt = req.encoding_format
        items = [
            _Item(object="embedding", index=i, embedding=_encode(v, fmt))
            for i, v in enumerate(vectors)
        ]
        tokens = sum(counts)
        return msgspec.json.encode(
            _Response(
                object="list",
                data=items,
                model=model,
                usage=_Usage(prompt_tokens=tokens, total_tokens=tokens),
            )
        )

    async def embed(self, texts: list[str], *, priority: int = 0) -> tuple[list[Any], list[int]]:
        """Rows of forward passes shared with whoever else is waiting now."""
        loop = asyncio.get_running_loop()
        self._seq += 1
        n = len(texts)
        p = _Pending(texts, loop.create_future(), priority, self._seq, [None] * n, [0] * n, n)
        self._queue.extend(_Text(p, i, len(t)) for i, t in enumerate(texts))
        self._wakeup.set()
        result: tuple[list[Any], list[int]] = await p.future
        return result

    async def _batch_loop(self) -> None:
        wait = self.settings.batch_wait_ms / 1000
        cap = self.max_batch
        free = asyncio.Semaphore(self.passes)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                if not self._queue:
                    continue
                if len(self._queue) < cap and wait:
                    await asyncio.sleep(wait)  # let concurrent requests join this pass
                await free.acquire()  # texts keep joining while every pass is busy
                await self._fill()
                batch = self._take(cap)
                if self._queue:
                    self._wakeup.set()
                if not batch:
                    free.release()
                    continue
                task = asyncio.create_task(self._pass(batch, free))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def _fill(self) -> None:
        """With another pass running, wait for a pass's worth of interactive texts, for
        that pass to end, or for ``fill_wait_ms``, whichever comes first."""
        fill = self.settings.interactive_batch
        if not self._running or len(self._queue) >= fill or not self.settings.fill_wait_ms:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.fill_wait_ms / 1000
        running = self._running
        while self._running == running and len(self._queue) < fill:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wakeup.wait()

    async def _pass(self, batch: list[_Text], free: asyncio.Semaphore) -> None:
        self._running += len(batch)
        try:
            out = await asyncio.to_thread(self._encode, [t.pending.texts[t.index] for t in batch])
        except Exception as e:
            log.exception("forward pass failed")
            for t in batch:
                if not t.pending.future.done():
                    t.pending.future.set_exception(EngineError(f"embedding failed: {e!r}"))
            return
        finally:
            self._running -= len(batch)
            free.release()
            self._wakeup.set()  # a pass ended: a waiting one may start now (_fill)
        self.forward_passes += 1
        vectors, counts = out
        for t, v, c in zip(batch, vectors, counts, strict=True):
            p = t.pending
            p.vectors[t.index], p.counts[t.index] = v, c
            p.left -= 1
            if not p.left and not p.future.done():
                p.future.set_result((p.vectors, p.counts))

    def _take(self, cap: int) -> list[_Text]:
        """The next pass: interactive texts first (oldest first, topped up with batch
        texts to ``interactive_batch``); with none waiting, batch texts of similar length
        (module doc)."""
        queue = sorted((t for t in self._queue if not t.pending.future.done()),
                       key=lambda t: (t.pending.priority, t.pending.seq, t.index))  # fmt: skip
        if not queue or queue[0].pending.priority == 0:
            interactive = sum(1 for t in queue[:cap] if t.pending.priority == 0)
            size = min(cap, max(interactive, self.settings.interactive_batch))
            batch, rest = queue[:size], queue[size:]
        else:
            batch = _similar(queue, cap, cap * max(self.settings.pool_factor, 1))
            taken = {id(t) for t in batch}
            rest = [t for t in queue if id(t) not in taken]
        self._queue = rest
        return batch

    def _encode(self, texts: list[str]) -> tuple[Any, list[int]]:
        """One forward pass, and every text's token count (inputs over the model's length
        are refused by count), off the event loop."""
        if self._forward is not None:
            return self._forward(texts)
        with self._tokenize_lock:  # encode tokenizes inside: one pass at a time here
            ids = self._tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
            vectors = self._model.encode(
                texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False
            )
        return vectors, [len(x) for x in ids]

    def _steps(self, texts: list[str]) -> tuple[Any, list[int]]:
        """``encode``'s own steps for one batch (preprocess, forward), so each text is
        tokenized once, not once more to count it (measured: ~0.05 ms of CPU per text,
        ~1.5% of a pass); the count comes from the attention mask, and only a text cut
        at the model's length is tokenized again, uncut."""
        import torch
        from sentence_transformers.util import batch_to_device

        with self._tokenize_lock:
            features = self._model.preprocess(texts)
        counts = [int(n) for n in features["attention_mask"].sum(dim=1).tolist()]
        cut = [i for i, n in enumerate(counts) if n >= self.max_tokens]
        if cut:
            with self._tokenize_lock:
                ids = self._tokenizer(
                    [texts[i] for i in cut], add_special_tokens=True, truncation=False
                )["input_ids"]
            for i, x in zip(cut, ids, strict=True):
                counts[i] = len(x)
        features = batch_to_device(features, self._model.device)
        with torch.inference_mode():
            out = self._model(features)
        return out["sentence_embedding"].float().cpu().numpy(), counts

    def _pick_forward(self) -> None:
        """Use :meth:`_steps` only where it gives what ``encode`` gives (bit for bit, on
        probe texts): another sentence-transformers version or model layout (prompts,
        routers) keeps the plain ``encode`` path."""
        probe = ["a probe", "a somewhat longer probe text for the forward pass check"]
        try:
            vectors, counts = self._steps(probe)
            want, want_counts = self._encode(probe)
            same = bool((vectors == want).all()) and counts == want_counts
        except Exception as e:
            log.debug("hf: encode's steps unavailable (%r); using encode", e)
            same = False
        if same:
            self._forward = self._steps


def _similar(queue: list[_Text], cap: int, pool_cap: int) -> list[_Text]:
    """Up to ``cap`` texts from the oldest ``pool_cap`` (``queue`` is oldest first),
    growing outwards in length order from the oldest text."""
    oldest = queue[0]
    by_len = sorted(queue[:pool_cap], key=lambda t: t.length)
    lo = hi = by_len.index(oldest)
    while hi - lo + 1 < cap:
        if lo > 0 and (
            hi + 1 >= len(by_len)
            or oldest.length - by_len[lo - 1].length <= by_len[hi + 1].length - oldest.length
        ):
            lo -= 1
        elif hi + 1 < len(by_len):
            hi += 1
        else:
            break
    return by_len[lo : hi + 1]


def _encode(vector: Any, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's format: little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
