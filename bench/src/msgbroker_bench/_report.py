"""docs/benchmarks.md and its plots, from the CSV of one run."""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import platform
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from ._common import BATCH, COUNTS, DRAIN_BACKLOG, DRAIN_FETCH, DRAIN_KEYS, GAP, NATIVE_KAFKA_PAYLOADS, RATE
from ._stats import Spread, ratio_spread, spread

__all__ = ["write_report"]

PROVIDER_ORDER = ("memory", "redis", "nats", "rabbitmq", "kafka")
KIND_ORDER = ("ours", "raw", "faststream", "native")


def _num(value: str | None) -> float | None:
    try:
        out = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) else None


class Results:
    """The CSV rows, grouped: (provider, cell) -> variant -> reps."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows
        self.cells: dict[tuple[str, str], dict[str, list[dict[str, str]]]] = defaultdict(lambda: defaultdict(list))
        self.order: list[tuple[str, str]] = []
        for row in rows:
            key = (row["provider"], row["cell"])
            if key not in self.cells:
                self.order.append(key)
            self.cells[key][row["variant"]].append(row)

    def providers(self) -> list[str]:
        seen = {p for p, _ in self.order}
        return [p for p in PROVIDER_ORDER if p in seen]

    def provider_status(self, provider: str) -> str:
        reps = self.cells.get((provider, "provider"), {}).get("ours")
        return reps[0]["status"] if reps else "ok"

    def rates(self, provider: str, cell: str, variant: str) -> list[float | None]:
        """msgs/s of each repetition in order (None for a failed one)."""
        out: list[float | None] = []
        for row in self.cells.get((provider, cell), {}).get(variant, []):
            if row["rep"] == "-":
                continue
            out.append(_num(row["msgs_per_s"]) if row["status"] == "ok" else None)
        return out

    def values(self, provider: str, cell: str, variant: str, column: str) -> list[float | None]:
        """``column`` of each repetition in order (None for a failed one)."""
        rows = self.cells.get((provider, cell), {}).get(variant, [])
        return [_num(r.get(column)) if r["status"] == "ok" else None for r in rows if r["rep"] != "-"]

    def spread_of(self, provider: str, cell: str, variant: str, column: str = "msgs_per_s") -> Spread:
        rows = self.cells.get((provider, cell), {}).get(variant, [])
        return spread(v for r in rows if r["status"] == "ok" and (v := _num(r[column])) is not None)

    def status(self, provider: str, cell: str, variant: str) -> str | None:
        """Why a variant has no number (n/a or failure), or None when it has reps."""
        rows = self.cells.get((provider, cell), {}).get(variant, [])
        if not rows:
            return None
        bad = [r["status"] for r in rows if r["status"] != "ok"]
        ok = [r for r in rows if r["status"] == "ok"]
        if ok:
            return None
        return bad[0] if bad else None

    def first(self, provider: str, cell: str, variant: str, column: str) -> str:
        rows = self.cells.get((provider, cell), {}).get(variant, [])
        return rows[0].get(column, "") if rows else ""

    def cells_of(self, provider: str, workload: str) -> list[str]:
        out = []
        for p, cell in self.order:
            if p == provider:
                variants = self.cells[(p, cell)]
                any_row = next(iter(variants.values()))[0]
                if any_row["workload"] == workload:
                    out.append(cell)
        return out


# -- machine -----------------------------------------------------------------------------------


def _cmd(*args: str) -> str:
    if not shutil.which(args[0]):
        return ""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except Exception:
        return ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(root: Path, measured: str | None = None) -> list[str]:
    lscpu = _cmd("lscpu")
    fields = {}
    for line in lscpu.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    mem = ""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rabbit = _cmd("dpkg-query", "-W", "-f=${Version}", "rabbitmq-server")
    kafka = ""
    with_stamp = root / ".cache" / "kafka" / "lib.version"
    if with_stamp.exists():
        kafka = with_stamp.read_text().strip()
    redis_v = re.search(r"v=(\S+)", _cmd("redis-server", "--version"))
    head = _cmd("git", "-C", str(root), "rev-parse", "--short", "HEAD")
    status = _cmd("git", "-C", str(root), "status", "--short", "--untracked-files=no", "--", "core", "plugins")
    dirty = [line.split(maxsplit=1)[1] for line in status.splitlines() if len(line.split(maxsplit=1)) == 2]
    nats_v = _cmd(_nats_server(root), "--version")
    lines = [
        f"- CPU: {fields.get('Model name', '?')}; {fields.get('CPU(s)', '?')} logical CPUs "
        f"({fields.get('Core(s) per socket', '?')} cores per socket, {fields.get('Thread(s) per core', '?')} "
        f"threads per core); hypervisor: {fields.get('Hypervisor vendor', 'none reported')} "
        f"({fields.get('Virtualization type', '')})",
        f"- RAM: {mem}; kernel {platform.release()}; load average when the report was written: {load}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        "default asyncio event loop (no uvloop)",
        "- Client libraries: " + ", ".join(
            f"{d} {_version(d)}" for d in ("redis", "nats-py", "aio-pika", "aiormq", "aiokafka", "faststream",
                                            "pydantic", "pydantic-core")
        ),
        measured or (
            f"- Code measured: commit {head or '?'}"
            + (f" plus uncommitted changes (of other work in progress) in {', '.join(dirty)}" if dirty else "")
            + " — the harness runs the working tree (editable installs)"
        ),
        "- msgbroker: " + ", ".join(
            f"{d} {_version(d)}" for d in ("msgbroker", "msgbroker-redis", "msgbroker-nats", "msgbroker-rabbitmq",
                                            "msgbroker-kafka")
        ),
        f"- Brokers (all on 127.0.0.1, started by `scripts/brokers up`): Redis {redis_v.group(1) if redis_v else '?'}, "
        f"{nats_v or 'nats-server ?'} (JetStream, file storage), RabbitMQ {rabbit or '?'}, "
        f"Apache Kafka {kafka or '?'} (KRaft, one node)",
    ]
    return lines


def _nats_server(root: Path) -> str:
    """The nats-server binary `scripts/brokers up nats` started last: a build of the version its
    ``.brokers/nats/version`` names, or Debian's (``debian``, or an older scripts/brokers)."""
    try:
        version = (root / ".brokers" / "nats" / "version").read_text().strip()
    except OSError:
        version = "debian"
    built = root / ".cache" / "nats-server" / version / "nats-server"
    return str(built) if version != "debian" and built.exists() else "nats-server"


# -- tables --------------------------------------------------------------------------------------


def _fmt_rate(s: Spread) -> str:
    return s.text("{:,.0f}")


def _fmt_ratio(s: Spread) -> str:
    return s.text("{:.2f}")


def _cell_text(results: Results, provider: str, cell: str, variant: str) -> str:
    s = results.spread_of(provider, cell, variant)
    if s.n:
        return _fmt_rate(s)
    status = results.status(provider, cell, variant)
    if status is None:
        return "—"
    if "time budget" in status:
        return "skipped"
    return "n/a" if status.startswith("n/a") else "failed"


def _ratio(results: Results, provider: str, cell: str, ours: str, base: str) -> Spread:
    return ratio_spread(results.rates(provider, cell, ours), results.rates(provider, cell, base))


def _latency(results: Results, provider: str, cell: str, variant: str) -> str:
    parts = []
    for column in ("p50_ms", "p99_ms", "p999_ms"):
        s = results.spread_of(provider, cell, variant, column)
        if not s.n:
            return "—"
        parts.append(f"{s.median:.1f}")
    return " / ".join(parts)


def _cpu(results: Results, provider: str, cell: str, variant: str, column: str = "cpu_us_per_msg") -> str:
    s = results.spread_of(provider, cell, variant, column)
    return f"{s.median:.0f}" if s.n else "—"


def provider_table(results: Results, provider: str) -> list[str]:
    lines = [
        "| cell | ours msg/s | raw msg/s | FastStream msg/s | native msg/s | ours ÷ raw | ours ÷ FastStream "
        "| client CPU µs/msg (ours; raw) | broker CPU % (ours; raw) | latency ms p50 / p99 / p99.9 (ours; raw) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for workload in ("publish-single", "publish-batch", "consume", "latency"):
        for cell in results.cells_of(provider, workload):
            ours_variants = {"consume": ["ours", "ours-unordered"], "publish-batch": ["ours", "ours-prebuilt"]}.get(
                workload, ["ours"])
            for ours in ours_variants:
                if ours not in results.cells[(provider, cell)]:
                    continue
                name = {"ours-unordered": f"{cell}, ordered=False",
                        "ours-prebuilt": f"{cell}, messages built beforehand"}.get(ours, cell)
                if workload == "consume" and ours == "ours":
                    name = f"{cell}, ordered"
                lat = ""
                if workload in ("consume", "latency"):
                    lat = f"{_latency(results, provider, cell, ours)}; {_latency(results, provider, cell, 'raw')}"
                lines.append(
                    f"| {name} | {_cell_text(results, provider, cell, ours)} "
                    f"| {_cell_text(results, provider, cell, 'raw')} "
                    f"| {_cell_text(results, provider, cell, 'faststream')} "
                    f"| {_cell_text(results, provider, cell, 'native')} "
                    f"| {_fmt_ratio(_ratio(results, provider, cell, ours, 'raw'))} "
                    f"| {_fmt_ratio(_ratio(results, provider, cell, ours, 'faststream'))} "
                    f"| {_cpu(results, provider, cell, ours)}; {_cpu(results, provider, cell, 'raw')} "
                    f"| {_cpu(results, provider, cell, ours, 'broker_cpu_pct')}; "
                    f"{_cpu(results, provider, cell, 'raw', 'broker_cpu_pct')} | {lat} |"
                )
    return lines


def curve_table(results: Results, provider: str) -> list[str]:
    lines: list[str] = []
    cell = "partition curve"
    if (provider, cell) in results.cells and not _curve_variants(results, provider, cell):
        lines.append("Partition curve: skipped (the run's time budget was spent).")
    elif (provider, cell) in results.cells:
        variants = _curve_variants(results, provider, cell)
        head = " | ".join(v.split("-p")[-1] for v in variants)
        lines += [f"| partitions | {head} |", "|---|" + "---:|" * len(variants)]
        lines.append("| ours ordered, 1 worker, msg/s | " + " | ".join(
            _cell_text(results, provider, cell, v) for v in variants) + " |")
    payload_cells = _payload_cells(results, provider)
    if payload_cells:
        lines += ["", "| payload | " + " | ".join(_payload_label(c) for c in payload_cells) + " |",
                  "|---|" + "---:|" * len(payload_cells)]
        for variant, label in (("ours", "ours ordered, 1 worker"), ("raw", "raw, 1 worker")):
            lines.append(f"| {label}, msg/s | " + " | ".join(
                _cell_text(results, provider, c, variant) for c in payload_cells) + " |")
        lines.append("| ours ÷ raw | " + " | ".join(
            _fmt_ratio(_ratio(results, provider, c, "ours", "raw")) for c in payload_cells) + " |")
    return lines


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _per_call(results: Results, provider: str, cell: str, variant: str,
              columns: tuple[str, ...] = ("p50_ms", "p99_ms", "max_ms")) -> str:
    """Median over the repetitions of each latency column, ``p50 / p99 / max``."""
    parts = []
    for column in columns:
        s = results.spread_of(provider, cell, variant, column)
        if not s.n:
            return "—"
        parts.append(_ms(s.median))
    return " / ".join(parts)


def _column_ratio(results: Results, provider: str, cell: str, column: str) -> Spread:
    """Paired ratios ours ÷ raw of ``column`` (latencies: below 1 is better)."""
    return ratio_spread(results.values(provider, cell, "ours", column), results.values(provider, cell, "raw", column))


def publish_section(results: Results) -> list[str]:
    """Every publish shape, ours beside the raw client: rate, the time of each call, client CPU."""
    lines = [
        "Each publish shape beside the raw client doing the same: one `publish()` awaited at a time, 16 and "
        "256 tasks each awaiting one `publish()` at a time, and `publish_batch` (the raw client's batch: "
        "send each, then await all). *per call* is the time of one awaited call (p50 / p99 / max over the "
        "repetition's calls, medians over the repetitions); ratios pair repetitions measured back to back.",
        "",
    ]
    for provider in results.providers():
        rows = []
        for workload in ("publish-single", "publish-concurrent", "publish-batch"):
            for cell in results.cells_of(provider, workload):
                variants = results.cells[(provider, cell)]
                if "ours" not in variants or "raw" not in variants:
                    continue
                timed = workload != "publish-batch"
                rows.append(
                    f"| {cell} | {_cell_text(results, provider, cell, 'ours')} "
                    f"| {_cell_text(results, provider, cell, 'raw')} "
                    f"| {_fmt_ratio(_ratio(results, provider, cell, 'ours', 'raw'))} "
                    f"| {_per_call(results, provider, cell, 'ours') if timed else '—'}; "
                    f"{_per_call(results, provider, cell, 'raw') if timed else '—'} "
                    f"| {_fmt_ratio(_column_ratio(results, provider, cell, 'p99_ms')) if timed else '—'} "
                    f"| {_cpu(results, provider, cell, 'ours')}; {_cpu(results, provider, cell, 'raw')} |"
                )
        if rows:
            lines += [f"### {provider}", "",
                      "| shape | ours msg/s | raw msg/s | ours ÷ raw | per call ms p50 / p99 / max (ours; raw) "
                      "| per-call p99 ours ÷ raw | client CPU µs/msg (ours; raw) |",
                      "|---|---:|---:|---:|---|---:|---|", *rows, ""]
    return lines


def latency_section(results: Results) -> list[str]:
    """Publish → handler latency, ours beside the raw client: the paced cells and the open-loop one."""
    lines = [
        "Publish → handler, one subscriber (ours: ordered; raw: the client's consumer loop, a commit per "
        "fetched batch). *paced*: one `publish()` (raw: the client's send-and-wait) then a 5 ms sleep, "
        "latency from just before the publish call; *at N msg/s*: open loop in batches, from the intended "
        "send time. p50 / p99 / max are medians over the repetitions; the ratios (below 1: ours is faster) "
        "pair repetitions measured back to back. Client CPU is the whole process's (publisher and "
        "subscriber) per message.",
        "",
    ]
    for provider in results.providers():
        rows = []
        for workload in ("latency-paced", "latency"):
            for cell in results.cells_of(provider, workload):
                variants = results.cells[(provider, cell)]
                if "ours" not in variants or "raw" not in variants:
                    continue
                rows.append(
                    f"| {cell} | {_per_call(results, provider, cell, 'ours')} "
                    f"| {_per_call(results, provider, cell, 'raw')} "
                    f"| {_fmt_ratio(_column_ratio(results, provider, cell, 'p50_ms'))} "
                    f"| {_fmt_ratio(_column_ratio(results, provider, cell, 'p99_ms'))} "
                    f"| {_cpu(results, provider, cell, 'ours')}; {_cpu(results, provider, cell, 'raw')} |"
                )
        if rows:
            lines += [f"### {provider}", "",
                      "| cell | ours ms p50 / p99 / max | raw ms p50 / p99 / max | p50 ours ÷ raw | p99 ours ÷ raw "
                      "| client CPU µs/msg (ours; raw) |",
                      "|---|---|---|---:|---:|---|", *rows, ""]
    return lines


def _ms_spread(results: Results, provider: str, cell: str, variant: str, column: str) -> str:
    s = results.spread_of(provider, cell, variant, column)
    return f"{s.median:,.0f}" if s.n else "—"


RAW_LOOPS = {
    "memory": "`asyncio.Queue` `get()` + `json.loads` (no ack)",
    "redis": f"redis-py `XREADGROUP COUNT {DRAIN_FETCH}` + one `XACK` of the batch",
    "nats": f"nats-py durable pull consumer, `fetch({DRAIN_FETCH})` + `ack()` each",
    "rabbitmq": f"aio-pika, one quorum queue, prefetch {DRAIN_FETCH}, `ack()` each",
    "kafka": f"aiokafka `getmany(max_records={DRAIN_FETCH})` + one `commit()` per batch",
}


def drain_section(results: Results) -> list[str]:
    """The drain cell: a backlog handled by 1, 2 and 4 workers, ours ordered beside the raw loop."""
    rows = []
    for provider in results.providers():
        for cell in results.cells_of(provider, "drain"):
            variants = results.cells[(provider, cell)]
            backlog = max((_num(r.get("messages")) or 0 for v in variants.values() for r in v), default=0)
            how = "tasks of one process" if provider == "memory" else "processes"
            rows.append(
                f"| {provider} | {results.first(provider, cell, 'ours', 'workers') or cell} ({how}) "
                f"| {_cell_text(results, provider, cell, 'ours')} "
                f"| {_cell_text(results, provider, cell, 'raw')} "
                f"| {_fmt_ratio(_ratio(results, provider, cell, 'ours', 'raw'))} "
                f"| {_cpu(results, provider, cell, 'ours')}; {_cpu(results, provider, cell, 'raw')} "
                f"| {_ms_spread(results, provider, cell, 'ours', 'first_ms')}; "
                f"{_ms_spread(results, provider, cell, 'raw', 'first_ms')} "
                f"| {int(backlog):,} |"
            )
    if not rows:
        return []
    loops = "; ".join(f"{p}: {RAW_LOOPS[p]}" for p in results.providers() if p in RAW_LOOPS)
    return [
        f"A backlog of 100 B messages over {DRAIN_KEYS:,} keys and 64 partitions, published before the clock, "
        "handled by 1, 2 and 4 workers: **ours** ordered (each partition's messages one at a time, in order, "
        "each acked before the next), **raw** the client's fastest unordered loop, every worker in the same "
        "group or on the same queue. Each worker is a separate process with its own connection, started and "
        "connected before the clock; the clock starts when all are told to go (each then subscribes: joins the "
        "group, or starts its loop) and stops at the last message handled (acked) by any worker. Subscribing is "
        "timed because a subscribed client reads ahead while its handler waits (msgbroker up to `batch_size` "
        "per lane, aiokafka's fetcher, RabbitMQ's prefetch), which would drain part of the backlog untimed; "
        "*first message* shows what the start cost. The memory provider's broker lives in one process: its "
        "workers are tasks of the harness's process. Client CPU is the worker processes' CPU time (summed) "
        "from go to stop, per message. Raw loops: " + loops + ".",
        "",
        "| provider | workers | ours ordered msg/s | raw unordered msg/s | ours ÷ raw "
        "| client CPU µs/msg (ours; raw) | first message ms after go (ours; raw) | backlog |",
        "|---|---|---:|---:|---:|---|---|---:|",
        *rows,
    ]


# -- COMPASS targets ---------------------------------------------------------------------------


def targets(results: Results) -> list[str]:
    lines = ["| target | provider | measured (median ratio per cell; min–max over paired reps) | met? |",
             "|---|---|---|---|"]

    def judge(provider: str, cells: Iterable[str], ours: str, base: str, threshold: float) -> tuple[str, str]:
        parts, verdicts = [], []
        for cell in cells:
            s = _ratio(results, provider, cell, ours, base)
            if not s.n:
                continue
            parts.append(f"{cell}: {_fmt_ratio(s)}")
            verdicts.append(s.median >= threshold)
        if not verdicts:
            return "no baseline measured", "—"
        met = "yes" if all(verdicts) else ("partly" if any(verdicts) else "no")
        return "; ".join(parts), met

    for provider in results.providers():
        if results.provider_status(provider) != "ok":
            continue
        drains = [c for c in results.cells_of(provider, "drain") if c in ("drain 1 worker", "drain 4 workers")]
        text, met = judge(provider, drains, "ours", "raw", 0.8) if drains else ("drain cell not measured", "—")
        lines.append(f"| ordered drain, 1 and 4 workers, ≥ 0.8 × unordered raw loop | {provider} | {text} | {met} |")
    for provider in results.providers():
        if results.provider_status(provider) != "ok":
            continue
        publish = results.cells_of(provider, "publish-single") + results.cells_of(provider, "publish-batch")
        text, met = judge(provider, publish, "ours", "raw", 0.9)
        lines.append(f"| publish ≥ 0.9 × raw | {provider} | {text} | {met} |")
    for provider in results.providers():
        if results.provider_status(provider) != "ok":
            continue
        text, met = judge(provider, results.cells_of(provider, "consume"), "ours", "raw", 0.8)
        lines.append(f"| ordered consume ≥ 0.8 × unordered raw loop | {provider} | {text} | {met} |")
    for provider in results.providers():
        if results.provider_status(provider) != "ok" or provider == "memory":
            continue
        cells = [c for w in ("publish-single", "publish-batch", "consume") for c in results.cells_of(provider, w)]
        text, met = judge(provider, cells, "ours", "faststream", 2.0)
        lines.append(f"| ≥ 2 × FastStream on equal work | {provider} | {text} | {met} |")
    if "memory" in results.providers():
        parts, ok = [], []
        for cell, variant in (("publish batch 100 B", "ours"), ("publish batch 100 B", "ours-prebuilt"),
                              ("consume 1 worker", "ours"), ("consume 1 worker", "ours-unordered")):
            s = results.spread_of("memory", cell, variant)
            if s.n:
                label = cell + {"ours-unordered": ", ordered=False",
                                "ours-prebuilt": ", messages built beforehand"}.get(variant, "")
                parts.append(f"{label}: {_fmt_rate(s)} msg/s")
                ok.append(s.median >= 100_000)
        met = "—" if not ok else ("yes" if all(ok) else ("partly" if any(ok) else "no"))
        lines.append(f"| memory provider ≥ 100k msg/s | memory | {'; '.join(parts) or 'not measured'} | {met} |")
    return lines


# -- plots ---------------------------------------------------------------------------------------


def plots(results: Results, out_dir: Path, log: Callable[[str], None]) -> list[str]:
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        log("matplotlib is not installed: no plots (scripts/bench installs it)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    providers = [p for p in results.providers() if results.provider_status(p) == "ok"]
    colors = {"ours": "#1f77b4", "ours-unordered": "#6baed6", "ours-prebuilt": "#9ecae1", "raw": "#ff7f0e",
              "faststream": "#2ca02c", "native": "#7f7f7f"}

    def bars(workload: str, variants: list[str], filename: str, title: str, log_scale: bool = True) -> None:
        fig, axes = plt.subplots(1, len(providers), figsize=(3.2 * len(providers), 3.6), squeeze=False)
        any_data = False
        for ax, provider in zip(axes[0], providers, strict=True):
            cells = results.cells_of(provider, workload)
            width = 0.8 / max(1, len(variants))
            for i, variant in enumerate(variants):
                values, lows, highs = [], [], []
                for cell in cells:
                    s = results.spread_of(provider, cell, variant)
                    values.append(s.median if s.n else 0)
                    lows.append(s.median - s.low if s.n else 0)
                    highs.append(s.high - s.median if s.n else 0)
                if any(values):
                    any_data = True
                xs = [x + i * width for x in range(len(cells))]
                ax.bar(xs, values, width, yerr=[lows, highs], label=variant, color=colors.get(variant))
            ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(cells))])
            ax.set_xticklabels([_short_cell(c) for c in cells], fontsize=7)
            if log_scale:
                ax.set_yscale("log")
            ax.set_title(provider, fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
        axes[0][0].set_ylabel("msg/s (log)" if log_scale else "msg/s")
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        if any_data:
            fig.savefig(out_dir / filename, dpi=110)
            made.append(filename)
        plt.close(fig)

    if providers:
        bars("publish-single", ["ours", "raw", "faststream", "native"], "publish-single.png",
             "Publish, one confirmed await per message (median, min–max)")
        bars("publish-batch", ["ours", "raw", "faststream", "native"], "publish-batch.png",
             "Publish in batches of 500 (median, min–max)")
        bars("consume", ["ours", "ours-unordered", "raw", "faststream"], "consume.png",
             "End to end: publish + consume + ack each, 64 partitions, 10k keys, 1/2/4 workers", log_scale=False)

        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for provider in providers:
            cell = "partition curve"
            if (provider, cell) not in results.cells:
                continue
            variants = _curve_variants(results, provider, cell)
            xs, ys = [], []
            for v in variants:
                s = results.spread_of(provider, cell, v)
                if s.n:
                    xs.append(int(v.split("-p")[-1]))
                    ys.append(s.median)
            if xs:
                ax.plot(xs, ys, marker="o", label=provider)
                drawn = True
        if drawn:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("partition_count")
            ax.set_ylabel("msg/s (median)")
            ax.set_title("Ordered end-to-end throughput vs partitions (1 worker, 100 B)", fontsize=10)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / "partitions.png", dpi=110)
            made.append("partitions.png")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for i, provider in enumerate(providers):
            cells = _payload_cells(results, provider)
            for variant, style in (("ours", "-"), ("raw", "--")):
                sizes: list[float] = []
                rates: list[float] = []
                for cell in cells:
                    s = results.spread_of(provider, cell, variant)
                    size = _num(results.first(provider, cell, variant, "payload"))
                    if s.n and size:
                        sizes.append(size)
                        rates.append(s.median)
                if sizes:
                    ax.plot(sizes, rates, style, marker="o", color=f"C{i}", label=f"{provider} {variant}")
                    drawn = True
        if drawn:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("payload bytes")
            ax.set_ylabel("msg/s (median)")
            ax.set_title("End-to-end throughput vs payload (1 worker, 64 partitions)", fontsize=10)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(out_dir / "payloads.png", dpi=110)
            made.append("payloads.png")
        plt.close(fig)

        fig, axes = plt.subplots(1, len(providers), figsize=(3.2 * len(providers), 3.4), squeeze=False)
        drawn = False
        for ax, provider in zip(axes[0], providers, strict=True):
            cells = results.cells_of(provider, "latency")
            if not cells:
                continue
            cell = cells[0]
            for j, variant in enumerate(("ours", "raw", "faststream")):
                ys = []
                for column in ("p50_ms", "p99_ms", "p999_ms"):
                    s = results.spread_of(provider, cell, variant, column)
                    ys.append(s.median if s.n else 0)
                if any(ys):
                    drawn = True
                ax.bar([x + j * 0.27 for x in range(3)], ys, 0.27, label=variant, color=colors[variant])
            ax.set_xticks([x + 0.27 for x in range(3)])
            ax.set_xticklabels(["p50", "p99", "p99.9"], fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"{provider}: {cell.replace('latency at ', '')}", fontsize=8)
        axes[0][0].set_ylabel("ms publish → handler (log)")
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=7)
        fig.suptitle("Latency at a fixed offered rate (open loop, from the intended send time)", fontsize=10)
        fig.tight_layout()
        if drawn:
            fig.savefig(out_dir / "latency.png", dpi=110)
            made.append("latency.png")
        plt.close(fig)
    return made


def _payload_cells(results: Results, provider: str) -> list[str]:
    """The payload curve: the 1-worker consume cell (100 B) and the payload cells."""
    cells = results.cells_of(provider, "payloads")
    if cells and (provider, "consume 1 worker") in results.cells:
        cells = ["consume 1 worker", *cells]
    return cells


def _payload_label(cell: str) -> str:
    return "100 B" if cell == "consume 1 worker" else cell.replace("payload curve ", "")


def _curve_variants(results: Results, provider: str, cell: str) -> list[str]:
    """The partition curve's variants (``ours-p<N>``), by partition count."""
    names = [v for v in results.cells[(provider, cell)] if v.startswith("ours-p")]
    return sorted(names, key=lambda v: int(v.split("-p")[-1]))


def _short_cell(cell: str) -> str:
    for prefix in ("publish single ", "publish batch ", "consume "):
        cell = cell.removeprefix(prefix)
    return cell.replace(" workers", " w").replace(" worker", " w")


# -- the document --------------------------------------------------------------------------------


def _configs(results: Results) -> list[str]:
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for row in results.rows:
        kind = row.get("kind", "")
        if not row.get("config") or kind == "":
            continue
        variant = "ours" if kind == "ours" else kind
        key = (row["provider"], variant)
        if key not in seen or (kind == "ours" and "partition_count=64" in row["config"]):
            seen[key] = (row.get("label", ""), row["config"])
    lines = ["| provider | variant | what | configuration |", "|---|---|---|---|"]
    for provider in PROVIDER_ORDER:
        for kind in KIND_ORDER:
            if (provider, kind) in seen:
                label, config = seen[(provider, kind)]
                lines.append(f"| {provider} | {kind} | {label} | {config} |")
    return lines


def _parameters(results: Results) -> list[str]:
    reps = max((int(r["rep"]) for r in results.rows if str(r.get("rep", "")).isdigit()), default=0)
    lines = [
        f"Repetitions per variant: {reps} (interleaved). Publish cells: batches of {BATCH}; end-to-end cells: "
        "batches of 100 with at most 2,000 messages ahead of the handlers, 64 partitions, 10,000 keys; "
        "16 KiB cells use a quarter of the messages; FastStream end-to-end repetitions a quarter; native tools "
        "5× (redis-benchmark) or 2× (kafka-producer-perf-test, "
        f"{', '.join(f'{p // 1024} KiB' for p in NATIVE_KAFKA_PAYLOADS)} only: a JVM start per repetition) "
        "the publish count. Drain cell: a backlog of "
        f"{DRAIN_BACKLOG:,} messages ({DRAIN_KEYS:,} keys; `--quick`: a tenth) published in batches of {BATCH} "
        "before each repetition's clock, after a warm-up drain of 200 (the group's first join).",
        "",
        "| provider | publish single | publish batch | publish, concurrent callers | end to end | curves "
        "| latency cell (offered rate) | paced latency cell |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for provider in PROVIDER_ORDER:
        c = COUNTS[provider]
        lines.append(f"| {provider} | {c['single']:,} | {c['batch']:,} | {c['concurrent']:,} | {c['e2e']:,} "
                     f"| {c['curve']:,} | {c['rate']:,} at {RATE[provider]:,.0f} msg/s "
                     f"| {c['paced']:,}, {GAP * 1e3:g} ms apart |")
    lines.append("")
    lines.append("(messages per repetition of a full run; `--quick` uses a tenth)")
    return lines


def _checks(results: Results) -> list[str]:
    """Order and duplicate counts of the end-to-end cells, per provider and variant."""
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in results.rows:
        if row.get("workload") not in ("drain", "consume", "latency", "latency-paced", "partitions", "payloads") or (
                row.get("status") != "ok"):
            continue
        variant = row["variant"].split("-p")[0] if row["variant"].startswith("ours-p") else row["variant"]
        t = totals[(row["provider"], variant)]
        t[0] += int(_num(row.get("messages")) or 0)
        t[1] += int(_num(row.get("order_violations")) or 0)
        t[2] += int(_num(row.get("dups")) or 0)
    if not totals:
        return []
    lines = ["| provider | variant | messages handled | per-partition order violations | duplicates |",
             "|---|---|---:|---:|---:|"]
    for provider in PROVIDER_ORDER:
        for variant in ("ours", "ours-unordered", "raw", "faststream"):
            if (provider, variant) in totals:
                n, order, dups = totals[(provider, variant)]
                lines.append(f"| {provider} | {variant} | {n:,} | {order:,} | {dups:,} |")
    return lines


def _problems(results: Results) -> list[str]:
    grouped: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for row in results.rows:
        status = row.get("status", "ok")
        if status == "ok" or row.get("workload") == "provider":
            continue
        label = f"{row['cell']}" + (f" (rep {row['rep']})" if row.get("rep") not in ("-", "") else "")
        grouped[(row["provider"], row["variant"], re.sub(r"\d[\d,]* of \d[\d,]*.*", "…", status))].append(label)
    out = []
    for (provider, variant, status), cells in grouped.items():
        out.append(f"- {provider} / {variant}: {status} — {', '.join(dict.fromkeys(cells))}")
    return out


def _measured_line(doc: Path) -> str | None:
    """The "- Code measured:" line of the existing ``doc``, if any."""
    if not doc.exists():
        return None
    for line in doc.read_text().splitlines():
        if line.startswith("- Code measured:"):
            return line
    return None


def write_report(root: Path, csv_path: Path, doc: Path, command: str, seconds: float,
                 log: Callable[[str], None], *, rewrite: bool = False) -> None:
    """Write ``doc`` (and its plots) from the rows of ``csv_path``. ``rewrite``: no cell ran (the
    report is rewritten from the CSV), so the doc's line naming the code measured is kept."""
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    results = Results(rows)
    out_dir = doc.parent / "benchmarks"
    images = plots(results, out_dir, log)
    notes_path = Path(__file__).with_name("notes.md")
    notes = notes_path.read_text() if notes_path.exists() else ""
    profile_path = out_dir / "profile.md"
    profile = profile_path.read_text() if profile_path.exists() else ""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    drain = drain_section(results)
    run_starts = {row["run_at"] for row in rows if row.get("run_at")}
    when = (f"in the {len(run_starts)} runs named under *Merged runs* below (this report written {now})"
            if len(run_starts) > 1 else f"in one run ({now}, {seconds / 60:.1f} min)")
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by scripts/bench (bench/src/msgbroker_bench/_report.py); edit the generator or "
        "bench/src/msgbroker_bench/notes.md, not this file. -->",
        "",
        f"msgbroker measured side by side with the raw client libraries, FastStream and the brokers' own tools, "
        f"{when}. Every number is the **median of the repetitions** with "
        f"**min–max** in brackets; repetitions of the variants of a cell are interleaved (A B C A B C) and each "
        f"ratio pairs repetitions measured back to back.",
        "",
        "Regenerate (bootstrap, start the servers, run, write this file, the plots and the CSV):",
        "",
        "```sh",
        "scripts/bench",
        "```",
        "",
        f"which ran `{command}`. Raw rows: [benchmarks/results.csv](benchmarks/results.csv).",
        "",
        *(["## Drain: a backlog handled by 1, 2 and 4 workers", "", *drain, ""] if drain else []),
        "## Machine",
        "",
        *machine_info(root, _measured_line(doc) if rewrite else None),
        "",
        "## COMPASS targets",
        "",
        *targets(results),
        "",
    ]
    runs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    workloads: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        workloads[row["provider"]].add(row.get("workload", ""))
        if row.get("run_at"):
            runs[row["run_at"]][row["provider"]].add(row.get("workload", ""))

    def measured(provs: dict[str, set[str]]) -> str:
        # a provider whose other cells came from another run (--merge --cells) names its cells here
        return ", ".join(p if provs[p] == workloads[p] else f"{p} ({', '.join(sorted(provs[p]))} cells)"
                         for p in PROVIDER_ORDER if p in provs)

    if len(runs) > 1:
        lines += ["**Merged runs:** " + "; ".join(
            f"{measured(provs)} measured in the run of {at}"
            for at, provs in sorted(runs.items())) + " (every ratio still pairs repetitions of one run).", ""]
    lines += ["## Results by provider", ""]
    for provider in results.providers():
        status = results.provider_status(provider)
        lines += [f"### {provider}", ""]
        if status != "ok":
            lines += [f"Not measured: {status.removeprefix('n/a: ')}.", ""]
            continue
        lines += [*provider_table(results, provider), ""]
        curve = curve_table(results, provider)
        if curve:
            lines += ["Cost curves (end to end, ordered, 1 worker):", "", *curve, ""]
    publish = publish_section(results)
    if len(publish) > 2:
        lines += ["## Publish", "", *publish]
    latency = latency_section(results)
    if len(latency) > 2:
        lines += ["## Latency", "", *latency]
    if images:
        lines += ["## Plots", ""]
        lines += [f"![{name}](benchmarks/{name})" for name in images]
        lines += [""]
    lines += ["## What each variant does", "", *_configs(results), ""]
    lines += ["## Parameters", "", *_parameters(results), ""]
    checks = _checks(results)
    if checks:
        lines += ["## Order and duplicates (end-to-end cells, measured repetitions)", "",
                  "Every handler checks the sequence numbers: a message handled after a later-published one of "
                  "its partition (msgbroker's partitioner over the cell's partition count; with 10k keys and a few "
                  "thousand messages per repetition most keys occur once, so the partition is the unit that "
                  "order can be checked on) is an order violation. `ours` (ordered) and the partition curve "
                  "must show none; the unordered variants and the raw loops promise no order and show what "
                  "the check catches.", "", *checks, ""]
    problems = _problems(results)
    if problems:
        lines += ["## Not measured or failed", "", *problems, ""]
    if profile:
        lines += [profile.strip(), ""]
    if notes:
        lines += [notes.strip(), ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    log(f"wrote {doc} and {len(images)} plots")
