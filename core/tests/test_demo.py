"""The seat-lock demo ends with nothing lost and nothing out of order."""

from __future__ import annotations

import subprocess
import sys

from msgbroker.demo import run_demo


async def test_the_demo_loses_nothing_and_keeps_per_key_order() -> None:
    result = await run_demo("memory://", messages=3000, workers=3, sessions=20, areas=4, partition_count=16,
                            timeout=60, progress=False)
    assert result.published == 3000 == result.handled
    assert result.lost == 0 and result.out_of_order == 0
    assert result.workers_stopped == 1
    assert result.partitions_used == result.partitions_keyed > 8


def test_the_demo_command_prints_its_summary() -> None:
    out = subprocess.run([sys.executable, "-m", "msgbroker.demo", "--messages", "2000", "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lost                0" in out.stdout
    assert "out of order        0" in out.stdout
