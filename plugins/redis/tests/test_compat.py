"""The redis-py version guard (``msgbroker_redis._compat``): the provider reaches into redis-py
internals only there, and refuses a redis-py outside the tested series, naming both versions."""

from __future__ import annotations

import subprocess
import sys

import pytest
from msgbroker.spi import ConfigurationError
from msgbroker_redis import UntestedClientVersion, _compat


def test_the_installed_redis_py_is_of_the_tested_series() -> None:
    assert _compat.check_client_version() == _compat.installed_version()


@pytest.mark.parametrize("version", ["8.1.0", "8.1.9", "8.1.1rc1"])
def test_a_release_of_the_tested_series_is_accepted(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    assert _compat.check_client_version() == version


@pytest.mark.parametrize("version", ["8.2.0", "8.0.5", "5.0.1", "garbage"])
def test_an_untested_redis_py_is_refused_naming_it_and_the_tested_range(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    with pytest.raises(UntestedClientVersion) as refused:
        _compat.check_client_version()
    text = str(refused.value)
    assert f"redis {version} is installed" in text
    assert "tested with redis 8.1.x (>=8.1,<8.2)" in text
    assert isinstance(refused.value, ConfigurationError) and isinstance(refused.value, ImportError)


def _run_with_redis_py(version: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter in which the installed redis-py reports ``version``."""
    prelude = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        f"m.version = lambda name: {version!r} if name == 'redis' else real(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_provider_with_an_untested_redis_py_fails_naming_it() -> None:
    out = _run_with_redis_py(
        "8.2.0",
        "try:\n    import msgbroker_redis\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)\n"
        "else:\n    print('imported')\n",
    )
    assert out.startswith("UntestedClientVersion "), out
    assert "redis 8.2.0 is installed" in out


def test_connecting_with_an_untested_redis_py_says_why_the_provider_is_missing() -> None:
    out = _run_with_redis_py(
        "8.2.0",
        "import msgbroker\n"
        "try:\n    msgbroker.connect('redis://127.0.0.1:1')\nexcept msgbroker.ConfigurationError as exc:\n"
        "    print(type(exc).__name__, exc)\n",
    )
    assert out.startswith("ProviderNotFoundError "), out
    assert "redis 8.2.0 is installed" in out
