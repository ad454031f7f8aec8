"""Help text in words: `--db DIR`, `PATH...`, and nothing after a flag.

typer (0.2x) labels every parameter with its Python annotation (`<list[str]>`, `<bool>`).
A person wants click's words (TEXT, INTEGER, PATH) or the metavar the verb chose, so the two
display hooks typer's help formatters call are replaced once, here, for every verb.
"""

from __future__ import annotations

from typing import Any

from typer import core

_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "path": "PATH", "file": "FILE",
          "directory": "DIR", "datetime": "TIME"}


def _option_words(self: core.TyperOption, ctx: Any) -> str | None:
    if self.metavar is not None:
        return self.metavar
    if getattr(self, "is_flag", False) or getattr(self, "count", False):
        return None
    label = self.display_type(ctx).strip("<>")
    many = label.startswith("list[")
    label = label.removeprefix("list[").removesuffix("]")
    word = _WORDS.get(label, label if "|" in label else label.upper())
    return f"{word}..." if many else word


def _argument_words(self: core.TyperArgument, ctx: Any) -> str | None:
    # The argument's name column already shows its metavar (PATH...): no second label.
    return None


def _argument_usage(self: core.TyperArgument) -> str:
    # click's words: `PATH...` when required, `[PATH]...` when not (typer writes `{PATH}`).
    name = self.display_name_raw.rstrip(".").strip("[]")
    name = name if self.required else f"[{name}]"
    return f"{name}..." if self.nargs != 1 else name


def install() -> None:
    """Idempotent; called when trustdb.cli is imported."""
    if hasattr(core.TyperOption, "display_type_rich"):
        core.TyperOption.display_type_rich = _option_words  # type: ignore[method-assign]
    if hasattr(core.TyperArgument, "display_type_rich"):
        core.TyperArgument.display_type_rich = _argument_words  # type: ignore[method-assign,assignment]
    if hasattr(core.TyperArgument, "_usage_display_name"):
        core.TyperArgument._usage_display_name = _argument_usage  # type: ignore[method-assign]
