"""The throw-away test CA and one server certificate (127.0.0.1, localhost) for the TLS
listeners, made with openssl in .brokers/tls/. Never use them for anything else."""

from __future__ import annotations

import hashlib
import secrets
import shutil
import ssl
import subprocess
import time
from pathlib import Path

from .common import HOST, RUN_DIR, Failure, rel, say

TLS_DIR = RUN_DIR / "tls"
TLS_CA = TLS_DIR / "ca.pem"
TLS_CERT = TLS_DIR / "server.pem"
TLS_KEY = TLS_DIR / "server.key"
TLS_VALID_UNTIL = TLS_DIR / "valid_until"
TLS_CA_ENV = "MSGBROKER_TEST_TLS_CA_FILE"
TLS_DAYS = 3650
TLS_RENEW_BEFORE = 30 * 86400  # seconds of validity left below which the files are made again


_OPENSSL_CONF = """\
# written by scripts/brokers: a throw-away test CA and a server certificate for loopback only
[req]
distinguished_name = dn
prompt = no
[dn]
CN = msgbroker throw-away test CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def tls_material_ready() -> bool:
    try:
        valid_until = float(TLS_VALID_UNTIL.read_text())
    except (FileNotFoundError, ValueError):
        return False
    files = all(f.is_file() for f in (TLS_CA, TLS_CERT, TLS_KEY))
    return files and valid_until - time.time() > TLS_RENEW_BEFORE


def ensure_tls_material() -> None:
    """Make the test CA and the server certificate with openssl, unless they are there and
    valid for another month. Written to a temporary folder first, so a half-made set is never used."""
    if tls_material_ready():
        return
    openssl = shutil.which("openssl")
    if not openssl:
        raise Failure("tls: openssl is missing (apt-get install openssl)")
    t0 = time.monotonic()
    tmp = TLS_DIR.with_name("tls.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    conf = tmp / "openssl.cnf"
    conf.write_text(_OPENSSL_CONF)
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    serial = str(secrets.randbits(63) | 1)
    steps = [
        [openssl, "req", "-x509", "-config", str(conf), "-extensions", "ca", *ec_key,
         "-keyout", "ca.key", "-out", "ca.pem", "-days", str(TLS_DAYS)],
        [openssl, "req", "-new", "-config", str(conf), *ec_key, "-subj", "/CN=localhost",
         "-keyout", "server.key", "-out", "server.csr"],
        [openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", serial,
         "-days", str(TLS_DAYS), "-extfile", str(conf), "-extensions", "server", "-out", "server.pem"],
    ]
    for argv in steps:
        res = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise Failure(f"tls: `openssl {argv[1]}` failed (exit {res.returncode}): {res.stderr.strip()[-400:]}")
    (tmp / "server.csr").unlink()
    (tmp / "valid_until").write_text(f"{time.time() + TLS_DAYS * 86400:.0f}\n")
    shutil.rmtree(TLS_DIR, ignore_errors=True)
    tmp.rename(TLS_DIR)
    say(f"tls: made a throw-away test CA and a server certificate for {HOST} and localhost in {rel(TLS_DIR)} "
        f"({time.monotonic() - t0:.1f}s)")


def ca_fingerprint() -> str:
    """Names the test CA in use, so that a server started with another one is noticed."""
    try:
        return hashlib.sha256(TLS_CA.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return ""


def tls_client_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(TLS_CA))


def pem_property(path: Path) -> str:
    """A PEM file as one Java properties value (its line breaks written as \\n)."""
    return path.read_text().strip().replace("\n", "\\n")
