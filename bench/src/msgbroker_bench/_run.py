"""The whole run: which providers are up, the cells of each, the budget, the CSV."""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from ._cells import FIELDS, BrokerCpu, Cell, E2EVariant, PublishVariant, run_cell
from ._common import (
    BATCH,
    CALLERS,
    COUNTS,
    DRAIN_BACKLOG,
    ENV_VARS,
    GAP,
    NATIVE_KAFKA_PAYLOADS,
    PACED_PARTITIONS,
    PARTITION_CURVE,
    PAYLOAD_CURVE,
    PAYLOADS,
    PROVIDERS,
    RATE,
    WORKERS,
    load_env,
    ours_overrides,
    reachable,
)
from ._driver import Driver, Unsupported
from ._ours import OursDriver
from ._raw import RawRabbitRouted, raw_driver

__all__ = ["Plan", "main_async", "parse_args"]


def repo_root() -> Path:
    """The repository root: the nearest parent of the working directory with ``.brokers`` or
    ``scripts/brokers`` (falls back to the working directory)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "scripts" / "brokers").exists() or (folder / ".brokers").is_dir():
            return folder
    return here


@dataclass
class Target:
    provider: str
    url: str
    status: str  # "up" or why not


def find_targets(wanted: Sequence[str]) -> list[Target]:
    """Each wanted provider with its URL and whether it can run (plugin installed, server up)."""
    from msgbroker import registry

    installed = set(registry.names())
    ports = {"redis": 6379, "nats": 4222, "rabbitmq": 5672, "kafka": 9092}
    out = []
    for provider in wanted:
        if provider == "memory":
            out.append(Target(provider, "memory://", "up"))
            continue
        url = os.environ.get(ENV_VARS[provider], "")
        if provider == "kafka" and url and "://" in url:
            url = url.split("://", 1)[1]
        if provider not in installed:
            out.append(Target(provider, url, f"provider not installed (plugins/{provider} has not landed)"))
        elif not url:
            out.append(Target(provider, url, f"{ENV_VARS[provider]} is not set: run scripts/brokers up {provider}"))
        elif not reachable(url, ports[provider]):
            out.append(Target(provider, url, f"server at {url} does not answer: run scripts/brokers up {provider}"))
        else:
            out.append(Target(provider, url, "up"))
    return out


def broker_pid(root: Path, provider: str) -> int | None:
    """The server's pid from scripts/brokers' pid file (JSON ``{"pid": …}`` or a bare number)."""
    import json

    try:
        text = (root / ".brokers" / provider / "pid").read_text().strip()
    except OSError:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = value.get("pid")
    return value if isinstance(value, int) else None


def _ours_url(target: Target) -> str:
    return f"kafka://{target.url}" if target.provider == "kafka" else target.url


@dataclass
class Plan:
    quick: bool
    reps: int
    rep_timeout: float
    faststream: bool
    native: bool
    cells: list[str]


def _scale(plan: Plan, n: int) -> int:
    return max(50, n // 10) if plan.quick else n


class _E2EArgs(TypedDict):
    """The keyword arguments an end-to-end cell gives each of its variants."""

    messages: int
    size: int
    workers: int
    partitions: int
    timeout: float
    rate: NotRequired[float]
    gap: NotRequired[float]


def build_cells(target: Target, plan: Plan) -> list[Cell]:
    """The cells of one provider, each with its variants in interleaving order."""
    from ._faststream import faststream_driver
    from ._native import NativeVariant, native_driver

    provider = target.provider
    counts = {k: _scale(plan, v) for k, v in COUNTS[provider].items()}
    ours_url = _ours_url(target)
    overrides = ours_overrides(provider)
    cells: list[Cell] = []

    def ours(partitions: int = 64) -> Driver:
        return OursDriver(provider, ours_url, partitions, overrides)

    def raw() -> Driver:
        return raw_driver(provider, target.url)

    def fast() -> Driver:
        return faststream_driver(provider, target.url)

    def optional(cell: Cell, name: str, kind: str, make: Callable[[], Driver]) -> Driver | None:
        """The driver ``make`` builds, or None when it is Unsupported (the cell then says why)."""
        try:
            return make()
        except Unsupported as exc:
            cell.skipped.append((name, kind, "", str(exc)))
            return None

    if "drain" in plan.cells:
        from ._drain import DrainVariant

        # the backlog (a tenth with --quick); workers are processes, except on the memory
        # provider, whose broker lives in one process: there they are tasks of this one
        n = _scale(plan, DRAIN_BACKLOG)
        processes = provider != "memory"
        for workers in WORKERS:
            cell = Cell(provider, "drain", f"drain {workers} worker{'s' if workers > 1 else ''}",
                        {"payload": 100, "partitions": 64, "workers": workers, "ordered": "both"})
            bound = max(plan.rep_timeout, 90.0)
            for name, make in (("ours", ours), ("raw", raw)):
                cell.variants.append(
                    DrainVariant(name, make(), messages=n, workers=workers, processes=processes, timeout=bound))
            cells.append(cell)

    for mode in ("single", "batch"):
        if f"publish-{mode}" not in plan.cells:
            continue
        for size in PAYLOADS:
            n = counts[mode] // (4 if size >= 16384 else 1)
            cell = Cell(provider, f"publish-{mode}", f"publish {mode} {_size(size)}",
                        {"payload": size, "partitions": 64, "workers": 0, "ordered": ""})
            cell.variants.append(PublishVariant("ours", ours(), mode, n, size, BATCH))
            cell.variants.append(PublishVariant("raw", raw(), mode, n, size, BATCH))
            if provider == "rabbitmq":  # the same publishes routed to 64 queues as ours: the server's share
                routed = RawRabbitRouted(target.url)
                cell.variants.append(PublishVariant("raw-partitioned", routed, mode, n, size, BATCH))
            if provider == "memory" and mode == "batch":
                cell.variants.append(PublishVariant("ours-prebuilt", ours(), "prebuilt", n, size, BATCH))
            if plan.faststream and (driver := optional(cell, "faststream", "faststream", fast)) is not None:
                cell.variants.append(PublishVariant("faststream", driver, mode, n, size, BATCH))
            if plan.native and (provider != "kafka" or size in NATIVE_KAFKA_PAYLOADS):
                native = functools.partial(native_driver, provider, target.url, mode, repo_root())
                if (driver := optional(cell, "native", "native", native)) is not None:
                    cell.variants.append(
                        NativeVariant("native", driver, mode, n * (2 if provider == "kafka" else 5), size, BATCH))
            cells.append(cell)

    if "publish-concurrent" in plan.cells:
        for callers in CALLERS:
            n = counts["concurrent"]
            cell = Cell(provider, "publish-concurrent", f"publish {callers} callers 100 B",
                        {"payload": 100, "partitions": 64, "workers": 0, "ordered": ""})
            cell.variants.append(PublishVariant("ours", ours(), "concurrent", n, 100, BATCH, callers))
            cell.variants.append(PublishVariant("raw", raw(), "concurrent", n, 100, BATCH, callers))
            if provider == "rabbitmq":
                routed = RawRabbitRouted(target.url)
                cell.variants.append(PublishVariant("raw-partitioned", routed, "concurrent", n, 100, BATCH, callers))
            cells.append(cell)

    timeout = plan.rep_timeout
    if "latency-paced" in plan.cells:
        n = counts["paced"]
        for partitions in PACED_PARTITIONS.get(provider, (64,)):
            name = f"latency, publish() every {GAP * 1e3:g} ms, {partitions} partitions"
            cell = Cell(provider, "latency-paced", name,
                        {"payload": 100, "partitions": partitions, "workers": 1, "ordered": "both"})
            paced = _E2EArgs(messages=n, size=100, workers=1, partitions=partitions,
                             # 1,024 partitions cost both clients ~10 ms of CPU a message here
                             timeout=max(timeout, n * GAP * 3, n * partitions / 20_000), gap=GAP)
            cell.variants.append(E2EVariant("ours", ours(partitions), ordered=True, **paced))
            cell.variants.append(E2EVariant("raw", raw(), ordered=False, **paced))
            cells.append(cell)

    if "consume" in plan.cells:
        for workers in WORKERS:
            n = counts["e2e"]
            cell = Cell(provider, "consume", f"consume {workers} worker{'s' if workers > 1 else ''}",
                        {"payload": 100, "partitions": 64, "workers": workers, "ordered": "both"})
            common: _E2EArgs = {"messages": n, "size": 100, "workers": workers, "partitions": 64, "timeout": timeout}
            cell.variants.append(E2EVariant("ours", ours(), ordered=True, **common))
            cell.variants.append(E2EVariant("ours-unordered", ours(), ordered=False, **common))
            cell.variants.append(E2EVariant("raw", raw(), ordered=False, **common))
            if plan.faststream:
                # FastStream handles a quarter of the messages per repetition: it is several times
                # slower per message, and a rate needs no equal count (the doc says so)
                fs_common: _E2EArgs = {**common, "messages": max(200, n // 4)}
                if (driver := optional(cell, "faststream", "faststream", fast)) is not None:
                    cell.variants.append(E2EVariant("faststream", driver, ordered=False, **fs_common))
            cells.append(cell)

    if "latency" in plan.cells:
        rate = RATE[provider] / (2 if plan.quick else 1)
        n = counts["rate"]
        cell = Cell(provider, "latency", f"latency at {rate:,.0f} msg/s",
                    {"payload": 100, "partitions": 64, "workers": 1, "ordered": "both", "offered_rate": rate})
        common = _E2EArgs(messages=n, size=100, workers=1, partitions=64, timeout=timeout, rate=rate)
        cell.variants.append(E2EVariant("ours", ours(), ordered=True, **common))
        cell.variants.append(E2EVariant("raw", raw(), ordered=False, **common))
        if plan.faststream and (driver := optional(cell, "faststream", "faststream", fast)) is not None:
            cell.variants.append(E2EVariant("faststream", driver, ordered=False, **common))
        cells.append(cell)

    if "partitions" in plan.cells:
        n = counts["curve"]
        cell = Cell(provider, "partitions", "partition curve",
                    {"payload": 100, "partitions": "1-256", "workers": 1, "ordered": True})
        for partitions in PARTITION_CURVE:
            variant = E2EVariant(f"ours-p{partitions}", ours(partitions), messages=n, size=100, workers=1,
                                 partitions=partitions, ordered=True, timeout=timeout)
            cell.variants.append(variant)
        cells.append(cell)

    if "payloads" in plan.cells:
        for size in PAYLOAD_CURVE:
            n = counts["curve"] // (4 if size >= 16384 else 1)
            cell = Cell(provider, "payloads", f"payload curve {_size(size)}",
                        {"payload": size, "partitions": 64, "workers": 1, "ordered": True})
            common = _E2EArgs(messages=n, size=size, workers=1, partitions=64, timeout=timeout)
            cell.variants.append(E2EVariant("ours", ours(), ordered=True, **common))
            cell.variants.append(E2EVariant("raw", raw(), ordered=False, **common))
            cells.append(cell)
    return cells


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


MAIN_CELLS = ("drain", "publish-single", "publish-batch", "publish-concurrent", "consume", "latency", "latency-paced")
CURVE_CELLS = ("partitions", "payloads")
CELL_KINDS = MAIN_CELLS + CURVE_CELLS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="msgbroker bench",
        description="Benchmark msgbroker side by side with the raw clients, FastStream and native tools.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts and 2 repetitions (for debugging)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated (default: all)")
    parser.add_argument("--cells", default=",".join(CELL_KINDS), help="comma-separated workloads (default: all)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per variant (default 3; quick 2)")
    parser.add_argument("--rep-timeout", type=float, default=None, help="seconds one repetition may take")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 1500; quick: none); providers get shares, "
                             "cells past their provider's share are skipped and say so")
    parser.add_argument("--no-faststream", action="store_true", help="leave the FastStream baselines out")
    parser.add_argument("--no-native", action="store_true", help="leave the native tools out")
    parser.add_argument("--csv", default="docs/benchmarks/results.csv", help="where to write the raw rows")
    parser.add_argument("--doc", default="docs/benchmarks.md", help="the report to write ('' for none)")
    parser.add_argument("--profile", action="store_true", help="also profile the hot paths (cProfile)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the doc and plots from the CSV")
    parser.add_argument("--merge", action="store_true",
                        help="keep the CSV's rows of the providers not measured now (re-measure one provider "
                             "after a server restart spoiled its cells; the doc says which were merged); with "
                             "--cells, also the measured providers' rows of the other cells")
    parser.add_argument("--command", default=None, help="the command line to print in the doc")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    root = repo_root()
    os.chdir(root)
    load_env(root)
    csv_path = root / args.csv
    started = time.time()
    self_deadline = math.inf
    if not args.report_only:
        plan = Plan(
            quick=args.quick,
            reps=args.reps or (2 if args.quick else 3),
            rep_timeout=args.rep_timeout or (15.0 if args.quick else 20.0),
            faststream=not args.no_faststream,
            native=not args.no_native,
            cells=[c.strip() for c in args.cells.split(",") if c.strip()],
        )
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        targets = find_targets(wanted)
        run_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows: list[dict[str, Any]] = []
        if args.merge and csv_path.exists():
            only_cells = set(plan.cells) != set(CELL_KINDS)
            with csv_path.open() as handle:
                kept = [r for r in csv.DictReader(handle)
                        if r["provider"] not in wanted or (only_cells and r["workload"] not in plan.cells)]
            for row in kept:
                row["config"] = row.get("config", "")
            rows.extend(kept)
            log(f"kept {len(kept)} rows of {sorted({r['provider'] for r in kept})} from {csv_path}")
        budget = args.budget if args.budget is not None else (math.inf if args.quick else 1500.0)
        # the profile and the report come after the cells: keep time for them
        cells_end = time.monotonic() + budget - (45.0 if args.profile else 10.0)
        self_deadline = time.monotonic() + budget
        weights = {"memory": 0.6, "redis": 1.0, "nats": 1.0, "rabbitmq": 1.0, "kafka": 1.4}
        from ._cleanup import cleanup

        for target in targets:
            if target.status != "up":
                log(f"{target.provider}: skipped: {target.status}")
                rows.append({"provider": target.provider, "workload": "provider", "cell": "provider",
                             "variant": "ours", "kind": "ours", "rep": "-", "status": f"n/a: {target.status}"})
        up = [t for t in targets if t.status == "up"]
        # Two passes, so that every provider has its main rows before any draws its cost curves:
        # the main cells get three quarters of the time, the curves the rest.
        phase_start = time.monotonic()
        phases = [("main", MAIN_CELLS, 0.75), ("curves", CURVE_CELLS, 1.0)]
        for phase, kinds, until in phases:
            phase_end = phase_start + (cells_end - phase_start) * until if math.isfinite(cells_end) else math.inf
            for index, target in enumerate(up):
                cells = [c for c in build_cells(target, plan) if c.workload in kinds]
                if not cells:
                    continue
                t0 = time.monotonic()
                log(f"{target.provider} ({phase}): {target.url}")
                cpu = BrokerCpu(broker_pid(root, target.provider) if target.provider != "memory" else None)
                ahead = [t.provider for t in up[index:]]
                share = weights[target.provider] / sum(weights[p] for p in ahead)
                deadline = t0 + max(0.0, phase_end - t0) * share
                for cell in cells:
                    if time.monotonic() > deadline:
                        log(f"  {target.provider} {cell.name}: skipped (time budget)")
                        rows.append({"provider": cell.provider, "workload": cell.workload, "cell": cell.name,
                                     **cell.params, "variant": "ours", "kind": "ours", "rep": "-",
                                     "status": "n/a: skipped, the run's time budget was spent"})
                        continue
                    rows.extend(await run_cell(cell, plan.reps, cpu, plan.rep_timeout, log, deadline))
                _stamp(rows, run_at)
                removed = await cleanup(target.provider, target.url)
                log(f"{target.provider} ({phase}): {time.monotonic() - t0:.0f}s "
                    f"(removed {removed} benchmark streams/keys/topics)")
                _write_csv(csv_path, rows)
            phase_start = time.monotonic()
        _stamp(rows, run_at)
        _write_csv(csv_path, rows)
        log(f"wrote {csv_path} ({len(rows)} rows) in {time.time() - started:.0f}s")
    if args.profile:
        from ._profile import profile_hot_paths

        await profile_hot_paths(root, log, deadline=self_deadline,
                                providers=[p.strip() for p in args.providers.split(",") if p.strip()],
                                out_dir=(root / args.doc).parent / "benchmarks" if args.doc else None)
    if args.doc:
        from ._report import write_report

        command = args.command or " ".join(["msgbroker bench", *getattr(args, "argv", sys.argv[1:])])
        write_report(root, csv_path, root / args.doc, command, time.time() - started, log, rewrite=args.report_only)
    return 0


def _stamp(rows: list[dict[str, Any]], run_at: str) -> None:
    for row in rows:
        row.setdefault("run_at", run_at)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
