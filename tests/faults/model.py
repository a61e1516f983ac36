"""The message the fault tests publish, and the checker that reads the records."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from msgbroker import Message


class FaultMessage(Message):
    key: str
    seq: int
    pad: str = ""

    @property
    def partition_key(self) -> str:
        return self.key


@dataclass
class Verdict:
    """What the checker found, from the publish confirmations and the handling records."""

    published: int
    handled: int
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicates: int = 0
    order_violations: list[str] = field(default_factory=list)
    redelivered: int = 0

    def summary(self) -> str:
        return (f"published={self.published} handled={self.handled} lost={len(self.lost)} "
                f"duplicates={self.duplicates} redelivered={self.redelivered} "
                f"order_violations={len(self.order_violations)} unexpected={len(self.unexpected)}")


def read_records(*paths: Path) -> list[dict[str, object]]:
    """Every complete JSON line of the record files (a killed worker may leave a torn last line)."""
    out: list[dict[str, object]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class RecordTail:
    """The ids handled so far, read incrementally (a 1M-message soak must not re-parse the file
    on every poll). A torn last line is left for the next read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.ids: set[str] = set()
        self.lines = 0

    def read(self) -> set[str]:
        if not self.path.exists():
            return self.ids
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            try:
                self.ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError):
                continue  # a killed worker's torn line, followed by a newline from the next writer
            self.lines += 1
        self.offset += end
        return self.ids


def check(published: list[FaultMessage], records: list[dict[str, object]]) -> Verdict:
    """Jepsen-style total-queue and per-key order check.

    lost: confirmed but never handled. duplicates: handled more than once (legal under
    at-least-once; counted). order violation: the *first* handling of a key's messages is not in
    publish order (a skip or a reordering) — a redelivery that rewinds to an unacked message and
    goes on in order is a duplicate, not a violation.
    """
    sent = {str(m.message_id): m for m in published}
    counts = Counter(str(r["id"]) for r in records)
    verdict = Verdict(published=len(sent), handled=len(counts))
    verdict.lost = sorted(set(sent) - set(counts))
    verdict.unexpected = sorted(set(counts) - set(sent))
    verdict.duplicates = sum(c - 1 for c in counts.values())
    verdict.redelivered = sum(1 for r in records if int(str(r["attempt"])) > 1)
    expected_next: dict[str, int] = defaultdict(int)
    order: dict[str, list[int]] = defaultdict(list)
    for message in published:
        order[message.key].append(message.seq)
    seen: set[str] = set()
    position: dict[str, int] = defaultdict(int)
    for record in records:
        rid = str(record["id"])
        if rid in seen or rid not in sent:
            continue
        seen.add(rid)
        key, seq = str(record["key"]), int(str(record["seq"]))
        wanted = order[key][position[key]] if position[key] < len(order[key]) else None
        if seq != wanted:
            verdict.order_violations.append(f"key {key}: first handling of seq {seq}, expected {wanted}")
        position[key] += 1
        expected_next[key] = seq + 1
    return verdict
