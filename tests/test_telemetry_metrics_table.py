"""The metrics table: one definition per metric feeding both views, and the README's table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

from schedscope.telemetry.ingest import IngestCounters
from schedscope.telemetry.metrics_table import (
    ENGINE_LABELS,
    METRICS,
    metric_names,
    metrics_reference_markdown,
)
from schedscope.telemetry.pipeline import TelemetryPipeline
from schedscope.telemetry.schema import EngineInfo, KvLoad
from schedscope.telemetry.scripted import ScriptedEngine

README = Path(__file__).resolve().parents[1] / "README.md"


def test_names_are_unique_and_valid_for_both_sides():
    proms = [m.prom_name for m in METRICS]
    otlps = [m.otlp_name for m in METRICS if m.otlp_name]
    assert len(set(proms)) == len(proms) and len(set(otlps)) == len(otlps)
    assert len({m.key for m in METRICS}) == len(METRICS)
    for m in METRICS:
        # `sglang:` names keep SGLang's dashboards working; our own names avoid `:`, which
        # Prometheus reserves for recording rules (promtool's lint).
        assert re.fullmatch(r"sglang:[a-z0-9_]+|schedscope_[a-z0-9_]+", m.prom_name), m.prom_name
        assert m.prom_name.endswith("_total") == (m.kind == "counter"), m.prom_name
        if m.otlp_name:  # the OTel SDK refuses `:`
            assert re.fullmatch(r"[a-z][a-z0-9_.]*", m.otlp_name), m.otlp_name
        assert (m.buckets is not None) == (m.kind == "histogram")
    assert ENGINE_LABELS == (
        "model_name",
        "engine_type",
        "tp_rank",
        "pp_rank",
        "dp_rank",
        "engine_id",
    )


def test_lookup_by_key_or_either_name():
    assert metric_names("gen_throughput") == ("sglang:gen_throughput", "sglang.gen_throughput")
    assert (
        metric_names("sglang:time_to_first_token_seconds")[1] == "gen_ai.server.time_to_first_token"
    )
    assert metric_names("gen_ai.server.request.duration")[0] == "sglang:e2e_request_latency_seconds"


def test_every_metric_is_exposed_by_both_views_with_its_labels():
    reader = InMemoryMetricReader()
    p = TelemetryPipeline(None, MeterProvider(metric_readers=[reader]), CollectorRegistry())
    counters = IngestCounters()
    counters.bad_frames["malformed"] = 3
    p.watch_ingest(counters)
    e = ScriptedEngine(p.handle, info=EngineInfo(model="m", dp_rank=1))
    e.hello()
    e.send(KvLoad(e.ts(1), 1, 8, 10, 100, 0, 0.1, 0.5))
    text = generate_latest(p.registry).decode()
    for m in METRICS:
        assert f"# TYPE {m.prom_name} {m.kind}" in text, m.prom_name
    assert (
        'schedscope_kv_total_blocks{dp_rank="1",engine_id="engine-a",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 100.0'
        in text
    )
    assert 'schedscope_ingest_bad_frames_total{kind="malformed"} 3.0' in text
    names = {
        metric.name
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert {
        "schedscope.kv_total_blocks",
        "schedscope.ingest.bad_frames",
        "sglang.gen_throughput",
    } <= names


def test_readme_metrics_reference_is_the_generated_table():
    assert metrics_reference_markdown() in README.read_text()


def test_importing_the_telemetry_layer_does_not_import_torch():
    code = (
        "import sys, schedscope.telemetry.pipeline, schedscope.telemetry.scripted;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
