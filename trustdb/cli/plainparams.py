"""Parameters coerced without pydantic: text, integers, flags, paths, and lists of them.

typer (0.29) coerces every parameter that is not a flag through a pydantic TypeAdapter, built on
first use: importing pydantic and building the adapters of one verb cost 0.05-0.1 s of every
command's start-up (issue 11, profiled), the largest part of an unchanged re-import's and of
`trustdb run`'s Python start. The CLI's parameters are plain (str, int, bool, Path, and lists
of those, with no parser, range or path type of their own): those are coerced here, as click
did; every other parameter keeps typer's own path. A typer without this hook (older than the
pydantic coercion) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from typer import BadParameter, core

_PLAIN = (str, int, Path, bool)
_BOOL_WORDS = {"1": True, "true": True, "t": True, "yes": True, "y": True, "on": True,
               "0": False, "false": False, "f": False, "no": False, "n": False, "off": False}


def install() -> None:
    if not hasattr(core, "build_runtime_param") or not hasattr(core, "_TyperParameter"):
        return
    from typer import _coercion

    typer_build = _coercion.build_runtime_param

    @dataclass(frozen=True)
    class PlainRuntimeParam(_coercion.RuntimeParam):  # type: ignore[misc,name-defined]
        leaf: type

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return [self._one(v, param, ctx) for v in value]
            return self._one(value, param, ctx)

        def _one(self, value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, bytes):
                value = value.decode(errors="surrogateescape")
            if self.leaf is str:
                return str(value)
            if self.leaf is bool:
                word = value if isinstance(value, bool) else _BOOL_WORDS.get(str(value).lower())
                if word is None:
                    raise BadParameter(f"{value!r} is not a valid boolean.", ctx=ctx, param=param)
                return word
            if self.leaf is int:
                try:
                    return int(value)
                except (TypeError, ValueError):
                    raise BadParameter(
                        f"{value!r} is not a valid integer.", ctx=ctx, param=param
                    ) from None
            from typer._param_types import coerce_cli_path

            # A Path instance: typer's own path checks run (exists, readable, ...), and its
            # pydantic conversion of a string is not needed.
            return coerce_cli_path(
                Path(value), self.parameter_info, path_type=Path, param=param, ctx=ctx
            )

    def build(descriptor: Any) -> Any:
        leaf = _plain_leaf(descriptor)
        if leaf is None:
            return typer_build(descriptor)
        return PlainRuntimeParam(
            parameter_info=descriptor.parameter_info, annotation=descriptor.annotation, leaf=leaf
        )

    core.build_runtime_param = build


def _plain_leaf(descriptor: Any) -> type | None:
    """str, int or Path when the parameter is one of those (or a list of one) with nothing
    typer would add: no parser, click type, range or path type of its own."""
    if getattr(descriptor, "file_annotation", None) is not None:
        return None
    info = descriptor.parameter_info
    for extra in ("parser", "click_type", "min", "max", "path_type"):
        if getattr(info, extra, None) is not None:
            return None
    if getattr(info, "clamp", False):
        return None
    annotation = descriptor.annotation
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation) or (None,)
    return annotation if annotation in _PLAIN else None
