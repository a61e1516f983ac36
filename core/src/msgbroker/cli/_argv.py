"""Commands whose arguments all go to another program's ``main(argv)`` (``demo``, and plugins
such as ``bench``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

PASS_THROUGH: dict[str, Any] = {"allow_extra_args": True, "ignore_unknown_options": True}
"""``context_settings`` of such a command (declare it with ``add_help_option=False`` too, so that
``--help`` reaches the program)."""


def run_argv(entry: Callable[[list[str]], int | None], args: Sequence[str]) -> int:
    """Run ``entry(args)`` and return its exit code, an argparse ``SystemExit`` included."""
    try:
        return int(entry(list(args)) or 0)
    except SystemExit as exc:  # argparse --help or a usage error
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
