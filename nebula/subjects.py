"""The wire names: every NATS subject, stream, consumer, KV bucket, key and header.

No other module formats a subject string. Model names are user strings
(``Qwen/Qwen2.5-0.5B-Instruct``, ``llama3:8b``, ``a.b``); :func:`model_token`
encodes them reversibly into something that is at once a valid subject token,
KV key and consumer name.
"""

from __future__ import annotations

import hashlib
import string

from nebula.errors import InvalidRequest

VERSION = "v1"
ROOT = f"nebula.{VERSION}"

# --- model tokens -----------------------------------------------------------

# Characters kept verbatim: safe in subjects, KV keys, consumer and file names.
_SAFE = frozenset(string.ascii_letters + string.digits + "-")
_ESC = "_"


def model_token(name: str) -> str:
    """Encode a model name reversibly: safe chars stay, others become ``_XX`` (UTF-8 hex)."""
    if not name:
        raise InvalidRequest("model name must not be empty", param="model")
    if _SAFE.issuperset(name):  # the common case (hex job ids, plain names): per batch item
        return name
    out: list[str] = []
    for ch in name:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"{_ESC}{b:02X}" for b in ch.encode())
    return "".join(out)


def model_from_token(token: str) -> str:
    """Inverse of :func:`model_token`; ValueError for a token it did not make (anyone
    can publish to a subject or put a KV key: callers skip such names)."""
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == _ESC:
            pair = token[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in string.hexdigits for c in pair):
                raise ValueError(f"malformed name token {token!r}")
            raw.append(int(pair, 16))
            i += 3
        elif ch in _SAFE:
            raw.extend(ch.encode())
            i += 1
        else:
            raise ValueError(f"malformed name token {token!r}")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"malformed name token {token!r}") from None


# --- interactive requests ---------------------------------------------------

REQ_STREAM_PREFIX = "NEBULA_REQ_"


def req_stream(model: str) -> str:
    """One work-queue stream per model: its bound (messages and bytes) is the model's
    own, enforced by JetStream identically for every gateway."""
    return f"{REQ_STREAM_PREFIX}{model_token(model)}"


def req_subject(model: str) -> str:
    return f"{ROOT}.req.{model_token(model)}"


def req_subjects_all() -> str:
    return f"{ROOT}.req.>"


def req_consumer(model: str) -> str:
    """Durable pull consumer shared by all workers of one model (a JetStream queue group)."""
    return f"req-{model_token(model)}"


def pull_next_subject(stream: str, consumer: str) -> str:
    """JetStream API subject a pull request is published to."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"


# --- batch jobs --------------------------------------------------------------

JOB_STREAM = "NEBULA_JOBS"  # work queue, file storage: one message per item
RESULT_STREAM = "NEBULA_RESULTS"  # file storage, ONE message per result subject (per item)
JOBS_BUCKET = "nebula-jobs"  # job records: model, total, state (cancelled)


def job_subject(model: str) -> str:
    return f"{ROOT}.job.{model_token(model)}"


def job_subjects_all() -> str:
    return f"{ROOT}.job.>"


def job_consumer(model: str) -> str:
    """Durable pull consumer shared by all workers of one model for batch items."""
    return f"job-{model_token(model)}"


def job_key(job_id: str) -> str:
    return model_token(job_id)


def result_subject(job_id: str, item_id: str) -> str:
    """Keyed by job and item: the results stream keeps one message per subject, so a
    result computed twice (redelivery after a crash) is stored once."""
    return f"{ROOT}.result.{model_token(job_id)}.{model_token(item_id)}"


def result_filter(job_id: str) -> str:
    return f"{ROOT}.result.{model_token(job_id)}.*"


def result_subjects_all() -> str:
    return f"{ROOT}.result.>"


def item_from_result_subject(subject: str) -> str:
    return model_from_token(subject.rsplit(".", 1)[-1])


def item_msg_id(job_id: str, item_id: str) -> str:
    """Nats-Msg-Id of an item: a resubmission inside the duplicate window is dropped."""
    return f"{model_token(job_id)}:{model_token(item_id)}"


def pack_msg_id(job_id: str, item_ids: list[str]) -> str:
    """Nats-Msg-Id of a packed message: its first item, its count and a digest of all
    its ids (a resumed run may pack the same first item with other items)."""
    digest = hashlib.blake2b("\n".join(item_ids).encode(), digest_size=8).hexdigest()
    return f"{model_token(job_id)}:{model_token(item_ids[0])}+{len(item_ids)}:{digest}"


# --- replies and cancellation ------------------------------------------------


def reply_prefix(gateway_id: str) -> str:
    return f"{ROOT}.reply.{gateway_id}"


def reply_wildcard(gateway_id: str) -> str:
    """The ONE subscription a gateway holds for all of its in-flight requests."""
    return f"{reply_prefix(gateway_id)}.*"


def reply_subject(gateway_id: str, request_id: str) -> str:
    return f"{reply_prefix(gateway_id)}.{request_id}"


def request_id_from_reply(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def cancel_subject(worker_id: str) -> str:
    """Body: ``<request id>`` (every attempt) or ``<request id> <attempt>`` (that one)."""
    return f"{ROOT}.cancel.{worker_id}"


def credit_subject(worker_id: str) -> str:
    """Flow control, gateway to worker. Body: ``<request id> <attempt> <bytes consumed>``."""
    return f"{ROOT}.credit.{worker_id}"


# --- dead letters --------------------------------------------------------------

DLQ_STREAM = "NEBULA_DLQ"


def dlq_subject(model: str) -> str:
    """Jobs no worker could take (malformed, or delivered too often), with the reason."""
    return f"{ROOT}.dlq.{model_token(model)}"


def dlq_subjects_all() -> str:
    return f"{ROOT}.dlq.>"


# JetStream acks every delivered job on a reply subject under this prefix; a status
# message (408 pull expired, 100 idle) has none. Telling the two apart by the reply
# subject, which only the server sets, keeps a publisher's `Status` header harmless.
JS_ACK_PREFIX = "$JS.ACK."

# JetStream announces every new leader (meta group, a stream, a consumer) here: the
# chaos suite times elections with it.
JS_LEADER_ADVISORIES = "$JS.EVENT.ADVISORY.>"
JS_LEADER_ELECTED = "LEADER_ELECTED"


# --- KV buckets and keys -----------------------------------------------------

MODELS_BUCKET = "nebula-models"
PLACEMENTS_BUCKET = "nebula-placements"
NODES_BUCKET = "nebula-nodes"
WORKERS_BUCKET = "nebula-workers"
LEADER_BUCKET = "nebula-leader"
LEADER_KEY = "scheduler"


def model_key(model: str) -> str:
    return model_token(model)


def placement_key(model: str, replica: int) -> str:
    return f"{model_token(model)}.{replica}"


def placement_key_parts(key: str) -> tuple[str, int]:
    token, replica = key.rsplit(".", 1)
    return model_from_token(token), int(replica)


def node_key(node_id: str) -> str:
    return model_token(node_id)


def worker_key(model: str, worker_id: str) -> str:
    return f"{model_token(model)}.{worker_id}"


# --- headers ------------------------------------------------------------------

H_REQUEST_ID = "Nebula-Request-Id"
H_REPLY = "Nebula-Reply"
H_DEADLINE = "Nebula-Deadline"  # unix epoch seconds, float
H_PRIORITY = "Nebula-Priority"
H_ENDPOINT = "Nebula-Endpoint"  # chat | completion | embedding
H_ATTEMPT = "Nebula-Attempt"
H_KIND = "Nebula-Kind"  # start | data | keepalive | end | error
H_SEQ = "Nebula-Seq"
H_WORKER = "Nebula-Worker"
H_STATUS = "Nebula-Status"  # HTTP status carried by an error frame
# Job headers for the exactness contract (a worker may ignore neither when present):
H_WINDOW = "Nebula-Window"  # flow-control window in bytes; absent or 0: none
H_SILENCE = "Nebula-Silence-Timeout"  # seconds of silence after which the gateway gives up
# "lazy": the reader takes an attempt's first frame as its start, so a worker may skip the
# start frame when data, end or error follows within its start_hold_ms. Without it (any
# other publisher), start goes out at once.
H_START = "Nebula-Start"
START_LAZY = "lazy"
H_DEAD_REASON = "Nebula-Dead-Reason"  # why a job went to the dead-letter subject
H_JOB_ID = "Nebula-Job-Id"  # batch job an item belongs to
H_ITEM_ID = "Nebula-Item-Id"  # the item's id, unique within its job
# A packed job message (body: {"items": [{"id", "body"}, ...]}): how many items it holds.
H_ITEMS = "Nebula-Items"
H_USAGE = "Nebula-Usage"  # on an end frame: "<prompt tokens> <completion tokens>"
# JetStream's own de-duplication header: a publish retried after a lost ack is stored once.
H_MSG_ID = "Nats-Msg-Id"


def model_from_key(key: str) -> str:
    return model_from_token(key)


def node_from_key(key: str) -> str:
    return model_from_token(key)


def kv_stream(bucket: str) -> str:
    """The JetStream stream that backs a KV bucket (its replicas are raised through it)."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV put/delete of ``key`` is published on (core subscribers see every write)."""
    return f"$KV.{bucket}.{key}"
