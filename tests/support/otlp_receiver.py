"""A real OTLP receiver for tests: HTTP/protobuf and gRPC on free loopback ports.

It speaks the collector's wire contract (what Jaeger v2 and the OpenTelemetry
Collector accept on 4318 and 4317): ``POST /v1/traces`` and ``/v1/metrics``
with ``application/x-protobuf`` bodies (gzip or deflate when the exporter
compresses), and the ``TraceService``/``MetricsService`` Export RPCs. Every
request is decoded with opentelemetry-proto into plain Python values the tests
compare: :class:`Span` and :class:`Point`.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = any_value(kv.value)
    return out


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any], int]]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    scope: str


@dataclass
class Point:
    """One data point of a metric: attributes and value (sum/gauge) or count and sum."""

    metric: str
    attributes: dict[str, Any]
    value: float
    count: int = 0
    resource: dict[str, Any] = field(default_factory=dict)


class OTLPReceiver:
    """Collects what exporters send; ``stop()`` frees both ports."""

    def __init__(self) -> None:
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.http_posts = 0
        self.grpc_calls = 0
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._http.daemon_threads = True
        self.http_port: int = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), self._grpc)
        self.grpc_port: int = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()

    @property
    def http_endpoint(self) -> str:
        """Base URL for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/<signal>)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(grace=None)

    # --- what was received -----------------------------------------------------------------

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self.trace_requests.append(request)

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._lock:
            self.metric_requests.append(request)

    def spans(self) -> list[Span]:
        with self._lock:
            requests = list(self.trace_requests)
        out = []
        for request in requests:
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            Span(
                                name=s.name,
                                kind=s.kind,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_span_id=s.parent_span_id.hex(),
                                start_ns=s.start_time_unix_nano,
                                end_ns=s.end_time_unix_nano,
                                attributes=attributes(s.attributes),
                                events=[
                                    (e.name, attributes(e.attributes), e.time_unix_nano)
                                    for e in s.events
                                ],
                                status_code=s.status.code,
                                status_message=s.status.message,
                                resource=resource,
                                scope=ss.scope.name,
                            )
                        )
        return out

    def latest_points(self, metric: str) -> list[Point]:
        """The data points of ``metric`` in the most recent export that has it
        (cumulative temporality: the latest export holds the totals)."""
        with self._lock:
            requests = list(self.metric_requests)
        for request in reversed(requests):
            points = list(_points(request, metric))
            if points:
                return points
        return []

    def wait(self, condition: Callable[[], Any], timeout: float = 15, what: str = "") -> Any:
        """Poll ``condition`` (called from the test) until truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout waiting for {what or condition}")
            time.sleep(0.05)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.http_posts += 1
                if self.path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.add_traces(request)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    metrics = metrics_service_pb2.ExportMetricsServiceRequest()
                    metrics.ParseFromString(body)
                    receiver.add_metrics(metrics)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.grpc_calls += 1
        self.receiver.add_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.grpc_calls += 1
        self.receiver.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _points(request: metrics_service_pb2.ExportMetricsServiceRequest, name: str) -> Iterator[Point]:
    for rm in request.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name != name:
                    continue
                kind = m.WhichOneof("data")
                if kind in ("sum", "gauge"):
                    for dp in getattr(m, kind).data_points:
                        value = dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double
                        yield Point(name, attributes(dp.attributes), value, resource=resource)
                elif kind == "histogram":
                    for hp in m.histogram.data_points:
                        yield Point(
                            name, attributes(hp.attributes), hp.sum, hp.count, resource=resource
                        )
