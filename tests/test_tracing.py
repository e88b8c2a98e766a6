"""Tracing: spans of the job's phases reach a real OTLP/HTTP receiver, under the parent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import RedisServer, python_child, run_baqup

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver on loopback that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def test_spans_are_children_of_the_job_trace_parent(
    job_env: dict[str, str], collector: Collector, tmp_path: Path
) -> None:
    env = {
        **job_env,
        "BAQUP_AGENT_TRACING_ENABLED": "true",
        "BAQUP_AGENT_TRACING_ENDPOINT": collector.endpoint,
        "BAQUP_JOB_TRACE_PARENT": f"00-{TRACE_ID}-{PARENT_ID}-01",
    }
    code = "import sys, time; time.sleep(0.2); sys.stdout.write('x' * 100000)"
    result = run_baqup(["--stdout-artifact", "out.bin", "--", *python_child(code)], env)
    assert result.returncode == 0, result.stderr
    names = {span.name for span in collector.spans}
    assert names == {
        "agent.init",
        "agent.connect_source",
        "agent.snapshot",
        "agent.compress",
        "agent.write_artifact",
        "agent.report_status",
    }
    for span in collector.spans:
        assert span.trace_id.hex() == TRACE_ID
        assert span.parent_span_id.hex() == PARENT_ID
        assert span.end_time_unix_nano >= span.start_time_unix_nano
    by_name = {span.name: span for span in collector.spans}
    assert (
        by_name["agent.init"].end_time_unix_nano <= by_name["agent.snapshot"].start_time_unix_nano
    )
    assert (
        by_name["agent.snapshot"].end_time_unix_nano
        <= by_name["agent.write_artifact"].start_time_unix_nano
    )


@pytest.mark.parametrize("bus", ["file", "redis"])
def test_nothing_of_opentelemetry_is_imported_when_tracing_is_off(
    job_env: dict[str, str], redis_server: RedisServer, bus: str
) -> None:
    # redis-py loads OpenTelemetry's metrics SDK whenever it is installed: not here
    if bus == "redis":
        job_env = {**job_env, "BAQUP_BUS_URL": redis_server.url}
    code = (
        "import sys, runpy\n"
        "sys.argv = ['baqup-run', '--', 'sh', '-c', 'echo x > \"$BAQUP_WORK_DIR/a\"']\n"
        "try:\n"
        "    runpy.run_module('baqup_supervisor', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    loaded = sorted(m for m, module in sys.modules.items()\n"
        "                    if m.startswith('opentelemetry') and module is not None)\n"
        "    print('LOADED', loaded, 'EXIT', exc.code)\n"
    )
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "LOADED [] EXIT 0" in result.stdout, result.stdout + result.stderr


def test_an_unreachable_collector_never_fails_the_job(job_env: dict[str, str]) -> None:
    env = {
        **job_env,
        "BAQUP_AGENT_TRACING_ENABLED": "true",
        "BAQUP_AGENT_TRACING_ENDPOINT": "http://127.0.0.1:9/v1/traces",
    }
    result = run_baqup(["--", "sh", "-c", 'echo x > "$BAQUP_WORK_DIR/a"'], env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
