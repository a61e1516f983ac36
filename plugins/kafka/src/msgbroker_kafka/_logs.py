"""aiokafka logs every request it sends at DEBUG, and a SASL authentication request carries the
PLAIN mechanism's password in the clear (``sasl_auth_bytes=b'user\\x00user\\x00PASSWORD'``): a
filter on aiokafka's connection logger hides the bytes of every SASL request and answer, so that
DEBUG logging of aiokafka never writes a password (docs/security.md)."""

from __future__ import annotations

import logging

__all__ = ["hide_sasl_bytes"]

_CONN_LOGGER = "aiokafka.conn"
_HIDDEN = "<SASL bytes hidden by msgbroker-kafka>"


class _HideSaslBytes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any("Sasl" in type(arg).__name__ for arg in args):
            record.args = tuple(f"{type(arg).__name__}({_HIDDEN})" if "Sasl" in type(arg).__name__ else arg
                                for arg in args)
        return True


_FILTER = _HideSaslBytes()


def hide_sasl_bytes() -> None:
    """Install the filter (once; idempotent)."""
    logger = logging.getLogger(_CONN_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
