"""The engine kinds: one entry per kind with its options and its factory.

Admin validation, the CLI's ``--engine`` choices and engine flags, the node agent
(which flags a worker gets) and the worker (which engine it builds) all read this
table, so adding an engine kind touches this module and the engine's own module.
Engine modules are imported by the factories only: listing the kinds costs nothing
and needs no engine's dependencies (vLLM least of all).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nebula.errors import InvalidRequest
from workers.engines.base import Engine

if TYPE_CHECKING:
    from workers.engines.vllm import VllmSettings


@dataclass(frozen=True, slots=True)
class EngineOption:
    """One engine option: a key in ``ModelSpec.engine_options`` and a CLI flag."""

    name: str  # snake_case key; the flag is --name-with-dashes
    type: type[str] | type[int] | type[float]
    help: str
    required: bool = False
    # Secrets travel to a worker in this environment variable, never on its command line.
    env: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value: str) -> str | int | float:
        try:
            return self.type(value)
        except ValueError:
            raise InvalidRequest(
                f"{self.name} must be {'an integer' if self.type is int else 'a number'}, "
                f"got {value!r}",
                param=self.name,
            ) from None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a worker knows when it builds its engine (options are strings: they come
    from flags and from model specs in KV)."""

    model: str
    options: Mapping[str, str]
    max_concurrency: int | None = None  # None: the engine's own slot count
    model_path: str | None = None
    engine_args: tuple[str, ...] = ()
    gpu_memory: float = 0.0
    adapters: Mapping[str, str] = field(default_factory=dict)  # LoRA: name -> path


@dataclass(frozen=True, slots=True)
class EngineKind:
    name: str
    description: str
    factory: Callable[[EngineConfig], Engine]
    options: tuple[EngineOption, ...] = ()
    takes_engine_args: bool = False  # `-- args` go to the engine
    needs_model_path: bool = False
    # Checks a load before anything starts; may need the engine's package, so it runs
    # only where ``available()`` says that package is importable.
    check: Callable[[EngineConfig], None] | None = None
    available: Callable[[], bool] = lambda: True
    # Serves LoRA adapters (ModelSpec.adapters); this engine arg turns that on, and a
    # load with adapters gets it added.
    lora_flag: str | None = None

    def option(self, name: str) -> EngineOption | None:
        return next((o for o in self.options if o.name == name), None)

    def validate(self, cfg: EngineConfig, *, deep: bool = True) -> None:
        """Raise InvalidRequest naming the bad option; ``deep`` also runs ``check``."""
        unknown = sorted(k for k in cfg.options if self.option(k) is None)
        if unknown:
            raise InvalidRequest(
                f"engine {self.name!r} does not take option(s) {', '.join(unknown)}",
                param="engine_options",
            )
        for opt in self.options:
            value = cfg.options.get(opt.name)
            if value is None or value == "":
                if opt.required:
                    raise InvalidRequest(f"the {self.name} engine needs {opt.name}", param=opt.name)
                continue
            opt.convert(value)
        if self.needs_model_path and not cfg.model_path:
            raise InvalidRequest(f"the {self.name} engine needs a model path", param="model_path")
        if cfg.engine_args and not self.takes_engine_args:
            raise InvalidRequest(
                f"the {self.name} engine takes no engine args (after `--`)", param="engine_args"
            )
        if cfg.adapters and self.lora_flag is None:
            raise InvalidRequest(
                f"the {self.name} engine does not serve LoRA adapters", param="adapters"
            )
        if deep and self.check is not None and self.available():
            self.check(cfg)


class EngineRegistry:
    def __init__(self, kinds: tuple[EngineKind, ...], coming: Mapping[str, str]) -> None:
        self._kinds = {k.name: k for k in kinds}
        self.coming = dict(coming)  # announced, not built yet: name -> what it is

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def __iter__(self) -> Iterator[EngineKind]:
        return iter(self._kinds.values())

    def get(self, name: str) -> EngineKind:
        kind = self._kinds.get(name)
        if kind is not None:
            return kind
        if name in self.coming:
            raise InvalidRequest(
                f"engine {name!r} ({self.coming[name]}) is not available yet; "
                f"available engines: {', '.join(self.names)}",
                param="engine",
            )
        raise InvalidRequest(
            f"unknown engine {name!r}; available engines: {', '.join(self.names)}",
            param="engine",
        )

    def options(self) -> tuple[EngineOption, ...]:
        """Every kind's options once (kinds may share one), for the CLI."""
        seen: dict[str, EngineOption] = {}
        for kind in self._kinds.values():
            for opt in kind.options:
                seen.setdefault(opt.name, opt)
        return tuple(seen.values())

    def build(self, name: str, cfg: EngineConfig) -> Engine:
        kind = self.get(name)
        kind.validate(cfg, deep=False)  # the factory runs the engine's own checks
        return kind.factory(cfg)


# --- the kinds -----------------------------------------------------------------------


def _sim(cfg: EngineConfig) -> Engine:
    from nebula.settings import SimSettings
    from workers.engines.sim import SimEngine

    o = cfg.options
    return SimEngine(
        SimSettings(
            ttft_ms=float(o.get("ttft_ms") or 0),
            itl_ms=float(o.get("itl_ms") or 0),
            max_tokens=int(o.get("max_tokens") or 16),
            max_concurrency=cfg.max_concurrency or 8,
        )
    )


def _openai(cfg: EngineConfig) -> Engine:
    from nebula.settings import OpenAIUpstreamSettings
    from workers.engines.openai_bridge import OpenAIEngine

    o = cfg.options
    return OpenAIEngine(
        OpenAIUpstreamSettings(
            url=o["upstream_url"],
            api_key=o.get("upstream_api_key") or None,
            upstream_model=o.get("upstream_model") or None,
        ),
        max_concurrency=cfg.max_concurrency or 8,
    )


def _vllm_settings(cfg: EngineConfig) -> VllmSettings:
    from workers.engines.vllm import VllmSettings

    return VllmSettings(
        model=cfg.model,
        model_path=cfg.model_path,
        engine_args=tuple(cfg.engine_args),
        gpu_memory=cfg.gpu_memory,
        adapters=tuple(sorted(cfg.adapters.items())),
    )


def _vllm(cfg: EngineConfig) -> Engine:
    from workers.engines.vllm import VllmEngine

    return VllmEngine(_vllm_settings(cfg))


def _vllm_check(cfg: EngineConfig) -> None:
    from workers.engines.vllm import check_args

    check_args(_vllm_settings(cfg))


def _hf(cfg: EngineConfig) -> Engine:
    from workers.engines.hf import HFEngine, HFSettings

    assert cfg.model_path is not None  # needs_model_path
    o = cfg.options
    return HFEngine(
        HFSettings(
            model_path=cfg.model_path,
            max_concurrency=cfg.max_concurrency or 64,
            torch_threads=int(o.get("torch_threads") or 0),
            passes=int(o.get("passes") or 0),
            max_batch=int(o.get("max_batch") or 0),
        )
    )


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


ENGINES = EngineRegistry(
    (
        EngineKind(
            name="sim",
            description="simulated engine for tests and fabric benchmarks",
            factory=_sim,
            options=(
                EngineOption("ttft_ms", float, "sim: time to first token (ms)."),
                EngineOption("itl_ms", float, "sim: inter-token latency (ms)."),
                EngineOption("max_tokens", int, "sim: tokens when a request sets no limit."),
            ),
        ),
        EngineKind(
            name="openai",
            description="bridge to an OpenAI-compatible server",
            factory=_openai,
            options=(
                EngineOption(
                    "upstream_url",
                    str,
                    "openai: base URL such as http://127.0.0.1:8001/v1",
                    required=True,
                ),
                EngineOption(
                    "upstream_api_key", str, "openai: API key.", env="NEBULA_UPSTREAM_API_KEY"
                ),
                EngineOption(
                    "upstream_model",
                    str,
                    "openai: model name upstream (default: the Nebula model name).",
                ),
            ),
        ),
        EngineKind(
            name="hf",
            description="sentence-transformers embeddings in-process, dynamic batching",
            factory=_hf,
            needs_model_path=True,
            options=(
                EngineOption(
                    "torch_threads",
                    int,
                    "hf: torch CPU threads per pass (default: the cores divided among passes).",
                ),
                EngineOption(
                    "passes",
                    int,
                    "hf: forward passes at once (default: on CPU one per core, at most 4; "
                    "on GPU 1).",
                ),
                EngineOption(
                    "max_batch",
                    int,
                    "hf: texts per forward pass (default: 128 with one pass at a time, "
                    "64 with several).",
                ),
            ),
        ),
        EngineKind(
            name="vllm",
            description="vLLM in the worker process (flags after `--` go to vLLM)",
            factory=_vllm,
            takes_engine_args=True,
            check=_vllm_check,
            available=_vllm_available,
            lora_flag="--enable-lora",
        ),
    ),
    coming={},
)
