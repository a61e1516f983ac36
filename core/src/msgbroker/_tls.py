"""TLS for providers, in one place: the client context made from a provider section's
``ssl_cafile`` (and ``ssl_certfile`` / ``ssl_keyfile``) settings, and the one message for a
server certificate this client does not trust, whatever client library found it."""

from __future__ import annotations

import ssl

from ._errors import ConfigurationError, redact

__all__ = ["tls_client_context", "tls_verification_error"]


def tls_client_context(
    section: str, cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name against the CA
    bundle ``cafile`` (PEM; None: the system's trusted CAs) and presents ``certfile`` /
    ``keyfile`` when given.

    A file that cannot be read or holds no PEM certificate raises :class:`ConfigurationError`
    naming the setting, e.g. ``redis.ssl_cafile='/etc/ca.pem': No such file or directory``.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigurationError(_unusable(section, "ssl_cafile", cafile, exc)) from exc
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except OSError as exc:
            raise ConfigurationError(_unusable(section, "ssl_certfile", certfile, exc)) from exc
    return context


def _unusable(section: str, key: str, path: str | None, exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        why = f"not a PEM file this key needs ({exc.reason or exc})"
    else:
        why = exc.strerror or str(exc)
    return redact(f"{section}.{key}={path!r}: {why}")


def tls_verification_error(exc: BaseException, section: str, address: str) -> ConfigurationError | None:
    """The :class:`ConfigurationError` to raise when ``exc`` (or an error it was raised from)
    is the failed verification of the server's certificate, else None.

    Retrying cannot help there, so it is a configuration error that says what to set.
    ``address`` is shown as given after :func:`redact`.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            reason = current.verify_message or current.reason or str(current)
            return ConfigurationError(redact(
                f"{section}: the server at {address} presented a TLS certificate this client does not "
                f"trust ({reason}); set {section}.ssl_cafile to the CA certificate (PEM) that signed it"
            ))
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
