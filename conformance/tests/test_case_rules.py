"""Every case names the rules of docs/semantics.md it checks, and docs/conformance.md lists each
case with exactly those rules (the provider author's view of what was proven)."""

from __future__ import annotations

import re
from pathlib import Path

from msgbroker_conformance import ConformanceSuite, FencingCases, case_info
from msgbroker_conformance._cases import RULES

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def _cases() -> dict[str, tuple[str, ...]]:
    infos = (case_info(getattr(cls, name)) for cls in (ConformanceSuite, FencingCases) for name in dir(cls))
    return {info.name: info.rules for info in infos if info is not None}


def test_every_case_names_the_rules_it_checks() -> None:
    for name, rules in _cases().items():
        assert rules, f"{name} names no rule of docs/semantics.md"
        assert set(rules) <= set(RULES), f"{name} names unknown rules {set(rules) - set(RULES)}"


def test_docs_conformance_lists_every_case_with_its_rules() -> None:
    rows = {m.group(1): tuple(r.strip() for r in m.group(2).split(","))
            for m in re.finditer(r"^\| `(test_\w+)` \| ([\w, ]+) \|", DOC.read_text(encoding="utf-8"), re.M)}
    for name, rules in _cases().items():
        assert name in rows, f"docs/conformance.md does not list {name}"
        assert rows[name] == rules, f"docs/conformance.md gives {name} the rules {rows[name]}, the code {rules}"
    assert set(rows) <= set(_cases()), f"docs/conformance.md lists cases that do not exist: {set(rows) - set(_cases())}"


def test_every_numbered_rule_of_the_semantics_is_known() -> None:
    semantics = (DOC.parent / "semantics.md").read_text(encoding="utf-8")
    numbered = set(re.findall(r"^(\d+)\. \*\*", semantics, re.M))
    missing = numbered - set(RULES)
    assert numbered and not missing, f"rules of docs/semantics.md without a RULES entry: {missing}"
