"""The README's two install routes, on a new venv, without a network: the wheels of scripts/wheels
(``pip install --find-links``) and the repository's folders (``pip install './core[redis]'
./plugins/redis``). Then the installed command runs, and two processes share a broker through the
sqlite extra.

The new venv gets the third-party dependencies (pydantic, redis-py, ...) from the repository's
.venv through a folder of links on its path, without the editable msgbroker distributions of that
.venv: pip then resolves every msgbroker requirement (extras and version ranges included) from
the wheels or folders alone, and finds the rest already installed, so ``--no-index`` holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALL_EXTRAS = "msgbroker[redis,nats,rabbitmq,kafka,sqlite,prometheus,otel]"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSGBROKER_", "PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _third_party_view(into: Path) -> Path:
    """Links to everything in this venv's site-packages except the msgbroker distributions."""
    site = Path(sysconfig.get_paths()["purelib"])
    into.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if "msgbroker" in name or name.endswith(".pth") or name.startswith(("__editable__", "__pycache__")):
            continue
        (into / entry.name).symlink_to(entry)
    return into


def _new_venv(path: Path, view: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60, env=_env())
    python = path / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (Path(site) / "third_party.pth").write_text(f"{view}\n", encoding="utf-8")
    return python


def _pip(python: Path, *args: str | Path) -> str:
    return _run(sys.executable, "-m", "pip", "--python", python, *args, "--no-index", timeout=240)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(ROOT / "scripts" / "wheels", "--out", out, timeout=300)
    return out


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _third_party_view(tmp_path_factory.mktemp("deps") / "site")


def test_scripts_wheels_builds_every_distribution(wheels: Path) -> None:
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert names == ["msgbroker", "msgbroker_bench", "msgbroker_conformance", "msgbroker_kafka", "msgbroker_nats",
                     "msgbroker_rabbitmq", "msgbroker_redis", "msgbroker_sqlite"]


def test_the_wheels_install_into_a_new_venv_and_the_command_runs(wheels: Path, view: Path, tmp_path: Path) -> None:
    python = _new_venv(tmp_path / "venv", view)
    _pip(python, "install", "--find-links", wheels, ALL_EXTRAS)
    _run(sys.executable, "-m", "pip", "--python", python, "check")
    where = json.loads(_run(python, "-c", (
        "import json, importlib.metadata as md, msgbroker, msgbroker_redis, msgbroker_sqlite\n"
        "meta = md.metadata('msgbroker')\n"
        "print(json.dumps({'file': msgbroker.__file__, 'licence': meta['License-Expression'],\n"
        "  'classifiers': meta.get_all('Classifier'), 'requires': md.requires('msgbroker-redis'),\n"
        "  'dists': sorted(d.metadata['Name'] for d in md.distributions()\n"
        "                  if d.metadata['Name'].startswith('msgbroker'))}))"
    )))
    assert Path(where["file"]).is_relative_to(tmp_path / "venv"), where["file"]  # the wheel, not the repository
    assert where["licence"] == "MIT" and "Typing :: Typed" in where["classifiers"]
    assert "msgbroker<0.2,>=0.1.0" in where["requires"]
    assert where["dists"] == ["msgbroker", "msgbroker-kafka", "msgbroker-nats", "msgbroker-rabbitmq",
                              "msgbroker-redis", "msgbroker-sqlite"]
    command = tmp_path / "venv" / "bin" / "msgbroker"
    help_text = _run(command, "--help")
    for name in ("publish", "tail", "pending", "health", "dlq", "metrics"):
        assert name in help_text
    # Two processes of the installed command share a broker through the sqlite extra.
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    published = _run(command, "publish", "orders", '[{"n": 1}, {"n": 2}]', "-u", url)
    assert "published 2 messages" in published and "in-process" not in published  # no memory:// note
    pending = json.loads(_run(command, "pending", "orders", "-g", "billing", "-u", url, "--json").splitlines()[-1])
    assert pending["pending"] == 2


def test_the_repository_folders_install_with_an_extra(view: Path, tmp_path: Path) -> None:
    """README: ``pip install './core[redis]' ./plugins/redis`` (the extra alone names a package no
    index has yet; the folder beside it satisfies it)."""
    source = tmp_path / "repo"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests")
    for folder in ("core", "plugins/redis"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    python = _new_venv(tmp_path / "venv", view)
    _pip(python, "install", "--no-build-isolation", f"{source / 'core'}[redis]", source / "plugins" / "redis")
    out = _run(python, "-c", "import msgbroker, msgbroker_redis; print(msgbroker.connect('redis://127.0.0.1:1').provider)")
    assert out.strip() == "redis"


def test_the_readme_gives_the_commands_tested_here() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("scripts/wheels", "pip install --find-links dist 'msgbroker[redis]'",
                    "pip install './core[redis]' ./plugins/redis", "pip install ./core"):
        assert f"\n{command}" in readme, f"README's Install no longer shows {command!r}"
