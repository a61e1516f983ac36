"""The commands on the single servers: up, down, status, logs, restart, kill, pause, resume, wait."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

from .apt import apt_install
from .broker import Broker
from .common import Failure, rel, say
from .envfile import ENV_FILE, env_lines, write_env_file
from .locking import locked
from .servers import BROKERS, names_arg
from .tls import ensure_tls_material


def ensure_installed(brokers: list[Broker]) -> None:
    packages: list[str] = [] if not brokers or shutil.which("openssl") else ["openssl"]  # the TLS test CA
    for b in brokers:
        for p in b.missing_packages():
            if p not in packages:
                packages.append(p)
    apt_install(packages)
    for b in brokers:
        b.install_other()
        missing = b.missing_packages()
        if missing:
            raise Failure(f"{b.name}: still missing after install: {', '.join(missing)}")


async def bring_up(brokers: list[Broker]) -> dict[str, str]:
    """Start what is not running, wait for everything to answer; return {name: failure}."""
    waits: list[tuple[Broker, float, bool]] = []
    failures: dict[str, str] = {}
    if any(not b.external_url() for b in brokers):
        try:
            ensure_tls_material()
        except Failure as e:
            return {b.name: str(e) for b in brokers}
    running = [b for b in brokers if not b.external_url() and b.proc.state() not in (None, "T", "t")]
    checks = await asyncio.gather(*(b.healthy(timeout=5.0) if b.tls_stale() else b.all_healthy(timeout=5.0)
                                    for b in running))
    healthy = {b.name for b, (ok, _) in zip(running, checks, strict=True) if ok}
    for b in brokers:
        ext = b.external_url()
        if ext:
            say(f"{b.name}: using your own server {ext} ({b.env_var} is set); checking it answers")
            waits.append((b, min(15.0, b.start_timeout), False))
            continue
        if b.proc.pid() is not None:
            if b.proc.state() in ("T", "t"):
                failures[b.name] = f"{b.name} is paused (SIGSTOP); run: scripts/brokers resume {b.name}"
                continue
            outdated = b.config_stale()
            if outdated:
                # The server's own settings changed (not just its certificate): restart it once.
                say(f"{b.name}: running, but {outdated}; restarting it (keeping its data)")
                port = b.port()
                b.stop()
                try:
                    b.start(port)
                except Failure as e:
                    failures[b.name] = str(e)
                    continue
                waits.append((b, b.start_timeout, True))
                continue
            stale = b.tls_stale()
            if stale and b.tls_renewal_is_cheap():
                say(f"{b.name}: running, but {stale}; starting it")
                try:
                    b.renew_tls()
                except Failure as e:
                    failures[b.name] = str(e)
                    continue
                waits.append((b, b.start_timeout, True))
                continue
            if stale:
                # Never restart a running server behind the back of tests that use it.
                say(f"{b.name}: WARNING: running, but {stale}, so {b.tls_env_var} is left out; "
                    f"`scripts/brokers restart {b.name}` restarts it with one (keeping its data)")
            if b.name in healthy:
                tls = "" if stale or not b.serves_tls else f", TLS on {b.tls_port()}"
                say(f"{b.name}: already running and healthy on port {b.port()}{tls}")
                continue
            say(f"{b.name}: running (pid {b.proc.pid()}) but not answering yet; waiting")
            waits.append((b, b.start_timeout, True))
            continue
        try:
            b.start()
        except Failure as e:
            failures[b.name] = str(e)
            continue
        waits.append((b, b.start_timeout, True))

    failures.update(await await_ready(waits))
    for b in brokers:
        if b.name not in failures and not b.external_url() and b.proc.pid() is not None:
            try:
                await b.after_ready()
            except Failure as e:
                failures[b.name] = str(e)
    return failures


async def await_ready(waits: list[tuple[Broker, float, bool]]) -> dict[str, str]:
    """Wait for each (broker, timeout, watch its process) in parallel; return {name: failure}."""

    async def one(b: Broker, timeout: float, watch: bool) -> str | None:
        t0 = time.monotonic()
        try:
            await b.wait_healthy(timeout, watch_process=watch)
        except Failure as e:
            return str(e)
        tls = "" if b.external_url() or b.tls_stale() or not b.serves_tls else f", TLS on {b.own_tls_url()}"
        say(f"{b.name}: ready on {b.current_url()}{tls} after {time.monotonic() - t0:.1f}s")
        return None

    results = await asyncio.gather(*(one(*w) for w in waits))
    return {b.name: r for (b, _, _), r in zip(waits, results, strict=True) if r}


def print_env(brokers: list[Broker]) -> None:
    """The lines of .brokers/env on stdout, with the passwords we generated as ***: output may end
    in a log (redis-auth's users' passwords are only in .brokers/env and under .brokers/redis-auth)."""
    hidden = [s for b in brokers for s in b.secrets()]
    for line in env_lines(brokers):
        for secret in hidden:
            line = line.replace(secret, "***")
        print(line, flush=True)


def cmd_up(names: list[str]) -> int:
    brokers = names_arg(names)
    t0 = time.monotonic()
    with locked():
        try:
            ensure_installed([b for b in brokers if not b.external_url()])
        except Failure as e:
            say(f"ERROR: {e}")
            return 1
        failures = asyncio.run(bring_up(brokers))
        write_env_file(list(BROKERS.values()))
    print_env([b for b in brokers if b.name not in failures])
    for f in failures.values():
        say(f"ERROR: {f}")
    if failures:
        return 1
    say(f"up: {', '.join(b.name for b in brokers)} ready in {time.monotonic() - t0:.1f}s; "
        f"settings in {rel(ENV_FILE)} (set -a; . {rel(ENV_FILE)}; set +a)")
    return 0


def cmd_down(names: list[str]) -> int:
    brokers = names_arg(names)
    with locked():
        for b in brokers:
            if b.external_url() and b.proc.pid() is None:
                say(f"{b.name}: your own server ({b.env_var}) is left alone")
                continue
            if not b.stop():
                say(f"{b.name}: not running")
        write_env_file(list(BROKERS.values()))
    return 0


async def gather_status() -> list[tuple[str, ...]]:
    async def row(b: Broker) -> tuple[str, ...]:
        ext = b.external_url()
        pid = b.proc.pid()
        if ext and pid is None:
            ok, why = await b.healthy(ext, timeout=3.0)
            return (b.name, "external", "-", ext, b.external_tls_url() or "-",
                    "yes" if ok else f"no ({why[:60]})", "-")
        port = b.port()
        tls = str(b.tls_port() or "-")
        if pid is None:
            return (b.name, "stopped", "-", str(port or "-"), tls, "-", rel(b.log))
        state = {"T": "paused", "t": "paused"}.get(b.proc.state() or "", "running")
        stale = b.tls_stale()
        if state == "paused":
            healthy = "no (paused)"
        elif stale:
            tls = "-"
            ok, why = await b.healthy(timeout=3.0)
            healthy = f"{'yes' if ok else f'no ({why[:60]})'}; but {stale}: scripts/brokers restart {b.name}"
        else:
            ok, why = await b.all_healthy(timeout=3.0)
            healthy = "yes" if ok else f"no ({why[:60]})"
        return (b.name, state, str(pid), str(port or "-"), tls, healthy, rel(b.log))

    return list(await asyncio.gather(*(row(b) for b in BROKERS.values())))


def cmd_status() -> int:
    rows = [("NAME", "STATE", "PID", "PORT", "TLS PORT", "HEALTHY", "LOG"), *asyncio.run(gather_status())]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=False)) + "  " + r[6])
    return 0


def cmd_logs(name: str, lines: int, follow: bool) -> int:
    b = BROKERS[name]
    if not b.log.exists():
        say(f"{name}: no log yet ({rel(b.log)})")
        return 1
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(b.log)]
    os.execvp("tail", argv)
    return 0


def ours(b: Broker, action: str) -> bool:
    if b.external_url() and b.proc.pid() is None:
        say(f"{b.name}: {action} only acts on servers started by scripts/brokers; "
            f"{b.env_var} points at your own server")
        return False
    return True


def cmd_restart(names: list[str]) -> int:
    requested = names_arg(names)
    brokers = [b for b in requested if ours(b, "restart")]
    failures: dict[str, str] = {b.name: "not ours" for b in requested if b not in brokers}
    with locked():
        ensure_installed(brokers)
        for b in brokers:
            port = b.port()
            b.stop()
            try:
                b.start(port)
            except Failure as e:
                failures[b.name] = str(e)
        waits = [(b, b.start_timeout, True) for b in brokers if b.name not in failures]
        failures.update(asyncio.run(await_ready(waits)))
        for b in brokers:
            if b.name not in failures:
                try:  # what lives in the server's data, as `up` does (Kafka: its SCRAM users)
                    asyncio.run(b.after_ready())
                except Failure as e:
                    failures[b.name] = str(e)
        write_env_file(list(BROKERS.values()))
    print_env([b for b in brokers if b.name not in failures])
    for _name, f in failures.items():
        if f != "not ours":
            say(f"ERROR: {f}")
    return 1 if failures else 0


def cmd_signal(names: list[str], sig: int, verb: str) -> int:
    rc = 0
    with locked():
        for b in names_arg(names):
            if not ours(b, verb):
                rc = 1
                continue
            pid = b.proc.pid()
            if pid is None:
                say(f"{b.name}: not running")
                rc = 1
                continue
            b.proc.signal(sig)
            if sig == signal.SIGKILL:
                if not b.proc.wait_gone(10):
                    say(f"{b.name}: pid {pid} still there after SIGKILL")
                    rc = 1
                    continue
                b.proc.forget()
                say(f"{b.name}: killed (pid {pid}); start it again with: scripts/brokers up {b.name}")
            elif sig == signal.SIGSTOP:
                deadline = time.monotonic() + 5
                while b.proc.state() not in ("T", "t") and time.monotonic() < deadline:
                    time.sleep(0.02)
                say(f"{b.name}: paused (pid {pid}); wake it with: scripts/brokers resume {b.name}")
            else:
                say(f"{b.name}: resumed (pid {pid})")
        write_env_file(list(BROKERS.values()))
    return rc


def cmd_wait(names: list[str], timeout: float | None) -> int:
    brokers = names_arg(names)

    async def run() -> list[str]:
        async def one(b: Broker) -> str | None:
            if b.proc.pid() is None and not b.external_url():
                return f"{b.name} is not running; start it with: scripts/brokers up {b.name}"
            t = timeout if timeout is not None else b.start_timeout
            deadline = time.monotonic() + t
            last = ""
            while True:
                ok, last = await b.healthy(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                if ok:
                    return None
                if not b.external_url() and b.proc.pid() is None:
                    return f"{b.name} exited; {b.log_hint()}"
                if time.monotonic() >= deadline:
                    extra = " (it is paused: scripts/brokers resume)" if b.proc.state() in ("T", "t") else ""
                    return f"{b.name} not healthy after {t:.0f}s{extra} (last error: {last}); {b.log_hint()}"
                await asyncio.sleep(0.2)

        return [r for r in await asyncio.gather(*(one(b) for b in brokers)) if r]

    t0 = time.monotonic()
    failures = asyncio.run(run())
    for f in failures:
        say(f"ERROR: {f}")
    if not failures:
        say(f"{', '.join(b.name for b in brokers)} healthy ({time.monotonic() - t0:.1f}s)")
    return 1 if failures else 0
