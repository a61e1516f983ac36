"""The two handler shapes a subscription takes, checked when subscribing (never at the first
message): a context handler ``async def h(ctx: MessageContext[Order])`` that may settle, and a
plain handler ``async def h(message: Order)`` that acks by returning and naks by raising."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._message import GenericMessage, Handler, Message, MessageContext

__all__ = ["HandlerShape", "describe_handler", "shape_of"]

_SHAPES = (
    "a handler takes one argument: a context (async def h(ctx: MessageContext[Order])) or a "
    "message (async def h(message: Order), where Order subclasses msgbroker.Message)"
)


@dataclass(frozen=True, slots=True)
class HandlerShape:
    """What :func:`shape_of` found: the callable the engine runs and the type it decodes."""

    handler: Handler
    """The engine's handler: the user's own for a context handler, a wrapper for a plain one."""
    message_type: type[Message]
    takes_context: bool
    """False for a plain handler (it gets ``ctx.message``)."""


def describe_handler(handler: object) -> str:
    """``module.qualname`` of a handler, for error messages."""
    target = handler.func if isinstance(handler, functools.partial) else handler
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}" if module else str(name)


def _is_async(handler: object) -> bool:
    target = handler.func if isinstance(handler, functools.partial) else handler
    if inspect.iscoroutinefunction(target):
        return True
    if not inspect.isfunction(target) and not inspect.ismethod(target) and callable(target):
        return inspect.iscoroutinefunction(type(target).__call__)
    return False


def _explicit(message_type: type[Message] | None) -> type[Message] | None:
    if message_type is None:
        return None
    if not (isinstance(message_type, type) and issubclass(message_type, Message)):
        raise TypeError(f"message_type must be a msgbroker.Message subclass, got {message_type!r}")
    return GenericMessage if message_type is Message else message_type


def shape_of(handler: Callable[..., Any], message_type: type[Message] | None = None) -> HandlerShape:
    """Check ``handler``'s signature and say how to run it; a ``TypeError`` naming the handler
    when it is neither shape.

    A first parameter without an annotation is a context (as before plain handlers existed);
    ``message_type=`` overrides what the annotation says about the payload's type.
    """
    explicit = _explicit(message_type)
    name = describe_handler(handler)
    if not callable(handler):
        raise TypeError(f"handler must be an async callable, got {handler!r}")
    target = handler.func if isinstance(handler, functools.partial) else handler
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        raise TypeError(f"handler {name} is a generator; {_SHAPES}")
    # A lambda cannot be ``async``: one that returns an awaitable (lambda ctx: work(ctx)) is taken.
    if not _is_async(handler) and not (inspect.isfunction(target) and target.__name__ == "<lambda>"):
        raise TypeError(f"handler {name} is not async: declare it with 'async def'; {_SHAPES}")
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the signature of handler {name}: {exc}") from exc
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if not positional:
        raise TypeError(f"handler {name} takes no argument; {_SHAPES}")
    first = positional[0]
    required = [p for p in params[1:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise TypeError(f"handler {name} requires more than one argument ({', '.join(p.name for p in required)} "
                        f"have no default); {_SHAPES}")
    if first.kind is first.VAR_POSITIONAL or first.annotation is first.empty:
        return HandlerShape(handler, explicit or GenericMessage, True)
    annotation = _resolve(handler, target, first.name, first.annotation, explicit, name)
    if annotation is None:  # unresolvable, but message_type= says what it carries
        return HandlerShape(_plain(handler, name), explicit or GenericMessage, False)
    if annotation is MessageContext or typing.get_origin(annotation) is MessageContext:
        args = typing.get_args(annotation)
        carried = args[0] if args else None
        if explicit is None and isinstance(carried, type) and issubclass(carried, Message) and carried is not Message:
            explicit = carried
        return HandlerShape(handler, explicit or GenericMessage, True)
    if annotation is Any or annotation is object:
        return HandlerShape(handler, explicit or GenericMessage, True)
    if isinstance(annotation, type) and issubclass(annotation, Message):
        if explicit is not None and explicit is not GenericMessage and not issubclass(explicit, annotation):
            raise TypeError(f"handler {name} takes {annotation.__name__}, but message_type={explicit.__name__} "
                            "is not a subclass of it")
        decoded = explicit or (GenericMessage if annotation is Message else annotation)
        return HandlerShape(_plain(handler, name), decoded, False)
    shown = getattr(annotation, "__name__", None) or repr(annotation)
    hint = ""
    if isinstance(annotation, type) and hasattr(annotation, "model_validate_json"):
        hint = f" ({shown} is a pydantic model: subclass msgbroker.Message instead of BaseModel)"
    raise TypeError(f"handler {name} takes '{first.name}: {shown}'{hint}; {_SHAPES}")


def _resolve(
    handler: Callable[..., Any], target: Any, param: str, raw: Any, explicit: type[Message] | None, name: str
) -> Any:
    """The first parameter's annotation, evaluated (``from __future__ import annotations`` leaves
    strings). None when it cannot be evaluated but ``message_type=`` was given."""
    if not isinstance(raw, str):
        return raw
    hints_of = target
    if not inspect.isfunction(hints_of) and not inspect.ismethod(hints_of):
        hints_of = type(hints_of).__call__
    try:
        return typing.get_type_hints(hints_of).get(param, raw)
    except Exception:
        pass
    if raw.split("[", 1)[0].strip().rsplit(".", 1)[-1] == "MessageContext":
        return MessageContext  # a context of a type defined in a function: decoded as message_type= says
    if explicit is not None:
        return None
    raise TypeError(f"handler {name}: the annotation '{param}: {raw}' cannot be evaluated (a class defined "
                    "inside a function?); define the type at module level or pass message_type=")


def _plain(handler: Callable[..., Any], name: str) -> Handler:
    async def plain_handler(ctx: MessageContext[Any]) -> object:
        # returning acks, raising naks (the engine settles it); what it returns answers a request
        return await handler(ctx.message)

    plain_handler.__qualname__ = plain_handler.__name__ = f"plain({name})"
    plain_handler.__wrapped__ = handler  # type: ignore[attr-defined]
    return plain_handler
