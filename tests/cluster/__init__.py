"""Smoke tests of the 3-node clusters started by `scripts/brokers cluster up` (see docs/brokers.md)."""
