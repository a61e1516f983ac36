"""``msgbroker asyncapi module:service``: the service as an AsyncAPI 3.0 document (JSON or YAML)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml  # type: ignore[import-untyped]

from ._errors import CliError
from ._options import ConfigOption, UrlOption
from ._render import err
from ._service_target import load_service
from ._target import Target


def asyncapi_command(
    service_spec: Annotated[
        str, typer.Argument(metavar="MODULE:SERVICE", help="The msgbroker.Service to describe, as module:attribute.")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (.yaml/.yml: YAML) instead of stdout.")
    ] = None,
    yaml_output: Annotated[bool, typer.Option("--yaml", help="YAML instead of JSON.")] = False,
    url: UrlOption = None,
    config: ConfigOption = None,
) -> int:
    """Write the service's AsyncAPI 3.0 document: its topics (channels), groups (receive operations),
    publishers (send operations) and message schemas (from the pydantic models).

    With --url or --config (or the service's own settings) the broker is the document's server,
    without credentials.
    """
    service = load_service(service_spec)
    broker = None
    if url is not None or config is not None:
        broker = Target(url, config).broker()
    elif service.target is not None:
        try:
            broker = service.connect()
        except Exception as exc:  # a provider not installed here: the document without a server
            err().print(f"msgbroker asyncapi: no server in the document ({exc})", markup=False)
    document = service.asyncapi(broker)
    as_yaml = yaml_output or (output is not None and output.suffix in (".yaml", ".yml"))
    text = (yaml.safe_dump(document, sort_keys=False, allow_unicode=True) if as_yaml
            else json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc}") from exc
    err().print(f"wrote {output} ({len(document['channels'])} channel(s), "
                f"{len(document['operations'])} operation(s))", markup=False)
    return 0


def register(app: typer.Typer) -> None:
    """Add ``asyncapi`` to ``app``."""
    app.command("asyncapi")(asyncapi_command)
