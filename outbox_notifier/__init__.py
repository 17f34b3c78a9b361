"""Relays a Postgres transactional outbox into Feishu notifications."""

__version__ = "0.2.0"
