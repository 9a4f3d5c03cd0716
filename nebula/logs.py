"""Logging: one line format per process (readable text or JSON), a level per component,
the request id on every line about a request, and reading ``nebula up``'s log files
back merged in time order (``nebula logs``).

The request id lives in a context variable: set where a request enters a process
(gateway route, worker job task), it follows every task started from there, and a
logging filter copies it onto each record, so call sites never pass it by hand.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("nebula_request_id", default="")

FORMATS = ("text", "json")
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}
# Attributes every LogRecord has; anything else was passed with ``extra=``.
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "request_id",
    "color_message",  # uvicorn's coloured copy of the message
}


class _Clock:
    """ISO-8601 UTC stamps; the seconds part is formatted once per second, not per line."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((created - second) * 1000):03d}Z"


def _iso(created: float) -> str:
    return _Clock().iso(created)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``2026-11-24T04:48:16.123Z INFO  gateway.app [req=abc] message``"""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component
        self.clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        line = (
            f"{self.clock.iso(record.created)} {record.levelname:<7} {self.component} {record.name}"
            + (f" [req={rid}]" if rid else "")
            + f" {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, component, logger, msg, request_id, extras."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component
        self.clock = _Clock()
        self.encoder = msgspec.json.Encoder(enc_hook=str)  # ~10x json.dumps

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self.clock.iso(record.created),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        extra = record.__dict__.keys() - _STD
        for key in extra:
            if not key.startswith("_"):
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self.encoder.encode(out).decode()


def parse_levels(spec: str) -> tuple[int, dict[str, int]]:
    """``"info"`` or ``"warning,gateway=debug,workers.worker=info"``: a default level and
    levels per logger prefix (gateway, workers, nebula.scheduler, ...)."""
    default = logging.WARNING
    per: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, level = part.rpartition("=")
        value = _LEVELS.get(level.strip().lower())
        if value is None:
            raise ValueError(f"unknown log level {level.strip()!r} in {spec!r}")
        if sep:
            per[name.strip()] = value
        else:
            default = value
    return default, per


def configure(
    *,
    component: str,
    level: str = "warning",
    fmt: str = "text",
    file: Path | None = None,
) -> None:
    """Set up this process's root logger (called once, by the CLI entry point)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    default, per = parse_levels(level)
    stream: IO[str] = sys.stderr
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter(component))
    handler.addFilter(_RequestIdFilter())
    # The logging HOWTO's "Optimization" switches (no caller, thread or process info)
    # stay off: an engine's own handler may need them (vLLM's format has %(process)d,
    # and every line of vLLM's failed to format without it).
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(default)
    for name, value in per.items():
        logging.getLogger(name).setLevel(value)


# --- reading log files back (`nebula logs`) -------------------------------------

_TEXT_TS = re.compile(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?)Z?\s")
# nats-server: "[1234] 2026/11/24 04:48:16.123456 [INF] ..."
_NATS_TS = re.compile(r"^\[\d+\] (\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?) ")
_RID_TEXT = re.compile(r"\[req=([^\]\s]+)\]")


@dataclass(frozen=True, slots=True)
class LogLine:
    ts: float
    component: str
    text: str
    request_id: str


def _parse_ts(text: str, *, utc: bool) -> float | None:
    """Nebula writes UTC (``...Z``); nats-server writes local time."""
    text = text.rstrip("Z").replace(",", ".").replace("/", "-").replace(" ", "T")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC) if utc else dt.astimezone()
    return dt.timestamp()


def parse_line(line: str, component: str, last_ts: float) -> LogLine:
    """A line of any of our files; one without a time stamp (a traceback, a CLI echo)
    takes the time of the line before it, so it stays with it when merged."""
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "ts" in obj:
            when = _parse_ts(str(obj["ts"]), utc=True) or last_ts
            return LogLine(when, component, line, str(obj.get("request_id", "")))
    rid = _RID_TEXT.search(line)
    rid_text = rid.group(1) if rid else ""
    for pattern, utc in ((_TEXT_TS, True), (_NATS_TS, False)):
        m = pattern.match(line)
        ts = _parse_ts(m.group(1), utc=utc) if m else None
        if ts is not None:
            return LogLine(ts, component, line, rid_text)
    return LogLine(last_ts, component, line, rid_text)


def component_of(path: Path, root: Path) -> str:
    """``gateway.log`` -> gateway; ``workers/<model>-<n>.log`` -> worker:<model>-<n>."""
    rel = path.relative_to(root)
    if len(rel.parts) > 1:
        return f"worker:{path.stem}"
    return path.stem


def log_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.log") if p.is_file())


def read_file(path: Path, component: str, offset: int = 0) -> tuple[list[LogLine], int]:
    """Complete lines of ``path`` from ``offset``; returns them and the new offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines: list[LogLine] = []
    last = 0.0
    for raw in data[:end].decode("utf-8", errors="replace").splitlines():
        if not raw.strip():
            continue
        parsed = parse_line(raw, component, last)
        last = parsed.ts
        lines.append(parsed)
    # Lines before the first time stamp (a banner) go with the first stamped line.
    first = next((ln.ts for ln in lines if ln.ts), 0.0)
    for i, ln in enumerate(lines):
        if ln.ts:
            break
        lines[i] = LogLine(first, ln.component, ln.text, ln.request_id)
    return lines, offset + end


def merged(
    root: Path, *, component: str | None = None, request_id: str | None = None
) -> tuple[list[LogLine], dict[Path, int]]:
    """Every line of every log file under ``root``, in time order (stable within a file)."""
    out: list[LogLine] = []
    offsets: dict[Path, int] = {}
    for path in log_files(root):
        comp = component_of(path, root)
        lines, offsets[path] = read_file(path, comp)
        out.extend(lines)
    out.sort(key=lambda ln: ln.ts)  # stable: lines of one file keep their order
    return [ln for ln in out if matches(ln, component, request_id)], offsets


def matches(line: LogLine, component: str | None, request_id: str | None) -> bool:
    if component and not (line.component == component or line.component.startswith(component)):
        return False
    return not request_id or line.request_id == request_id or request_id in line.text


def follow(
    root: Path,
    offsets: dict[Path, int],
    *,
    component: str | None = None,
    request_id: str | None = None,
) -> Iterator[LogLine]:
    """New lines since ``offsets`` (updated in place), new files included."""
    fresh: list[LogLine] = []
    for path in log_files(root):
        off = offsets.get(path, 0)
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size < off:  # truncated or replaced: start over
            off = 0
        if size == off:
            continue
        lines, offsets[path] = read_file(path, component_of(path, root), off)
        fresh.extend(lines)
    fresh.sort(key=lambda ln: ln.ts)
    return (ln for ln in fresh if matches(ln, component, request_id))
