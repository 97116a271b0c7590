"""A stand-in for the OpenTelemetry Collector where its image cannot be pulled
(`make compose-check`): a real OTLP/HTTP receiver on the collector's port 4318.

    python3 otlp_receiver.py [--port 4318]

POST /v1/traces takes OTLP/HTTP protobuf (gzip or not), decoded with the opentelemetry-proto
package (a dependency of folio's OTLP exporter, so it is in folio's image), and answers as a
collector does. GET /spans lists what arrived as JSON, one object per span, for the check to
read. It forwards nothing: it stands in for the receiving end only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SPANS: list[dict] = []
LOCK = threading.Lock()


def _value(v) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[dict]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)  # raises on a malformed payload: answered with 400
    spans = []
    for rs in req.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append({
                    "service": resource.get("service.name"),
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "attributes": {a.key: _value(a.value) for a in s.attributes},
                    "events": [e.name for e in s.events],
                })
    return spans


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            spans = decode(body)
        except Exception as e:  # noqa: BLE001 (any decode failure is the client's)
            self.send_error(400, str(e))
            return
        with LOCK:
            SPANS.extend(spans)
        print(f"received {len(spans)} spans", flush=True)
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:  # noqa: N802
        if self.path != "/spans":
            self.send_error(404)
            return
        with LOCK:
            out = json.dumps(SPANS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a) -> None:  # one line per export is printed above
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=4318)
    args = p.parse_args()
    # As a container's PID 1 it gets no default SIGTERM handling: exit on `docker stop`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ThreadingHTTPServer(("0.0.0.0", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
