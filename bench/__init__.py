"""Reproducible benchmarks of outbox-notifier; run ``python -m bench`` (see bench/README.md)."""
