"""Processes we start: detached in their own session, remembered in pid files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .common import Failure, say


def proc_info(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def pids_named(comm: str) -> set[int]:
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == comm:
                    found.add(int(d.name))
    return found


def rss_kib(pid: int) -> int:
    """Resident memory of one process in KiB (0 when it is gone)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Tracked:
    """A process we started, remembered in a pid file as JSON {pid, start} so that a reused
    pid is never mistaken for ours."""

    def __init__(self, pid_file: Path):
        self.pid_file = pid_file

    def read(self) -> tuple[int, int] | None:
        try:
            data = json.loads(self.pid_file.read_text())
            return int(data["pid"]), int(data["start"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def record(self, pid: int) -> None:
        info = proc_info(pid)
        start = info[1] if info else 0
        self.pid_file.write_text(json.dumps({"pid": pid, "start": start}) + "\n")

    def pid(self) -> int | None:
        """The pid when the recorded process is still there (running or stopped), else None."""
        rec = self.read()
        if rec is None:
            return None
        pid, start = rec
        info = proc_info(pid)
        if info is None or info[0] in ("Z", "X") or info[1] != start:
            return None
        return pid

    def state(self) -> str | None:
        pid = self.pid()
        if pid is None:
            return None
        info = proc_info(pid)
        return info[0] if info else None

    def paused(self) -> bool:
        return self.state() in ("T", "t")

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def signal(self, sig: int) -> bool:
        """Send sig to the process group we started (its own session); False when gone."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(pid, sig)
        return True

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, timeout: float, what: str) -> None:
        """SIGTERM (then SIGKILL after timeout) and wait until the process is gone."""
        if self.pid() is None:
            self.forget()
            return
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)  # a paused server must wake up to see the SIGTERM
        if not self.wait_gone(timeout):
            say(f"{what} did not stop within {timeout:.0f}s of SIGTERM; sending SIGKILL")
            self.signal(signal.SIGKILL)
            if not self.wait_gone(10):
                raise Failure(f"{what} (pid {self.pid()}) survived SIGKILL")
        self.forget()


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start a server detached in its own session, output appended to log; return its pid."""
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            close_fds=True,
        )
    return proc.pid


def log_tail(log: Path, lines: int = 8) -> str:
    """The last lines of a log, indented for an error message."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            tail = fh.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    | {line}" for line in tail)
