"""TelemetryPipeline: the sidecar's per-message handler, wiring engines' state machines
(assembler.py), the metric store and its two views, and the KV sinks together.

    pipeline = TelemetryPipeline(tracer_provider, meter_provider, registry)
    sidecar = Sidecar(..., handler=pipeline.handle)   # handle(received, observation)
    ... the sidecar loop calls pipeline.tick(time.time_ns()) every few ms ...
    pipeline.close()

Exporters plug in around it: SpanProcessors on the TracerProvider, MetricReaders on the
MeterProvider, the CollectorRegistry on /metrics, KvSinks via add_kv_sink. OTLP histograms reach
only the metric exporters/readers made by the ``otel_histograms`` bridge given here (see
otel_histograms.py: they are built from the store at collection time).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from schedscope.telemetry.assembler import AssemblerConfig, EngineAssembler, engine_label_values
from schedscope.telemetry.engines import EngineRegistry, Observation
from schedscope.telemetry.ingest import IngestCounters, Received
from schedscope.telemetry.kv_sinks import KvSink, ListKvSink
from schedscope.telemetry.metric_store import EngineMetrics, MetricStore
from schedscope.telemetry.metric_views import PrometheusView, attach_otel
from schedscope.telemetry.otel_histograms import HistogramInMemoryReader, OtlpHistogramBridge


class TelemetryPipeline:
    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        registry: CollectorRegistry | None = None,
        *,
        config: AssemblerConfig | None = None,
        kv_sinks: Iterable[KvSink] = (),
        max_engines: int = 1024,
        otel_histograms: OtlpHistogramBridge | None = None,
    ) -> None:
        """tracer_provider None: metrics only, no spans. meter_provider None: no OTLP gauges
        or counters. otel_histograms: the bridge the metric exporters were wrapped with (it gets
        this pipeline's store); None: no OTLP histograms. registry None: a new dedicated
        CollectorRegistry (never the global one)."""
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.registry = registry if registry is not None else CollectorRegistry()
        self.config = config or AssemblerConfig()
        self.max_engines = max_engines
        self.store = MetricStore()
        self.registry.register(PrometheusView(self.store))
        if meter_provider is not None:
            attach_otel(self.store, meter_provider)
        self.otel_histograms = otel_histograms
        if otel_histograms is not None:
            otel_histograms.bind(self.store)
        self.kv_sinks: list[KvSink] = list(kv_sinks)
        self.engines: OrderedDict[str, EngineAssembler] = OrderedDict()
        self._closed = False

    @classmethod
    def in_memory(cls, **kwargs) -> InMemoryTelemetry:
        """Same as ``in_memory_pipeline(**kwargs)``: wired to in-memory exporters."""
        return in_memory_pipeline(**kwargs)

    # -- wiring ------------------------------------------------------------------------------

    def add_kv_sink(self, sink: KvSink) -> None:
        """Every KV batch closed from now on goes to this sink too."""
        self.kv_sinks.append(sink)  # the batchers share this list

    def watch_ingest(self, counters: IngestCounters) -> None:
        """Expose the ingest's counters (bad frames by kind, rejected events, sidecar-queue
        drops) as sidecar-wide metrics, read at scrape/collection time."""
        f = self.store.family
        f("ingest_frames").provider = lambda: [((), counters.frames_received)]
        f("ingest_bad_frames").provider = lambda: [
            ((kind,), n) for kind, n in list(counters.bad_frames.items())
        ]
        f("ingest_rejected_events").provider = lambda: [((), counters.rejected_events)]
        f("sidecar_queue_dropped_frames").provider = lambda: [((), counters.queue_dropped_frames)]
        f("sidecar_queue_dropped_events").provider = lambda: [((), counters.queue_dropped_events)]
        f("ingest_thread_dead").provider = lambda: [((), int(counters.thread_dead))]

    def watch_registry(self, registry: EngineRegistry) -> None:
        """Expose the engine registry's refusals and evictions (called by Sidecar)."""
        f = self.store.family
        f("engines_evicted").provider = lambda: [((), registry.evicted_engines)]
        f("implausible_seq").provider = lambda: [((), registry.implausible_seq_total)]

    # -- the handler ---------------------------------------------------------------------------

    def handle(self, received: Received, observation: Observation) -> None:
        """Process one message (called by the sidecar after EngineRegistry.observe)."""
        record = observation.record
        frame = received.frame
        for old in observation.replaced:  # same identity, new engine_id: the old one is gone
            gone = self.engines.pop(old.engine_id, None)
            if gone is not None:
                gone.close_all("restart")
        asm = self.engines.get(record.engine_id)
        if asm is None:
            asm = self._new_engine(record)
        else:
            self.engines.move_to_end(record.engine_id)
        m = asm.m
        m.duplicate_messages.value = record.out_of_order  # the sidecar skips those frames
        if observation.duplicate:
            return
        if observation.restarted:
            asm.close_all("restart")
        if observation.restarted or observation.replaced:
            m.engine_restarts.value += 1
        if record.info is not asm.info:
            asm.set_info(record.info)
        asm.process(frame.events, record.to_wall_ns(0), received.recv_wall_ns)
        # The registry's per-engine counts, mirrored (cumulative, so plain assignment).
        m.lost_messages.value = record.lost_messages
        m.engine_dropped_messages.value = record.engine_dropped_messages
        m.engine_dropped_events.value = record.engine_dropped_events

    def tick(self, now_ns: int | None = None) -> None:
        """Time-based work (KV window flushes, batch timeouts). Call every few ms with the
        sidecar's wall clock (time.time_ns(), the clock of Received.recv_wall_ns)."""
        now = time.time_ns() if now_ns is None else now_ns
        for asm in list(self.engines.values()):
            asm.tick(now)

    def forget_engine(self, engine_id: str, reason: str = "forgotten") -> None:
        asm = self.engines.pop(engine_id, None)
        if asm is not None:
            asm.close_all(reason)
            self.store.remove_engine(asm.m.base)

    def close(self) -> None:
        """End everything still open (spans with error status where work was cut short),
        deliver pending KV batches, close the sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for asm in list(self.engines.values()):
            asm.close_all("sidecar_close")
        for sink in self.kv_sinks:
            sink.close()

    # -- internals -------------------------------------------------------------------------------

    def _new_engine(self, record) -> EngineAssembler:
        metrics = EngineMetrics(self.store, engine_label_values(record.engine_id, None))
        asm = EngineAssembler(record, metrics, self.tracer_provider, self.kv_sinks, self.config)
        self.engines[record.engine_id] = asm
        while len(self.engines) > self.max_engines:
            old_id = next(iter(self.engines))
            self.forget_engine(old_id, "evicted")
        return asm


@dataclass
class InMemoryTelemetry:
    """A pipeline wired to in-memory exporters, for tests and the benchmark."""

    pipeline: TelemetryPipeline
    spans: InMemorySpanExporter
    metric_reader: HistogramInMemoryReader
    kv: ListKvSink
    tracer_provider: TracerProvider
    meter_provider: SdkMeterProvider

    @property
    def registry(self) -> CollectorRegistry:
        return self.pipeline.registry


def in_memory_pipeline(
    *,
    config: AssemblerConfig | None = None,
    service_name: str = "schedscope-test",
    tracing: bool = True,
) -> InMemoryTelemetry:
    """TelemetryPipeline with an InMemorySpanExporter (SimpleSpanProcessor: spans are there as
    soon as they end), an InMemoryMetricReader that includes the OTLP histograms, and a
    ListKvSink."""
    exporter = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create({"service.name": service_name}))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    histograms = OtlpHistogramBridge()
    reader = HistogramInMemoryReader(histograms)
    mp = SdkMeterProvider(metric_readers=[reader])
    kv = ListKvSink()
    pipeline = TelemetryPipeline(
        tp if tracing else None,
        mp,
        CollectorRegistry(),
        config=config,
        kv_sinks=[kv],
        otel_histograms=histograms,
    )
    return InMemoryTelemetry(pipeline, exporter, reader, kv, tp, mp)
