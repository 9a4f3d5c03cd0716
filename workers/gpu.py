"""What a node has: GPUs (through NVML, or simulated), CPUs and memory.

NVML comes from NVIDIA's ``nvidia-ml-py`` (module ``pynvml``). On a machine
without the driver every NVML call fails; the node then reports no GPUs and
runs CPU engines only. Simulated GPUs (``"2x80GiB"``, ``"80GiB,40GiB"``) let
tests and demos exercise GPU placement on any machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from types import ModuleType

from nebula.errors import InvalidRequest
from nebula.protocol import GpuInfo

log = logging.getLogger(__name__)

_UNITS = {
    "": 1 << 30,  # a bare number is GiB
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_ITEM = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_MAX_SIMULATED = 1024


def parse_size(text: str) -> int:
    """``80GiB`` -> bytes. A bare number means GiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if m is None or m.group(2).lower() not in _UNITS:
        raise InvalidRequest(f"not a memory size: {text!r} (try 80GiB or 40GB)", param="gpus")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_simulated_gpus(spec: str) -> list[GpuInfo]:
    """``"2x80GiB"``, ``"80GiB,40GiB"``, ``"2x80GiB,1x40GiB"``; ``""`` or ``"none"``: no GPUs."""
    text = spec.strip()
    if text.lower() in ("", "0", "none"):
        return []
    gpus: list[GpuInfo] = []
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None or m.group(3).lower() not in _UNITS:
            raise InvalidRequest(
                f"bad simulated GPU spec {item.strip()!r} in {spec!r}: "
                "use COUNTxSIZE or SIZE, comma-separated (2x80GiB,40GiB)",
                param="gpus",
            )
        count = int(m.group(1) or 1)
        size = int(float(m.group(2)) * _UNITS[m.group(3).lower()])
        if count < 1 or size <= 0:
            raise InvalidRequest(f"bad simulated GPU spec {item.strip()!r}", param="gpus")
        if len(gpus) + count > _MAX_SIMULATED:
            raise InvalidRequest(f"at most {_MAX_SIMULATED} simulated GPUs", param="gpus")
        label = item.strip().split("x", 1)[-1].split("*", 1)[-1].strip()
        for _ in range(count):
            gpus.append(
                GpuInfo(
                    index=len(gpus),
                    name=f"simulated {label}",
                    memory_total=size,
                    memory_free=size,
                )
            )
    return gpus


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuInventory:
    """The node's GPUs. ``read()`` is called on every heartbeat, so free memory is current.

    ``simulated`` is a spec for :func:`parse_simulated_gpus`; otherwise NVML is asked,
    and any NVML failure (no driver, no library) means no GPUs.
    """

    def __init__(self, simulated: str | None = None) -> None:
        self.simulated = simulated is not None
        self._static: list[GpuInfo] = parse_simulated_gpus(simulated) if simulated else []
        self._nvml: ModuleType | None = None
        if simulated is None:
            self._nvml = _nvml_init()

    @property
    def source(self) -> str:
        return "simulated" if self.simulated else "nvml" if self._nvml is not None else "none"

    def read(self) -> list[GpuInfo]:
        if self._nvml is None:
            return list(self._static)
        try:
            return _nvml_read(self._nvml)
        except Exception as e:  # the driver went away (or never quite worked)
            log.warning("NVML query failed, reporting no GPUs: %s", e)
            self.close()
            return []

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()


def _nvml_init() -> ModuleType | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
        log.info("no NVML (%s): reporting no GPUs", e or type(e).__name__)
        return None
    return pynvml


def _nvml_read(nvml: ModuleType) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:  # some devices (MIG instances) have no utilisation counter
            util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
        except Exception:
            util = -1.0
        gpus.append(
            GpuInfo(
                index=i,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                memory_total=int(mem.total),
                memory_free=int(mem.free),
                utilization=util,
            )
        )
    return gpus


def nvml_gpus() -> list[GpuInfo]:
    """One-shot NVML inventory; ``[]`` on any failure."""
    inv = GpuInventory()
    try:
        return inv.read()
    finally:
        inv.close()


# --- CPU and memory ---------------------------------------------------------------


def cpu_count() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory() -> tuple[int, int]:
    """(total, available) bytes of system memory."""
    try:
        with open("/proc/meminfo") as f:
            info = {}
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    info[key] = int(parts[0]) * (1024 if parts[-1:] == ["kB"] else 1)
        total = info["MemTotal"]
        return total, info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 0, 0
