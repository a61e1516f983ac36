"""ResilienceSettings: the seed's keys and defaults, its appsettings.json, env, bad values."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from msgbroker import ConfigurationError
from msgbroker.resilience import ResilienceSettings

REPO = Path(__file__).resolve().parents[2]
SEED_APPSETTINGS = REPO.parent / "shared" / "seed" / "appsettings.json"

# The seed's Resilience section (../shared/seed/message-broker.md), used when the seed is absent.
SEED_RESILIENCE = {
    "Resilience": {
        "MaxRetryAttempts": 3,
        "RetryDelay": "00:00:01",
        "MaxRetryDelay": "00:00:30",
        "UseExponentialBackoff": True,
        "JitterFactor": 0.2,
        "EnableCircuitBreaker": True,
        "CircuitBreakerFailureRatio": 0.5,
        "CircuitBreakerDuration": "00:00:30",
        "CircuitBreakerSamplingDuration": "00:01:00",
        "CircuitBreakerMinimumThroughput": 10,
        "Timeout": "00:00:30",
    }
}

SEED_VALUES = {
    "max_retry_attempts": 3,
    "retry_delay": timedelta(seconds=1),
    "max_retry_delay": timedelta(seconds=30),
    "use_exponential_backoff": True,
    "jitter_factor": 0.2,
    "enable_circuit_breaker": True,
    "circuit_breaker_failure_ratio": 0.5,
    "circuit_breaker_duration": timedelta(seconds=30),
    "circuit_breaker_sampling_duration": timedelta(seconds=60),
    "circuit_breaker_minimum_throughput": 10,
    "timeout": timedelta(seconds=30),
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MSGBROKER_RESILIENCE__"):
            monkeypatch.delenv(name)


@pytest.fixture
def seed_appsettings(tmp_path: Path) -> Path:
    if SEED_APPSETTINGS.is_file():
        return SEED_APPSETTINGS
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps(SEED_RESILIENCE), encoding="utf-8")
    return path


def test_defaults_are_the_seeds() -> None:
    assert ResilienceSettings().model_dump() == SEED_VALUES


def test_the_seed_appsettings_json_loads_unchanged(seed_appsettings: Path) -> None:
    assert ResilienceSettings.from_file(seed_appsettings).model_dump() == SEED_VALUES


def test_every_key_of_the_resilience_section_is_read(tmp_path: Path) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(
        json.dumps(
            {
                "MessageBroker": {"PartitionCount": 8},
                "Resilience": {
                    "MaxRetryAttempts": 5,
                    "RetryDelay": "00:00:00.250",
                    "MaxRetryDelay": "00:02:00",
                    "UseExponentialBackoff": False,
                    "JitterFactor": 0.1,
                    "EnableCircuitBreaker": False,
                    "CircuitBreakerFailureRatio": 0.75,
                    "CircuitBreakerDuration": "00:00:45",
                    "CircuitBreakerSamplingDuration": "00:05:00",
                    "CircuitBreakerMinimumThroughput": 20,
                    "Timeout": "00:00:10",
                },
            }
        ),
        encoding="utf-8",
    )
    assert ResilienceSettings.from_file(path).model_dump() == {
        "max_retry_attempts": 5,
        "retry_delay": timedelta(milliseconds=250),
        "max_retry_delay": timedelta(minutes=2),
        "use_exponential_backoff": False,
        "jitter_factor": 0.1,
        "enable_circuit_breaker": False,
        "circuit_breaker_failure_ratio": 0.75,
        "circuit_breaker_duration": timedelta(seconds=45),
        "circuit_breaker_sampling_duration": timedelta(minutes=5),
        "circuit_breaker_minimum_throughput": 20,
        "timeout": timedelta(seconds=10),
    }


def test_toml_and_yaml_files_work_too(tmp_path: Path) -> None:
    toml = tmp_path / "settings.toml"
    toml.write_text('[resilience]\nmax_retry_attempts = 7\ntimeout = "5s"\n', encoding="utf-8")
    yaml = tmp_path / "settings.yaml"
    yaml.write_text("Resilience:\n  MaxRetryAttempts: 6\n  RetryDelay: '00:00:02'\n", encoding="utf-8")
    from_toml = ResilienceSettings.from_file(toml)
    assert (from_toml.max_retry_attempts, from_toml.timeout) == (7, timedelta(seconds=5))
    from_yaml = ResilienceSettings.from_file(yaml)
    assert (from_yaml.max_retry_attempts, from_yaml.retry_delay) == (6, timedelta(seconds=2))


def test_environment_beats_the_file_and_arguments_beat_both(
    seed_appsettings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSGBROKER_RESILIENCE__MAX_RETRY_ATTEMPTS", "9")
    monkeypatch.setenv("MSGBROKER_RESILIENCE__TIMEOUT", "00:00:05")
    settings = ResilienceSettings.from_file(seed_appsettings, timeout=2)
    assert settings.max_retry_attempts == 9
    assert settings.timeout == timedelta(seconds=2)
    assert settings.jitter_factor == 0.2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("jitter_factor", 1.5),
        ("jitter_factor", -0.1),
        ("circuit_breaker_failure_ratio", 0),
        ("circuit_breaker_failure_ratio", 2),
        ("circuit_breaker_minimum_throughput", 0),
        ("max_retry_attempts", -1),
        ("retry_delay", "-00:00:01"),
        ("timeout", "00:00:00"),
        ("circuit_breaker_duration", "not a duration"),
        ("circuit_breaker_sampling_duration", 0),
        ("use_exponential_backoff", "perhaps"),
    ],
)
def test_bad_values_raise_configuration_error_naming_key_and_value(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ResilienceSettings(**{key: value})
    assert key in str(caught.value)
    assert repr(value) in str(caught.value) or str(value) in str(caught.value)


def test_max_retry_delay_shorter_than_retry_delay_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"max_retry_delay=.*must not be shorter than retry_delay"):
        ResilienceSettings(retry_delay=10, max_retry_delay=5)


def test_unknown_keys_in_the_section_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps({"Resilience": {"MaxRetryAttemps": 4}}), encoding="utf-8")
    with pytest.raises(ConfigurationError, match="max_retry_attemps"):
        ResilienceSettings.from_file(path)
