"""The README's two install routes, on a new venv, without a network: the wheels of scripts/wheels
(``pip install --find-links``) and the repository's folders (``pip install './core[redis]'
./plugins/redis``). Then the installed command runs, and two processes share a broker through the
sqlite extra. The new venvs and how they get the third-party dependencies: ``venvs.py``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from .venvs import ROOT, build_wheels, install_from_wheels, new_venv, pip, run, third_party_view

ALL_EXTRAS = "msgbroker[redis,nats,rabbitmq,kafka,sqlite,prometheus,otel]"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheels(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return third_party_view(tmp_path_factory.mktemp("deps") / "site")


def test_scripts_wheels_builds_every_distribution(wheels: Path) -> None:
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert names == ["msgbroker", "msgbroker_bench", "msgbroker_conformance", "msgbroker_kafka", "msgbroker_nats",
                     "msgbroker_outbox", "msgbroker_rabbitmq", "msgbroker_redis", "msgbroker_sqlite"]


def test_the_wheels_install_into_a_new_venv_and_the_command_runs(wheels: Path, view: Path, tmp_path: Path) -> None:
    python = install_from_wheels(tmp_path / "venv", view, wheels, ALL_EXTRAS)
    run(sys.executable, "-m", "pip", "--python", python, "check")
    where = json.loads(run(python, "-c", (
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
    help_text = run(command, "--help")
    for name in ("publish", "tail", "pending", "health", "dlq", "metrics"):
        assert name in help_text
    # Two processes of the installed command share a broker through the sqlite extra.
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    published = run(command, "publish", "orders", '[{"n": 1}, {"n": 2}]', "-u", url)
    assert "published 2 messages" in published and "in-process" not in published  # no memory:// note
    pending = json.loads(run(command, "pending", "orders", "-g", "billing", "-u", url, "--json").splitlines()[-1])
    assert pending["pending"] == 2


def test_the_repository_folders_install_with_an_extra(view: Path, tmp_path: Path) -> None:
    """README: ``pip install './core[redis]' ./plugins/redis`` (the extra alone names a package no
    index has yet; the folder beside it satisfies it)."""
    source = tmp_path / "repo"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests")
    for folder in ("core", "plugins/redis"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    python = new_venv(tmp_path / "venv", view)
    pip(python, "install", "--no-build-isolation", f"{source / 'core'}[redis]", source / "plugins" / "redis")
    out = run(python, "-c", "import msgbroker, msgbroker_redis; print(msgbroker.connect('redis://127.0.0.1:1').provider)")
    assert out.strip() == "redis"


def test_the_readme_gives_the_commands_tested_here() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("scripts/wheels", "pip install --find-links dist 'msgbroker[redis]'",
                    "pip install './core[redis]' ./plugins/redis", "pip install ./core"):
        assert f"\n{command}" in readme, f"README's Install no longer shows {command!r}"
