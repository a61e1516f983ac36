"""``msgbroker dlq list | show | replay | purge``: a group's dead letters."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from .._broker import Broker
from .._message import DeadLetter
from ._errors import CliError
from ._options import ConfigOption, GroupOption, JsonOption, PartitionsOption, UrlOption
from ._render import emit_json, out, payload, progress, short
from ._target import Target, run_with_broker

REPLAY_CHUNK = 100
"""Dead letters per replay round trip (the progress bar moves per chunk)."""

IdsOption = Annotated[list[str] | None, typer.Option("--id", help="A dead letter's message id (repeatable).")]


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id,
        "topic": letter.topic,
        "group": letter.group,
        "partition": letter.partition,
        "partition_key": letter.partition_key,
        "attempts": letter.attempts,
        "error": letter.error,
        "dead_lettered_at": letter.dead_lettered_at.isoformat(),
        "headers": dict(letter.headers),
        "payload": payload(letter.payload),
    }


def dlq_list(
    topic: Annotated[str, typer.Argument(help="Topic whose dead letters to list.")],
    group: GroupOption,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """The dead letters of GROUP on TOPIC, oldest first."""
    letters = run_with_broker(Target(url, config, partition_count), lambda b: b.dead_letters(topic, group))
    if json_output:
        emit_json([_letter_json(letter) for letter in letters])
        return 0
    if not letters:
        out().print(f"no dead letters in {topic!r} for {group!r}", markup=False)
        return 0
    table = Table(title=f"dead letters: {topic} / {group}")
    table.add_column("message id", no_wrap=True, min_width=36)
    for name in ("partition", "attempts", "dead-lettered at", "error"):
        table.add_column(name, justify="right" if name in ("partition", "attempts") else "left")
    for letter in letters:
        table.add_row(
            letter.message_id,
            str(letter.partition),
            str(letter.attempts),
            letter.dead_lettered_at.strftime("%Y-%m-%d %H:%M:%S"),
            Text(short(letter.error)),
        )
    out().print(table)
    return 0


def dlq_show(
    message_id: Annotated[str, typer.Argument(help="Message id of the dead letter.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic.")],
    group: GroupOption,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """One dead letter in full: why, after how many attempts, headers and payload."""
    letters = run_with_broker(Target(url, config, partition_count), lambda b: b.dead_letters(topic, group))
    letter = next((item for item in letters if item.message_id == message_id), None)
    if letter is None:
        raise CliError(f"no dead letter {message_id!r} in {topic!r} for {group!r}")
    data = _letter_json(letter)
    if json_output:
        emit_json(data)
        return 0
    console = out()
    table = Table.grid(padding=(0, 2))
    for name in ("message_id", "topic", "group", "partition", "partition_key", "attempts", "dead_lettered_at", "error"):
        table.add_row(Text(name, style="bold"), Text(str(data[name])))
    console.print(table)
    console.print(Text("headers", style="bold"))
    console.print_json(data=data["headers"])
    console.print(Text("payload", style="bold"))
    if isinstance(data["payload"], str):
        console.print(Text(data["payload"]))
    else:
        console.print_json(data=data["payload"])
    return 0


def dlq_replay(
    topic: Annotated[str, typer.Argument(help="Topic whose dead letters to replay.")],
    group: GroupOption,
    ids: IdsOption = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter of the group.")] = False,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Publish dead letters back to TOPIC (for GROUP only) and remove them from the dead letters."""
    if bool(ids) == replay_all:
        raise CliError("say which dead letters to replay: --id ID (repeatable) or --all", exit_code=2)

    async def work(broker: Broker) -> tuple[int, list[str]]:
        letters = await broker.dead_letters(topic, group)
        present = [letter.message_id for letter in letters]
        if ids:
            known = set(present)
            wanted = list(dict.fromkeys(i for i in ids if i in known))
            missing = [i for i in dict.fromkeys(ids) if i not in known]
        else:
            wanted, missing = present, []
        replayed = 0
        with progress(not json_output and len(wanted) > REPLAY_CHUNK) as bar:
            task = bar.add_task(f"replaying to {topic}", total=len(wanted))
            for start in range(0, len(wanted), REPLAY_CHUNK):
                chunk = wanted[start : start + REPLAY_CHUNK]
                replayed += await broker.replay_dead_letters(topic, group, chunk)
                bar.advance(task, len(chunk))
        return replayed, missing

    replayed, missing = run_with_broker(Target(url, config, partition_count), work)
    if json_output:
        emit_json({"topic": topic, "group": group, "replayed": replayed, "missing": missing})
    else:
        out().print(f"replayed {replayed} dead letter(s) to {topic!r} for {group!r}", markup=False)
    if missing:
        raise CliError(
            f"{len(missing)} id(s) are not dead letters of {topic!r} for {group!r}: "
            + ", ".join(missing[:5])
            + (" …" if len(missing) > 5 else "")
        )
    return 0


def dlq_purge(
    topic: Annotated[str, typer.Argument(help="Topic whose dead letters to delete.")],
    group: GroupOption,
    ids: IdsOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (for scripts).")] = False,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Delete dead letters of GROUP on TOPIC for good (all, or those given with --id). Asks first."""

    async def work(broker: Broker) -> int:
        letters = await broker.dead_letters(topic, group)
        doomed = [letter.message_id for letter in letters if not ids or letter.message_id in set(ids)]
        if not doomed:
            return 0
        if not yes:
            question = f"Delete {len(doomed)} dead letter(s) of {topic!r} for {group!r}? This cannot be undone"
            # typer's prompt reads stdin synchronously; nothing else runs on this loop meanwhile
            if not typer.confirm(question, default=False, err=True):
                raise CliError("nothing deleted")
        return await broker.transport.remove_dead_letters(topic, group, doomed)

    try:
        removed = run_with_broker(Target(url, config, partition_count), work)
    except typer.Abort:
        raise CliError("nothing deleted (no answer; use --yes in scripts)") from None
    if json_output:
        emit_json({"topic": topic, "group": group, "purged": removed})
    else:
        out().print(f"purged {removed} dead letter(s) of {topic!r} for {group!r}", markup=False)
    return 0


def register(app: typer.Typer) -> None:
    """Add the ``dlq`` group to ``app``."""
    dlq_app = typer.Typer(help="List, show, replay and purge dead letters.", no_args_is_help=True)
    dlq_app.command("list")(dlq_list)
    dlq_app.command("show")(dlq_show)
    dlq_app.command("replay")(dlq_replay)
    dlq_app.command("purge")(dlq_purge)
    app.add_typer(dlq_app, name="dlq")
