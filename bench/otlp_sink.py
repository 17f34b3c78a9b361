"""A local OTLP/HTTP trace endpoint for the tracing figure: it takes every export and counts it.

The daemon under test exports its spans as it would to a collector: the OpenTelemetry SDK's
``BatchSpanProcessor`` and its OTLP/HTTP (protobuf) exporter, over a real socket, so the figure
includes encoding and posting every span. The sink answers each ``POST /v1/traces`` at once
with an empty ``ExportTraceServiceResponse`` (an empty protobuf message is zero bytes) and does
not decode: the receiver's cost is the collector's, not the daemon's. It runs in a thread of
the bench process, beside the database and the Feishu look-alike, on the same machine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Sink:
    url: str  # for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter adds /v1/traces)
    requests: int = 0
    bytes: int = 0


@contextmanager
def otlp_sink() -> Iterator[Sink]:
    sink = Sink(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

        def do_POST(self) -> None:  # the http.server naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                sink.requests += 1
                sink.bytes += len(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
