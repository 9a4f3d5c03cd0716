"""Engine kinds: the registry in :mod:`workers.engines.registry` lists them."""

from __future__ import annotations

from workers.engines.base import Engine, EngineLoad, Job, Output
from workers.engines.registry import ENGINES, EngineConfig

ENGINE_KINDS = ENGINES.names

__all__ = ["ENGINES", "ENGINE_KINDS", "Engine", "EngineConfig", "EngineLoad", "Job", "Output"]
