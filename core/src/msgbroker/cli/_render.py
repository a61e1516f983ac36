"""Output: rich consoles for people (stdout, and stderr for notes and progress), one-line JSON
documents for scripts."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def out() -> Console:
    """The console for results (stdout)."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # piped into grep or a file: no wrapping at 80 columns
    return console


def err() -> Console:
    """The console for notes and progress (stderr)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(value: Any) -> None:
    """One JSON document on one line of stdout."""
    sys.stdout.write(json.dumps(value, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def progress(enabled: bool) -> Progress:
    """A progress bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    console = err()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )


def payload(body: bytes) -> Any:
    """A message body as JSON when it is JSON, else as text."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def short(text: str, width: int = 60) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
