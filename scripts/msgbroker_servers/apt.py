"""Installing Debian packages without leaving their own services running: ours run with our
own config files."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import Failure, say
from .processes import pids_named


def have_root_or_sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    raise Failure("installing Debian packages needs root (or sudo)")


_apt_updated = False


def apt_install(packages: list[str]) -> None:
    """apt-get install the packages, never leaving their own services running."""
    global _apt_updated
    if not packages:
        return
    if not shutil.which("apt-get"):
        raise Failure(f"please install {', '.join(packages)} (no apt-get on this machine)")
    sudo = have_root_or_sudo()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists() and not sudo:
        # Stop dpkg from starting the packages' own services: ours run with our config.
        policy.write_text("#!/bin/sh\n# written by msgbroker scripts/brokers during apt-get install\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    epmd_before = pids_named("epmd")
    try:
        t0 = time.monotonic()
        if not _apt_updated:
            say("apt-get update")
            subprocess.run([*sudo, "apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"],
                           env=env, check=True, stdout=sys.stderr)
            _apt_updated = True
        say(f"apt-get install {' '.join(packages)}")
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends",
             "-o", "DPkg::Lock::Timeout=300", *packages],
            env=env,
            check=True,
            stdout=sys.stderr,
        )
        say(f"installed {' '.join(packages)} in {time.monotonic() - t0:.0f}s")
    except subprocess.CalledProcessError as e:
        raise Failure(f"apt-get failed ({e}); install {' '.join(packages)} by hand") from None
    finally:
        if made_policy:
            policy.unlink()
    stop_system_services(packages, sudo)
    # Erlang's postinst leaves an `epmd -daemon` on 0.0.0.0:4369 behind; it is not ours to keep.
    for pid in pids_named("epmd") - epmd_before:
        say(f"stopping the epmd (pid {pid}) that the package installation left running")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


def stop_system_services(packages: list[str], sudo: list[str]) -> None:
    """If dpkg started a package's own service anyway (no policy-rc.d honoured), stop it."""
    services = {"redis-server": "redis-server", "rabbitmq-server": "rabbitmq-server", "nats-server": "nats-server"}
    for pkg in packages:
        svc = services.get(pkg)
        if not svc:
            continue
        if Path("/run/systemd/system").is_dir():
            active = subprocess.run(["systemctl", "is-active", "--quiet", svc], check=False).returncode == 0
            if active:
                say(f"stopping the system service {svc} that the package started")
                subprocess.run([*sudo, "systemctl", "stop", svc], check=False)
        elif Path(f"/etc/init.d/{svc}").exists():
            running = subprocess.run(
                [*sudo, f"/etc/init.d/{svc}", "status"], check=False, capture_output=True
            ).returncode == 0
            if running:
                say(f"stopping the system service {svc} that the package started")
                subprocess.run([*sudo, f"/etc/init.d/{svc}", "stop"], check=False, capture_output=True)
