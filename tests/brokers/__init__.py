"""Smoke tests of the real brokers started by scripts/brokers (see docs/brokers.md)."""
