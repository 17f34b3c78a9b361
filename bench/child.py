"""The daemon under test with a chosen provider or HTTP transport, as its own process.

``python -m bench.child --dsn DSN [--provider instant] [--transport aiohttp|minimal|default]``

Used for the figures the plain CLI cannot give: the database side alone (an instant in-process
provider) and the daemon's providers over another httpx transport. Settings are the CLI's
defaults plus the URL policy that lets the daemon post to the local server.
"""

from __future__ import annotations

import argparse
import sys

from bench.clients import TRANSPORTS, InstantProvider, make_transport
from bench.fixtures import egress_overrides
from outbox_notifier import eventloop, logs
from outbox_notifier.daemon import Daemon
from outbox_notifier.providers import default_providers
from outbox_notifier.providers.model import Provider
from outbox_notifier.settings import load_settings


async def _run(args: argparse.Namespace) -> None:
    settings = load_settings(
        config_path=None, env={}, overrides={"dsn": args.dsn, **egress_overrides()}
    )
    logs.configure_logging(settings.log_format, settings.log_level)
    providers: dict[str, Provider]
    if args.provider == "instant":
        providers = {"feishu_flow": InstantProvider()}
        await Daemon(settings, providers=providers).run()
        return
    async with make_transport(args.transport, settings.delivery_concurrency) as transport:
        providers = default_providers(settings, transport)
        await Daemon(settings, providers=providers).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--provider", choices=("flow", "instant"), default="flow")
    parser.add_argument("--transport", choices=TRANSPORTS, default="default")
    # The CLI's loop (uvloop where installed), so the variants differ only in what they name.
    eventloop.run(_run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
