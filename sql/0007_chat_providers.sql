-- kind: additive
-- 0007: channels may select the DingTalk, WeCom and Slack providers.
--
-- Widening a CHECK is additive: every value an older daemon writes or reads stays valid, and an
-- older daemon that meets a new provider name treats it as it treats any unknown provider.
-- Re-created by name so the constraint keeps the name PostgreSQL gave it in 0003.
ALTER TABLE outbox_notifier.notification_channels
    DROP CONSTRAINT notification_channels_provider_check,
    ADD CONSTRAINT notification_channels_provider_check CHECK (provider IN (
        'feishu_flow', 'feishu_bot', 'webhook', 'dingtalk_bot', 'wecom_bot', 'slack_webhook'
    ));
