"""Relays a PostgreSQL transactional outbox into notifications: chat bots on Feishu, DingTalk,
WeCom and Slack, the Feishu Flow webhook, and signed webhooks."""

__version__ = "0.2.0"
