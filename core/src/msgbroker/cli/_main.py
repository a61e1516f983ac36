"""``main()``: run the command and turn every failure into one line on stderr and an exit code."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from .._errors import MsgBrokerError
from ._app import app
from ._errors import CliError
from ._loop import in_thread, loop_running, on_this_loop
from ._plugins import add_plugins, check_installed


def command() -> TyperGroup:
    """The ``msgbroker`` command: the built-in commands and the installed plugins'."""
    root = typer.main.get_group(app)
    add_plugins(root)
    return root


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"msgbroker: error: {_one_line(message)}\n")
    sys.stderr.flush()
    return code


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # `msgbroker tail ... | head`: the reader left, nothing to say
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # stops the interpreter's flush error at exit
        raise SystemExit(0) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``msgbroker`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Called where an event loop runs (an async test), it runs the command in a thread of its own
    and blocks that loop until the command ends; ``await main_async(argv)`` keeps the loop running.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if loop_running():
        return in_thread(lambda: _run(args))
    return _run(args)


async def main_async(argv: Sequence[str]) -> int:
    """``main(argv)`` for async code: the command's broker work runs on the calling event loop, which
    keeps serving its other tasks (a subscriber on the same ``memory://NAME`` broker, say)."""
    args = list(argv)
    return await on_this_loop(lambda: _run(args))


def _run(args: list[str]) -> int:
    try:
        root = command()
        check_installed(args, root)
        with _quiet_broken_pipe():
            result = root.main(args=args, prog_name="msgbroker", standalone_mode=False)
    except CliError as exc:
        return _fail(str(exc), exc.exit_code)
    except typer.Abort:
        return _fail("aborted", 1)
    except typer.TyperException as exc:
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        code = getattr(exc, "exit_code", 2)
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(message + "\n")
            return int(code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _fail(f"{message}{hint}", int(code))
    except MsgBrokerError as exc:
        return _fail(str(exc), 1)
    except ValidationError as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except Exception as exc:
        if os.environ.get("MSGBROKER_DEBUG"):
            raise
        return _fail(f"unexpected {type(exc).__name__}: {exc} (set MSGBROKER_DEBUG=1 for the traceback)", 1)
    return result if isinstance(result, int) else 0
