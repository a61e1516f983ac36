"""Finding the user's :class:`msgbroker.Service` from ``module:attribute`` (``run``, ``asyncapi``),
and the broker it runs on: ``--url``/``--config`` when given, else the service's own settings."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .._broker import Broker, connect
from .._errors import MsgBrokerError
from .._service import Service
from ._errors import CliError
from ._target import Target


def load_service(spec: str) -> Service:
    """The Service named by ``module:attribute`` (``module`` alone: the one Service it defines).
    The current directory is importable, as with ``python -m``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise CliError(f"{spec!r}: give the service as module:attribute (like orders.service:service)", 2)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CliError(f"cannot import {module_name!r}: no such module (run from the folder that has it, "
                           "or install it)") from exc
        raise CliError(f"importing {module_name!r} failed: {exc}") from exc
    except (TypeError, MsgBrokerError) as exc:  # a handler of neither shape, a bad name
        raise CliError(f"importing {module_name!r} failed: {exc}") from exc
    if attribute:
        value: Any = module
        for part in attribute.split("."):
            try:
                value = getattr(value, part)
            except AttributeError:
                raise CliError(f"{module_name!r} has no attribute {attribute!r}") from None
        if not isinstance(value, Service):
            raise CliError(f"{spec} is a {type(value).__name__}, not a msgbroker.Service")
        return value
    found = [(name, v) for name, v in vars(module).items() if isinstance(v, Service)]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise CliError(f"{module_name!r} defines {len(found)} msgbroker.Service objects ({names}): "
                       f"name one as {module_name}:ATTRIBUTE", 2)
    return found[0][1]


def service_broker(service: Service, target: Target) -> Broker:
    """An unopened broker: the command's ``--url``/``--config`` (or their environment variables),
    else the service's own settings (``--partition-count`` applies to either)."""
    if target.url is not None or target.config is not None:
        return target.broker()
    overrides: dict[str, Any] = dict(service.overrides)
    if target.partition_count is not None:
        overrides["partition_count"] = target.partition_count
    if service.target is None and not overrides.get("provider") and "MSGBROKER_PROVIDER" not in os.environ:
        raise CliError(f"the service {service.title!r} names no broker: pass --url (or set MSGBROKER_URL), "
                       "--config FILE (or MSGBROKER_CONFIG), or give Service() a URL or settings")
    return connect(service.target, **overrides)
