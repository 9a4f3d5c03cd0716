"""Engine kinds. ``vllm`` and ``hf`` arrive with their own issues."""

from __future__ import annotations

from workers.engines.base import Engine, EngineLoad, Job, Output

ENGINE_KINDS = ("sim", "openai", "hf")

__all__ = ["ENGINE_KINDS", "Engine", "EngineLoad", "Job", "Output"]
