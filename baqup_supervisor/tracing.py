"""Tracing (spec section 6, optional): OpenTelemetry spans of the job's phases.

With `BAQUP_AGENT_TRACING_ENABLED=true` and an OTLP/HTTP `BAQUP_AGENT_TRACING_ENDPOINT`
(e.g. `http://collector:4318/v1/traces`), the job emits the spans `agent.init`,
`agent.connect_source`, `agent.snapshot`, `agent.compress`, `agent.write_artifact` and
`agent.report_status`, all children of the W3C `BAQUP_JOB_TRACE_PARENT` when given.
OpenTelemetry is the `tracing` extra: when tracing is off nothing of it is imported
(`NullTracer`), and a tracing failure never fails the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .secret import Redactor

SPANS = (
    "agent.init",
    "agent.connect_source",
    "agent.snapshot",
    "agent.compress",
    "agent.write_artifact",
    "agent.report_status",
)


class NullTracer:
    """Tracing off: every call is a no-op and nothing is imported."""

    enabled = False

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        yield

    def start(self, name: str, **attributes: Any) -> None:
        """Open a span that is ended later by `end(name)`."""

    def end(self, name: str, error: BaseException | None = None) -> None:
        """End a span opened by `start`."""

    def shutdown(self) -> None:
        """Flush and stop the exporter."""


class OtelTracer(NullTracer):
    """Spans exported over OTLP/HTTP, parented on the job's trace context."""

    enabled = True

    def __init__(
        self,
        endpoint: str,
        *,
        service: str,
        job_id: str,
        agent_id: str,
        trace_parent: str | None,
        redactor: Redactor | None = None,
    ) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create(
            {"service.name": service, "baqup.job_id": job_id, "baqup.agent_id": agent_id}
        )
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5))
        )
        self._tracer = self._provider.get_tracer("baqup-supervisor")
        carrier = {"traceparent": trace_parent} if trace_parent else {}
        self._context = TraceContextTextMapPropagator().extract(carrier)
        self._open: dict[str, Any] = {}
        self._attributes = {"baqup.job_id": job_id, "baqup.agent_id": agent_id}
        self._redactor = redactor or Redactor()

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        self.start(name, **attributes)
        try:
            yield
        except BaseException as exc:
            self.end(name, exc)
            raise
        self.end(name)

    def start(self, name: str, **attributes: Any) -> None:
        if name in self._open:
            return
        self._open[name] = self._tracer.start_span(
            name, context=self._context, attributes={**self._attributes, **attributes}
        )

    def end(self, name: str, error: BaseException | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self._open.pop(name, None)
        if span is None:
            return
        if error is not None:
            span.set_status(
                Status(
                    StatusCode.ERROR, self._redactor.clip(f"{type(error).__name__}: {error}", 300)
                )
            )
        span.end()

    def shutdown(self) -> None:
        for name in list(self._open):
            self.end(name)
        self._provider.shutdown()


def _bridge_logging(log: Any) -> None:
    """OpenTelemetry reports export failures through `logging`: make them our records."""
    import logging

    class Bridge(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log.warn(log.redactor.clip(f"tracing: {record.getMessage()}", 500), logger=record.name)

    otel = logging.getLogger("opentelemetry")
    otel.handlers = [Bridge(logging.WARNING)]
    otel.propagate = False


def keep_out() -> None:
    """Tracing off in baqup-run: make OpenTelemetry unimportable for this process.

    Libraries that use it when it happens to be installed (redis-py's observability
    module loads the metrics SDK, about 30 ms) then skip it, so "nothing imported when
    disabled" holds for the whole process. Never called by the in-process SDK, whose
    host program may use OpenTelemetry itself.
    """
    import sys

    if "opentelemetry" not in sys.modules:
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]


def make_tracer(
    values: Any, *, service: str, job_id: str, agent_id: str, log: Any = None
) -> NullTracer:
    """The tracer the configuration asks for; a NullTracer when off or unavailable."""
    if not values.get("BAQUP_AGENT_TRACING_ENABLED"):
        return NullTracer()
    endpoint = values.get("BAQUP_AGENT_TRACING_ENDPOINT")
    try:
        tracer = OtelTracer(
            str(endpoint),
            service=service,
            job_id=job_id,
            agent_id=agent_id,
            trace_parent=values.get("BAQUP_JOB_TRACE_PARENT"),
            redactor=getattr(log, "redactor", None),
        )
        if log is not None:
            _bridge_logging(log)
        return tracer
    except ImportError:
        if log is not None:
            log.warn(
                "tracing is on but OpenTelemetry is not installed: "
                "pip install 'baqup-supervisor[tracing]'"
            )
        return NullTracer()
