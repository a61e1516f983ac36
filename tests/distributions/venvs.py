"""New venvs that install msgbroker from the wheels of scripts/wheels without a network: what
``test_wheels.py`` and ``examples/service/tests/test_run_redis.py`` share (the latter imports it as
``tests.distributions.venvs``, with the repository root on ``sys.path``).

A new venv gets the third-party dependencies (pydantic, redis-py, ...) from the repository's
.venv through a folder of links on its path, without the editable msgbroker distributions of that
.venv: pip then resolves every msgbroker requirement (extras and version ranges included) from
the wheels or folders alone, and finds the rest already installed, so ``--no-index`` holds."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """This process's environment without what would point a child at the repository's .venv or
    settings (``MSGBROKER_*``, ``PIP_*``, ``PYTHON*``, ``VIRTUAL_ENV``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSGBROKER_", "PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          cwd=cwd)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def build_wheels(out: Path) -> Path:
    """``scripts/wheels --out OUT``: a wheel of every distribution of the repository."""
    run(ROOT / "scripts" / "wheels", "--out", out, timeout=300)
    return out


def third_party_view(into: Path) -> Path:
    """Links to everything in this venv's site-packages except the msgbroker distributions."""
    site = Path(sysconfig.get_paths()["purelib"])
    into.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if "msgbroker" in name or name.endswith(".pth") or name.startswith(("__editable__", "__pycache__")):
            continue
        (into / entry.name).symlink_to(entry)
    return into


def new_venv(path: Path, view: Path) -> Path:
    """A venv without pip at ``path`` that sees ``view`` (a :func:`third_party_view`): its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60, env=clean_env())
    python = path / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (Path(site) / "third_party.pth").write_text(f"{view}\n", encoding="utf-8")
    return python


def pip(python: Path, *args: str | Path) -> str:
    """This venv's pip, installing into ``python``'s venv, from no index."""
    return run(sys.executable, "-m", "pip", "--python", python, *args, "--no-index", timeout=240)


def install_from_wheels(path: Path, view: Path, wheels: Path, *requirements: str) -> Path:
    """A new venv at ``path`` with ``requirements`` installed from ``wheels`` alone: its python."""
    python = new_venv(path, view)
    pip(python, "install", "--find-links", wheels, *requirements)
    return python
