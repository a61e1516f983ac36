"""The TLS helpers providers share: a CA file that cannot be used and an untrusted server
certificate are configuration errors that name the setting (no server needed here; the real
TLS listeners are exercised in tests/security/test_tls.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from msgbroker import ConfigurationError, tls_client_context, tls_verification_error


def test_no_ca_file_trusts_the_systems_cas_and_checks_host_names() -> None:
    context = tls_client_context("redis")
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_a_missing_ca_file_is_named_with_its_setting(tmp_path: Path) -> None:
    missing = str(tmp_path / "ca.pem")
    with pytest.raises(ConfigurationError) as info:
        tls_client_context("nats", missing)
    assert str(info.value) == f"nats.ssl_cafile={missing!r}: No such file or directory"


def test_a_ca_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(ConfigurationError) as info:
        tls_client_context("rabbitmq", str(not_pem))
    assert str(info.value).startswith(f"rabbitmq.ssl_cafile={str(not_pem)!r}: not a PEM file")


def test_a_missing_client_certificate_is_named_with_its_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        tls_client_context("kafka", None, str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    assert "kafka.ssl_certfile=" in str(info.value)


def _untrusted() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    return error


def test_an_untrusted_certificate_deep_in_the_cause_chain_says_what_to_set() -> None:
    try:
        try:
            raise _untrusted()
        except ssl.SSLError as inner:
            raise ConnectionError("Error 1 connecting to 127.0.0.1:6390") from inner
    except ConnectionError as outer:
        error = tls_verification_error(outer, "redis", "rediss://user:pw@127.0.0.1:6390")
    assert error is not None
    assert str(error) == (
        "redis: the server at rediss://user:***@127.0.0.1:6390 presented a TLS certificate this client does not "
        "trust (unable to get local issuer certificate); set redis.ssl_cafile to the CA certificate (PEM) that "
        "signed it"
    )


def test_other_errors_are_not_certificate_errors() -> None:
    assert tls_verification_error(ConnectionRefusedError(111, "refused"), "redis", "h:1") is None
    assert tls_verification_error(ssl.SSLError(1, "wrong version number"), "redis", "h:1") is None
