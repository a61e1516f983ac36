"""Commands from other distributions: the entry points of the group ``msgbroker.cli`` (see
docs/cli.md, "Adding commands").

Each entry point is either a ``typer.Typer``, which becomes the command named like the entry point
(its one command, or a group of its commands), or a function that gets a fresh ``typer.Typer`` and
adds commands to it. A name that is taken (a built-in command, or a plugin's earlier in the order of
entry point names) stays with its owner. A plugin that cannot be loaded becomes a command of the
entry point's name that says why when it is run, so that the other commands stay quiet.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Sequence

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ._argv import PASS_THROUGH
from ._errors import CliError

ENTRY_POINT_GROUP = "msgbroker.cli"

NOT_INSTALLED = {
    "bench": "the benchmark harness is not installed: it is msgbroker-bench in the repository's bench/ folder "
    "(pip install -e bench, or run scripts/bench)",
}
"""What to say when a command a known distribution adds is asked for and that distribution is absent."""


def add_plugins(root: TyperGroup) -> None:
    """Add the commands of every installed plugin to ``root``."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry_point in sorted(found, key=lambda ep: (ep.name, ep.value)):
        try:
            commands = _load(entry_point)
        except Exception as exc:
            if os.environ.get("MSGBROKER_DEBUG"):
                raise
            commands = _unloadable(entry_point, exc)
        for name, command in commands.commands.items():
            if name not in root.commands:
                root.add_command(command, name)


def check_installed(args: Sequence[str], root: TyperGroup) -> None:
    """Fail with an install hint when ``args`` ask for a known plugin's command that is absent."""
    if args and args[0] in NOT_INSTALLED and args[0] not in root.commands:
        raise CliError(NOT_INSTALLED[args[0]])


def _load(entry_point: importlib.metadata.EntryPoint) -> TyperGroup:
    plugin = entry_point.load()
    if isinstance(plugin, typer.Typer):
        command = typer.main.get_command(plugin)  # a new object: ours to rename
        command.name = entry_point.name  # what the help lists
        return TyperGroup(name=entry_point.name, commands={entry_point.name: command})
    if callable(plugin):
        holder = typer.Typer()
        plugin(holder)
        return typer.main.get_group(holder)
    raise TypeError(f"{entry_point.value} is neither a typer.Typer nor a function that adds commands to one")


def _unloadable(entry_point: importlib.metadata.EntryPoint, exc: Exception) -> TyperGroup:
    dist = entry_point.dist
    origin = f"{dist.name} {dist.version}" if dist is not None else entry_point.value
    reason = f"{type(exc).__name__}: {exc}"

    def unloadable() -> None:
        raise CliError(f"the command {entry_point.name!r} of {origin} cannot be loaded: {reason}")

    holder = typer.Typer()
    holder.command(
        entry_point.name,
        help=escape(f"Cannot be loaded ({origin}): {reason}"),
        context_settings=PASS_THROUGH,
        add_help_option=False,
    )(unloadable)
    return typer.main.get_group(holder)
