"""CLI flags derived from the typed settings: one source for default, help and env name.

``@options_from(GatewaySettings)`` adds ``--max-body-bytes`` and friends; the
command passes what it got to ``GatewaySettings.from_env(**kw)``, which applies
flag > environment variable > default. Help text shows the default and the variable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from nebula.settings import base_type, env_name, settings_fields

F = TypeVar("F", bound=Callable[..., Any])

_CLICK_TYPES: dict[Any, Any] = {int: int, float: float, str: str, Path: click.Path(path_type=Path)}


def options_from(cls: type, *, exclude: Iterable[str] = (), prefix: str = "") -> Callable[[F], F]:
    skip = set(exclude)

    def decorate(f: F) -> F:
        for fld, tp in reversed(settings_fields(cls)):
            if fld.name in skip or not fld.metadata.get("cli", True):
                continue
            kind = base_type(tp)
            flag = "--" + prefix + fld.name.replace("_", "-")
            default = fld.default if fld.default is not fld.default_factory else None
            shown = f"default: {default}; " if default not in (None, "") else ""
            help_text = f"{fld.metadata['help']} [{shown}env: {env_name(fld)}]"
            if kind is bool:
                opt = click.option(
                    f"{flag}/--no-{prefix}{fld.name.replace('_', '-')}",
                    fld.name,
                    default=None,
                    help=help_text,
                )
            elif kind is dict:
                opt = click.option(flag, fld.name, default=None, metavar="K=V,...", help=help_text)
            else:
                opt = click.option(
                    flag, fld.name, type=_CLICK_TYPES.get(kind, str), default=None, help=help_text
                )
            f = opt(f)
        return f

    return decorate


def take(cls: type, kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the kwargs that belong to ``cls`` (flags of :func:`options_from`)."""
    names = {fld.name for fld, _ in settings_fields(cls) if fld.metadata.get("cli", True)}
    return {k: kw.pop(k) for k in list(kw) if k in names}
