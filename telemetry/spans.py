"""Span plumbing for the assembler: one TracerProvider per engine identity, span helpers.

Decision: each engine gets its own TracerProvider whose Resource carries the engine's identity
(service.name, service.instance.id = engine_id, schedscope.model / engine_type / tp, pp, dp
rank, host, pid), and which *shares the span processors of the provider handed to the
pipeline*. Exporters are configured once on that base provider (including processors added
later: the processor object is shared), every engine's spans carry their own resource, and an
OTLP backend groups them per engine. The engine providers are never shut down themselves; the
base provider's shutdown flushes everything.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, Status, StatusCode

from schedscope.telemetry.schema import EngineInfo

TRACER_NAME = "schedscope.telemetry"
DEFAULT_SERVICE_NAME = "schedscope-engine"
_ERROR = StatusCode.ERROR


def engine_resource(base: Resource, engine_id: str, info: EngineInfo | None) -> Resource:
    attrs: dict[str, str | int] = {
        "service.instance.id": engine_id,
        "schedscope.engine_id": engine_id,
    }
    if str(base.attributes.get("service.name", "unknown_service")).startswith("unknown_service"):
        attrs["service.name"] = DEFAULT_SERVICE_NAME
    if info is not None:
        attrs["schedscope.model"] = info.model
        attrs["schedscope.engine_type"] = info.engine_type
        attrs["schedscope.tp_rank"] = info.tp_rank
        attrs["schedscope.pp_rank"] = info.pp_rank
        if info.dp_rank is not None:
            attrs["schedscope.dp_rank"] = info.dp_rank
        if info.hostname:
            attrs["host.name"] = info.hostname
        if info.pid:
            attrs["process.pid"] = info.pid
        if info.version:
            attrs["service.version"] = info.version
    return base.merge(Resource(attrs))


def engine_tracer(base: TracerProvider, engine_id: str, info: EngineInfo | None) -> trace.Tracer:
    """A tracer whose spans carry this engine's resource and go to base's processors."""
    processor = getattr(base, "_active_span_processor", None)
    if processor is None:  # an SDK without it: fall back to the base provider's resource
        return base.get_tracer(TRACER_NAME)
    provider = TracerProvider(
        sampler=base.sampler,
        resource=engine_resource(base.resource, engine_id, info),
        shutdown_on_exit=False,
        active_span_processor=processor,
        id_generator=getattr(base, "id_generator", None),
        span_limits=getattr(base, "_span_limits", None),
    )
    return provider.get_tracer(TRACER_NAME)


def end_span(span: Span, end_wall_ns: int, error: str | None = None) -> None:
    if error is not None:
        span.set_status(Status(_ERROR, error))
    span.end(end_time=end_wall_ns)
