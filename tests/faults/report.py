"""Print the figures of the fault runs (``.brokers/fault-results.jsonl``) as a Markdown table.

Run: .venv/bin/python -m tests.faults.report  (after scripts/test tests/faults)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ("provider", "scenario", "published", "handled", "lost", "duplicates", "redelivered",
           "order_violations", "kills", "restarts", "pauses")


def main() -> int:
    path = ROOT / ".brokers" / "fault-results.jsonl"
    if not path.exists():
        print(f"no results at {path.relative_to(ROOT)}: run scripts/test tests/faults first", file=sys.stderr)
        return 1
    latest: dict[tuple[str, str], dict[str, object]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        latest[(str(row["provider"]), str(row["scenario"]))] = row  # the newest run of each
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for key in sorted(latest):
        row = latest[key]
        print("| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
