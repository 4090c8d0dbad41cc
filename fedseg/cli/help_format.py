"""Plain `--help` text without markup escapes.

typer (< 0.21, the range flwr allows) escapes the "[required]" / "[default: ...]" notes for
rich markup even when rich markup is off (`rich_markup_mode=None`), so plain help shows
"\\[required]". fedseg's commands format their help with a click formatter that writes those
notes as they are; `use_plain_help` switches every command of an app to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import click
import typer
from typer.core import TyperCommand, TyperGroup

MARKUP_ESCAPE = "\\["


class PlainHelpFormatter(click.HelpFormatter):
    def write_dl(self, rows: Sequence[tuple[str, str]], *args, **kwargs) -> None:
        super().write_dl([(term, text.replace(MARKUP_ESCAPE, "[")) for term, text in rows], *args, **kwargs)


class PlainHelpContext(click.Context):
    formatter_class = PlainHelpFormatter


class PlainHelpCommand(TyperCommand):
    context_class = PlainHelpContext


class PlainHelpGroup(TyperGroup):
    context_class = PlainHelpContext


def use_plain_help(app: typer.Typer) -> None:
    """Give `app`, its commands and its sub-apps the plain help formatter (before the app runs)."""
    if not _is_custom(app.info.cls, TyperGroup):
        app.info.cls = PlainHelpGroup
    for command in app.registered_commands:
        if not _is_custom(command.cls, TyperCommand):   # typer fills in TyperCommand itself
            command.cls = PlainHelpCommand
    groups: Iterable = app.registered_groups
    for group in groups:
        if group.typer_instance is not None:
            use_plain_help(group.typer_instance)


def _is_custom(cls: object, default: type) -> bool:
    """Whether a command class was chosen on purpose (not unset, typer's Default marker, or typer's own)."""
    return isinstance(cls, type) and cls is not default
