"""Every distribution's pyproject.toml: the metadata `pip show` and an index show, the licence
file, and version ranges between the distributions of this repository."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = sorted(
    p.parent.relative_to(ROOT).as_posix()
    for p in [ROOT / "core/pyproject.toml", ROOT / "conformance/pyproject.toml", ROOT / "bench/pyproject.toml",
              *ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("examples/*/pyproject.toml")]
)
PLUGIN_CLIENTS = {
    "plugins/redis": ("msgbroker_redis", {"redis": "TESTED"}),
    "plugins/nats": ("msgbroker_nats", {"nats-py": "TESTED"}),
    "plugins/kafka": ("msgbroker_kafka", {"aiokafka": "TESTED"}),
    "plugins/rabbitmq": ("msgbroker_rabbitmq", {"aio-pika": "aio-pika", "aiormq": "aiormq"}),
}


def project(folder: str) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / folder / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return data


def ours() -> dict[str, Version]:
    """Each distribution of this repository by name, with its version."""
    return {project(d)["name"]: Version(project(d)["version"]) for d in DISTRIBUTIONS}


def requirements(folder: str) -> list[Requirement]:
    meta = project(folder)
    found = [Requirement(r) for r in meta.get("dependencies", [])]
    for extra in meta.get("optional-dependencies", {}).values():
        found += [Requirement(r) for r in extra]
    return found


def test_every_distribution_is_found() -> None:
    assert set(ours()) >= {"msgbroker", "msgbroker-redis", "msgbroker-nats", "msgbroker-rabbitmq",
                           "msgbroker-kafka", "msgbroker-sqlite", "msgbroker-conformance", "msgbroker-bench"}


@pytest.mark.parametrize("folder", DISTRIBUTIONS)
def test_the_metadata_is_complete(folder: str) -> None:
    meta = project(folder)
    assert meta["license"] == "MIT"
    assert meta["license-files"] == ["LICENSE"]
    assert (ROOT / folder / meta["readme"]).is_file()
    assert meta["description"] and meta["authors"] and meta["keywords"]
    classifiers = meta["classifiers"]
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: the licence is `license`, once"
    assert meta["requires-python"] == ">=3.11"


@pytest.mark.parametrize("folder", DISTRIBUTIONS)
def test_each_distribution_ships_the_repository_licence(folder: str) -> None:
    root_licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert root_licence.startswith("MIT License\n")
    assert (ROOT / folder / "LICENSE").read_text(encoding="utf-8") == root_licence


@pytest.mark.parametrize("folder", DISTRIBUTIONS)
def test_requirements_on_our_distributions_are_ranges_that_hold_this_version(folder: str) -> None:
    versions = ours()
    checked = 0
    for req in requirements(folder):
        if req.name not in versions:
            continue
        checked += 1
        operators = {spec.operator for spec in req.specifier}
        assert ">=" in operators and "<" in operators, f"{folder}: {req} needs a range like >=X,<Y"
        assert versions[req.name] in req.specifier, f"{folder}: {req} excludes {req.name} {versions[req.name]}"
        upper = next(Version(spec.version) for spec in req.specifier if spec.operator == "<")
        assert upper.release[:2] == (versions[req.name].major, versions[req.name].minor + 1), (
            f"{folder}: {req} should stop at the next minor version (0.x minors may break)"
        )
    if folder != "core":
        assert checked, f"{folder} does not depend on msgbroker"


def test_core_has_an_extra_per_provider() -> None:
    extras = project("core")["optional-dependencies"]
    for name in ("redis", "nats", "rabbitmq", "kafka", "sqlite"):
        assert [Requirement(r).name for r in extras[name]] == [f"msgbroker-{name}"]


def test_the_readme_extras_table_lists_every_extra_of_the_core() -> None:
    """README.md, "Install": the table of extras names each extra core/pyproject.toml defines (and
    no other), and what each adds."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("\n| extra | adds | for |"):]
    table = table[:table.index("\n\n")]
    listed: dict[str, str] = {}
    for row in table.splitlines()[3:]:
        names, adds = row.split(" | ")[:2]
        for name in re.findall(r"`\[(\w+)\]`", names):
            listed[name] = adds
    extras = project("core")["optional-dependencies"]
    assert sorted(listed) == sorted(extras)
    for name, reqs in extras.items():
        for req in reqs:
            assert Requirement(req).name.replace("msgbroker-", "") in listed[name].replace("<name>", name), (
                f"README's row of [{name}] does not say it adds {Requirement(req).name}")


@pytest.mark.parametrize("folder", sorted(PLUGIN_CLIENTS))
def test_a_plugin_requires_the_client_series_its_compat_module_was_tested_with(folder: str) -> None:
    """`_compat` refuses to import with another series: the install must not pick one."""
    package, clients = PLUGIN_CLIENTS[folder]
    source = (ROOT / folder / "src" / package / "_compat.py").read_text(encoding="utf-8")
    match = re.search(r"^TESTED = (.+)$", source, re.MULTILINE)
    assert match, f"no TESTED in {package}._compat"
    tested = ast.literal_eval(match.group(1))  # a tuple, or a dict of tuples (rabbitmq)
    by_name = {req.name: req for req in requirements(folder)}
    for client, key in clients.items():
        series = tested if key == "TESTED" else tested[key]
        req = by_name[client]
        major, minor = series
        assert Version(f"{major}.{minor}.0") in req.specifier, f"{req} excludes the tested {major}.{minor}"
        assert Version(f"{major}.{minor + 1}.0") not in req.specifier, f"{req} admits {major}.{minor + 1}"
        assert Version(f"{major}.{minor - 1}.99") not in req.specifier, f"{req} admits {major}.{minor - 1}"
