"""The CLI's one failure type, and the check for the optional dependency two commands need."""

from __future__ import annotations


class CliError(Exception):
    """A failure to report as one line on stderr, with an exit code (1 unless a usage error: 2)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def require_prometheus() -> None:
    """Fail with the install hint when ``prometheus_client`` is missing (``metrics``, ``tail --metrics``)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise CliError("metrics need prometheus-client: pip install 'msgbroker[prometheus]'") from None
