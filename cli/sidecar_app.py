"""The sidecar's composition root: settings in, a running sidecar out, files flushed at the end.

``build_sidecar_app(settings)`` wires, in one place:

    raw events (ZMQ, or a recording)       KV events of a stock SGLang/vLLM (optional)
            │ Ingest (+ RecordingIngest)          │ KvIngest (its own thread) ─ hand-off queue ─┐
            ▼                                                                                  ▼
    Sidecar: EngineRegistry → TelemetryPipeline (spans, metrics, KV batches) ◄───────────────────┘
            ├─ TracerProvider → OTLP (gRPC/HTTP) | OTLP JSON lines | Perfetto timeline
            ├─ MeterProvider  → OTLP | OTLP JSON lines
            ├─ CollectorRegistry → /metrics (Prometheus) and metrics.prom at the end
            └─ KV sinks → KvRelay (SGLang/vLLM wire format)

``schedscope sidecar`` runs it on a live socket, ``schedscope replay`` feeds it a recording
(``live=False``: no socket), and ``schedscope demo`` runs ``schedscope sidecar`` in its own
process. ``close()`` drains what was received, ends the telemetry, flushes every exporter and
writes ``metrics.prom`` and ``sidecar.json`` (the final counts), in that order.

Torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schedscope.cli.settings import CliError, Settings

log = logging.getLogger(__name__)

# File names inside --out-dir (the README's and the demo's list of outputs).
TRACES_FILE = "traces.jsonl"
METRICS_FILE = "metrics.jsonl"
PERFETTO_FILE = "timeline.perfetto.json"
SNAPSHOT_FILE = "metrics.prom"
RECORDING_FILE = "events.ssrec"
STATE_FILE = "sidecar.json"

KV_HANDOFF_MAX = 10_000  # KV-ingest batches waiting for the processing thread
# At shutdown, how long a slow or dead OTLP backend may hold us up once the files are written
# (the SDK would otherwise retry each export for its full timeout, 10 s or more).
OTLP_SHUTDOWN_S = 5.0
DRAIN_DEADLINE_S = 5.0  # at shutdown, queued frames are processed for at most this long
FILE_EXPORTERS = ("otlp_file", "perfetto")
TICK_S = 0.01  # telemetry clock for time-based work (the pipeline asks for "every few ms")


@dataclass
class SidecarApp:
    """Everything a running sidecar owns. Build with ``build_sidecar_app``."""

    settings: Settings
    command: str
    sidecar: Any  # telemetry.sidecar.Sidecar
    pipeline: Any  # telemetry.pipeline.TelemetryPipeline
    tracer_provider: Any
    meter_provider: Any
    span_processors: list[Any]
    registry: Any  # prometheus_client.CollectorRegistry
    export_stats: Any
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    metrics_server: Any = None
    kv_relay: Any = None
    kv_ingest: Any = None
    recorder: Any = None
    kv_dropped: int = 0
    _kv_queue: queue.Queue = field(default_factory=lambda: queue.Queue(KV_HANDOFF_MAX))
    # The telemetry's clock for time-based work (KV windows, batch timeouts): wall time live,
    # the recorded receive time in a replay.
    clock: Callable[[], int] = time.time_ns
    _closed: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def metrics_url(self) -> str | None:
        return self.metrics_server.url if self.metrics_server is not None else None

    # -- running --------------------------------------------------------------------------

    def start(self) -> SidecarApp:
        """Open the raw-event socket and the KV ingest (live mode). One line on failure."""
        try:
            self.sidecar.start()
        except OSError as exc:
            self.close()
            raise CliError(f"--endpoint: {exc}", code=1) from None
        if self.kv_ingest is not None:
            self.kv_ingest.start()
        self.write_state(running=True)
        return self

    def stop(self) -> None:
        """Ask ``run`` to return (signal handlers, other threads)."""
        self._stop.set()
        self.sidecar.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(
        self,
        *,
        duration_s: float | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        """Process frames until ``stop()`` (or ``duration_s``); ``on_tick`` ~10 times a second.

        The telemetry ticks every TICK_S (KV time windows, batch timeouts): often enough that a
        window closes within a few ms of its end."""
        deadline = time.monotonic() + duration_s if duration_s else None
        next_tick = next_callback = 0.0
        while not self._stop.is_set():
            self.sidecar.process(timeout=TICK_S)
            self.drain_kv_ingest()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self.tick()
            if on_tick is not None and now >= next_callback:
                next_callback = now + 0.1
                on_tick()
            if deadline is not None and now >= deadline:
                break

    def tick(self) -> None:
        tick = getattr(self.pipeline, "tick", None)
        if tick is not None:
            try:
                tick(self.clock())
            except Exception:
                log.exception("telemetry tick failed")

    def on_kv_batch(self, batch: Any) -> None:
        """KvIngest callback (its thread): hand the batch to the processing thread."""
        try:
            self._kv_queue.put_nowait(batch)
        except queue.Full:
            self.kv_dropped += 1

    def drain_kv_ingest(self) -> None:
        """Feed ingested KV batches through the same path as engine frames (processing
        thread), under the ingest's synthetic engine id; recorded like any other frame."""
        if self.kv_ingest is None:
            return
        from schedscope.telemetry.ingest import Received
        from schedscope.telemetry.schema import DecodedFrame, encode_envelope

        while True:
            try:
                b = self._kv_queue.get_nowait()
            except queue.Empty:
                return
            now = time.time_ns()
            if self.recorder is not None:
                self.recorder.write(encode_envelope(b.engine_id, b.seq, [b.kv_events]), now)
            frame = DecodedFrame(b.engine_id, b.seq, [b.kv_events])
            self.sidecar.process_one(Received(frame, now))

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> dict[str, Any]:
        """Drain, end the telemetry, flush and close every exporter, write the final files.
        Idempotent; returns the final state (also written to sidecar.json)."""
        if self._closed:
            return self.state()
        self._closed = True
        if self.kv_ingest is not None:
            self.kv_ingest.close()
        ingest = self.sidecar.ingest
        ingest.stop()
        # Frames received before the socket closed are processed, up to a deadline: a flood's
        # backlog must not hold the exit (and the files) for minutes. The rest is counted.
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        while time.monotonic() < deadline and self.sidecar.process(timeout=0, max_frames=256):
            pass
        for left in ingest.drain(max_items=ingest.queue.maxsize + 1):
            ingest.counters.queue_dropped_frames += 1
            ingest.counters.queue_dropped_events += len(left.frame.events)
        self.drain_kv_ingest()
        self.tick()
        _call(self.pipeline, "close")  # ends open spans, flushes pending KV batches
        if self.kv_relay is not None:
            self.kv_relay.close()
        self._shutdown_exporters()
        if self.recorder is not None:
            self.recorder.close()
        if self.out_dir is not None and "snapshot" in self.files:
            self.write_snapshot(self.files["snapshot"])
        if self.metrics_server is not None:
            self.metrics_server.close()
        state = self.write_state(running=False)
        return state

    def _shutdown_exporters(self) -> None:
        """Files first (each processor's shutdown exports what it holds, then the Perfetto
        file is written); then OTLP and the metric readers (file reader first), given at most
        OTLP_SHUTDOWN_S: a dead collector must not keep the files, or the exit, waiting."""
        remote = []
        for p in self.span_processors:
            if getattr(p, "name", "") in FILE_EXPORTERS:
                _call(p, "shutdown")
            else:
                remote.append(p)

        def finish() -> None:
            for p in remote:
                _call(p, "shutdown")
            try:
                self.meter_provider.shutdown(timeout_millis=OTLP_SHUTDOWN_S * 1000)
            except Exception as exc:  # a reader that ran out of time: counted by the exporter
                log.warning("metric export at shutdown: %s", exc)

        t = threading.Thread(target=finish, name="schedscope-exporter-shutdown", daemon=True)
        t.start()
        t.join(OTLP_SHUTDOWN_S + 1.0)
        if t.is_alive():
            log.warning("OTLP backend did not take the last data within %.0f s", OTLP_SHUTDOWN_S)

    def write_snapshot(self, path: Path) -> None:
        """The registry as Prometheus text: exactly what /metrics served last."""
        from prometheus_client import generate_latest

        _atomic_write(path, generate_latest(self.registry))

    def state(self, running: bool | None = None) -> dict[str, Any]:
        s = self.sidecar.summary()
        state: dict[str, Any] = {
            "running": (not self._closed) if running is None else running,
            "pid": os.getpid(),
            "endpoint": self.sidecar.ingest.bound_endpoint or self.sidecar.ingest.endpoint,
            "metrics_url": self.metrics_url,
            "files": {k: str(v) for k, v in self.files.items()},
            "frames": s.frames,
            "events": s.events,
            "events_by_type": s.events_by_type,
            "engines": s.engines,
            "lost_messages": s.lost_messages,
            "engine_dropped_messages": s.engine_dropped_messages,
            "queue_dropped_frames": s.queue_dropped_frames,
            "bad_frames": s.bad_frames_total,
            "rejected_events": s.rejected_events,
            "handler_errors": s.handler_errors,
            "kv_ingest_dropped": self.kv_dropped,
        }
        if self.recorder is not None:
            state["recording"] = self.recorder.stats()
        if self.export_stats is not None:
            state["exporters"] = {
                f"{kind}/{name}/{outcome}": n
                for (kind, name, outcome), n in sorted(self.export_stats.snapshot().items())
            }
        return state

    def write_state(self, running: bool) -> dict[str, Any]:
        state = self.state(running)
        if self.out_dir is not None:
            _atomic_write(self.out_dir / STATE_FILE, json.dumps(state, indent=2).encode())
        return state


def _call(obj: Any, method: str) -> None:
    fn = getattr(obj, method, None)
    if fn is None:
        return
    try:
        fn()
    except Exception:
        log.exception("%s.%s failed during shutdown", type(obj).__name__, method)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_sidecar_app(settings: Settings, *, live: bool = True) -> SidecarApp:
    """Build (not start) the whole sidecar from resolved settings.

    ``live=False`` (replay): no raw-event socket, no KV ingest; frames come from a recording.
    Raises CliError with one line for what a user can get wrong (port in use, bad folder...).
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from schedscope.exporters.otlp import (
        build_metric_readers,
        build_resource,
        build_span_processors,
    )
    from schedscope.exporters.stats import (
        EXPORT_STATS,
        ExportStatsCollector,
        register_otel_instruments,
    )
    from schedscope.telemetry.ingest import Ingest
    from schedscope.telemetry.otel_histograms import OtlpHistogramBridge
    from schedscope.telemetry.sidecar import Sidecar

    cmd = settings.command
    v = settings.values
    out_dir: Path | None = v.get("out_dir")
    config = _export_config(settings)
    try:  # resolved once here so a bad OTEL_* value is one line, not a traceback later
        otlp_on = bool(config.traces_endpoint_resolved() or config.metrics_endpoint_resolved())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    want_json = v.get("otlp_json")
    if want_json is None:  # the embedded default: files when nothing else receives the data
        want_json = not otlp_on
    if out_dir is None and (want_json or v.get("record")):
        out_dir = Path("schedscope-out")
    files: dict[str, Path] = {}
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot create --out-dir {str(out_dir)!r}: {exc.strerror}") from None
        if want_json:
            files["traces"] = out_dir / TRACES_FILE
            files["metrics"] = out_dir / METRICS_FILE
        if v.get("perfetto"):
            files["perfetto"] = out_dir / PERFETTO_FILE
        if v.get("snapshot"):
            files["snapshot"] = out_dir / SNAPSHOT_FILE
        if v.get("record") and live:
            files["recording"] = out_dir / RECORDING_FILE
        for path in files.values():  # a re-run replaces, never appends to, the last run's files
            path.unlink(missing_ok=True)

    config.file_dir = out_dir if want_json else None
    config.files_always = bool(want_json)
    config.perfetto_path = files.get("perfetto")
    # Built from the exporters' public parts (not build_tracer_provider) so that close() can
    # shut the file exporters down before the remote ones.
    resource = build_resource(config)
    span_processors = build_span_processors(config)
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    # OTLP histograms are built from the pipeline's store at each export (it binds the store).
    histograms = OtlpHistogramBridge(resource)
    # Readers come OTLP first, file last; MeterProvider shuts them down in order: reverse.
    readers = build_metric_readers(config, histograms)[::-1]
    meter_provider = MeterProvider(
        metric_readers=readers, resource=resource, shutdown_on_exit=False
    )
    register_otel_instruments(meter_provider.get_meter("schedscope.exporters"), EXPORT_STATS)

    registry = CollectorRegistry(auto_describe=True)
    kv_relay = _build_kv_relay(settings)
    if kv_relay is not None:
        from schedscope.exporters.kv_relay import KvRelayCollector

        registry.register(KvRelayCollector(kv_relay))
    pipeline = _build_pipeline(
        tracer_provider, meter_provider, histograms, registry, kv_relay, settings
    )
    registry.register(ExportStatsCollector(EXPORT_STATS))

    recorder = None
    if "recording" in files:
        from schedscope.telemetry.recording import RecordingIngest, RecordingWriter

        recorder = RecordingWriter(
            files["recording"],
            max_bytes=v["record_max_bytes"],
            meta={"endpoint": v.get("endpoint"), "tool": cmd},
        )
    ingest_kwargs = {
        "bind": not v.get("connect", False),
        "queue_size": v.get("queue_size", 10_000),
        "max_message_bytes": v.get("max_message_bytes", 16 * 1024**2),
    }
    endpoint = v.get("endpoint") or "inproc://schedscope-replay"
    if recorder is not None:
        ingest = RecordingIngest(endpoint, recorder, **ingest_kwargs)
    else:
        ingest = Ingest(endpoint, **ingest_kwargs)
    pipeline.watch_ingest(ingest.counters)
    sidecar = Sidecar(ingest, pipeline)

    app = SidecarApp(
        settings=settings,
        command=cmd,
        sidecar=sidecar,
        pipeline=pipeline,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        span_processors=span_processors,
        registry=registry,
        export_stats=EXPORT_STATS,
        out_dir=out_dir,
        files=files,
        kv_relay=kv_relay,
        recorder=recorder,
    )
    if live:
        app.kv_ingest = _build_kv_ingest(settings, app.on_kv_batch)
    port = v.get("prometheus_port")
    if port is not None:
        from schedscope.exporters.prometheus import serve_metrics

        try:
            app.metrics_server = serve_metrics(registry, port=port, addr=v["prometheus_host"])
        except OSError as exc:
            app.close()
            reason = "already in use" if exc.errno == 98 else (exc.strerror or str(exc))
            raise CliError(
                f"--prometheus-port {port} on {v['prometheus_host']}: "
                f"{reason}; pick another port or 0 for a free one"
            ) from None
    return app


def _export_config(settings: Settings) -> Any:
    """The OTLP part of the settings. A value that came from a flag, $SCHEDSCOPE_* or the config
    file is explicit and wins; one read from the standard OTEL_* variable is left to
    ExportConfig and the SDK exporters, which apply the spec's order (per-signal variable over
    the generic one), so OTEL_EXPORTER_OTLP_TRACES_ENDPOINT alone exports traces only."""
    from schedscope.exporters.otlp import ExportConfig

    v, src = settings.values, settings.sources

    def explicit(key: str, otel_var: str) -> Any:
        return None if src.get(key) == "$" + otel_var else v.get(key)

    return ExportConfig(
        endpoint=explicit("otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        protocol=explicit("otlp_protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        service_name=v.get("service_name"),
    )


def _build_pipeline(
    tracer_provider: Any,
    meter_provider: Any,
    histograms: Any,
    registry: Any,
    kv_relay: Any,
    settings: Settings,
) -> Any:
    from schedscope.telemetry.pipeline import TelemetryPipeline

    sinks = [kv_relay] if kv_relay is not None else []
    return TelemetryPipeline(
        tracer_provider, meter_provider, registry, kv_sinks=sinks, otel_histograms=histograms
    )


def _kv_config(settings: Settings, prefix: str) -> dict[str, Any] | None:
    """Merge ``--<prefix>-config`` JSON (SGLang's KVEventsConfig) with the explicit flags."""
    v = settings.values
    cfg = dict(v.get(f"{prefix}_config") or {})
    for key in ("endpoint", "replay_endpoint", "topic", "buffer_steps", "hash_style"):
        value = v.get(f"{prefix}_{key}")
        source = settings.sources.get(f"{prefix}_{key}", "default")
        if value is not None and (source != "default" or key not in cfg):
            cfg[key] = value
    return cfg if cfg.get("endpoint") else None


def _build_kv_relay(settings: Settings) -> Any:
    cfg = _kv_config(settings, "kv_relay")
    if cfg is None:
        return None
    from schedscope.exporters.kv_relay import KvRelay

    try:
        return KvRelay(cfg)
    except Exception as exc:  # zmq bind errors, bad config values
        raise CliError(f"--kv-relay-endpoint {cfg['endpoint']!r}: {exc}") from None


def _build_kv_ingest(settings: Settings, on_batch: Callable[[Any], None]) -> Any:
    cfg = _kv_config(settings, "kv_ingest")
    if cfg is None:
        return None
    from schedscope.exporters.kv_ingest import KvIngest

    def connectable(endpoint: str | None) -> str | None:
        # The engines' config says where they bind (tcp://*:5557); we connect to it.
        return endpoint.replace("tcp://*:", "tcp://127.0.0.1:") if endpoint else None

    return KvIngest(
        connectable(cfg["endpoint"]),
        replay_endpoint=connectable(cfg.get("replay_endpoint")),
        topic=cfg.get("topic", ""),
        on_batch=on_batch,
    )
