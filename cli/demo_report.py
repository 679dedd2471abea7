"""Read what a sidecar wrote into its output folder and turn it into the demo's summary.

Every number of the summary comes from the files (or the sidecar's own final counts in
sidecar.json), never recomputed from what the demo thinks it did — so the summary is a check
that the telemetry saw the run, and tests can compare the two.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from schedscope.cli.sidecar_app import (
    METRICS_FILE,
    PERFETTO_FILE,
    RECORDING_FILE,
    SNAPSHOT_FILE,
    STATE_FILE,
    TRACES_FILE,
)

SUMMARY_FILE = "summary.json"


def span_names(traces_path: Path) -> Counter[str]:
    """Span name -> count, from OTLP JSON lines (one ExportTraceServiceRequest per line)."""
    names: Counter[str] = Counter()
    with open(traces_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            for rs in json.loads(line).get("resourceSpans", []):
                for ss in rs.get("scopeSpans", []):
                    for span in ss.get("spans", []):
                        names[span["name"]] += 1
    return names


def perfetto_slices(perfetto_path: Path) -> Counter[str]:
    """Slice name -> count of complete/begin slices in a Chrome trace-event JSON file."""
    data = json.loads(perfetto_path.read_text(encoding="utf-8"))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return Counter(e.get("name", "") for e in events if e.get("ph") in ("X", "B", "b"))


def prom_totals(snapshot_path: Path) -> dict[str, float]:
    """Sample name -> value summed over label sets (histogram buckets left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    text = snapshot_path.read_text(encoding="utf-8")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def otlp_metric_names(metrics_path: Path) -> set[str]:
    names: set[str] = set()
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            for rm in json.loads(line).get("resourceMetrics", []):
                for sm in rm.get("scopeMetrics", []):
                    names.update(m["name"] for m in sm.get("metrics", []))
    return names


def build_summary(out_dir: Path, workload: dict[str, Any]) -> dict[str, Any]:
    """The demo's summary, from the files in ``out_dir`` plus the workload's own timings."""
    state = json.loads((out_dir / STATE_FILE).read_text(encoding="utf-8"))
    # A file turned off (--no-otlp-json, --no-perfetto, --no-snapshot) leaves its numbers None.
    traces, timeline, snapshot = (out_dir / f for f in (TRACES_FILE, PERFETTO_FILE, SNAPSHOT_FILE))
    spans = span_names(traces) if traces.exists() else None
    slices = perfetto_slices(timeline) if timeline.exists() else None
    prom = prom_totals(snapshot) if snapshot.exists() else None

    def p(name: str) -> int | None:
        return None if prom is None else int(prom.get(name, 0))

    def sp(match) -> int | None:
        return None if spans is None else sum(n for name, n in spans.items() if match(name))

    def add(*values: int | None) -> int | None:
        return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]

    gen_tokens = p("sglang:generation_tokens_total")
    seconds = float(workload.get("workload_seconds") or 0.0)
    exporters = state.get("exporters", {})
    export_lost = sum(n for k, n in exporters.items() if k.endswith(("/dropped", "/failed")))
    recording = state.get("recording", {})
    return {
        "requests_finished": p("sglang:num_requests_total"),
        "requests_retracted": p("sglang:num_retracted_requests_total"),
        "requests_aborted": p("sglang:num_aborted_requests_total"),
        "prompt_tokens": p("sglang:prompt_tokens_total"),
        "generation_tokens": gen_tokens,
        "tokens_per_s": round(gen_tokens / seconds, 1) if gen_tokens and seconds > 0 else None,
        "batches": sp(lambda name: name.startswith("batch ")),
        "forward_iterations": p("schedscope_forward_iterations_total"),
        "request_spans": sp(lambda name: name.startswith("text_completion")),
        "pause_spans": sp(lambda name: name == "pause"),
        "idle_spans": sp(lambda name: name == "idle"),
        "perfetto_pause_slices": None if slices is None else slices.get("pause", 0),
        "perfetto_idle_slices": None if slices is None else slices.get("idle", 0),
        "cache_flush_spans": sp(lambda name: name == "cache_flush"),
        "kv_events": add(
            p("schedscope_kv_blocks_stored_total"),
            p("schedscope_kv_blocks_removed_total"),
            p("schedscope_kv_cache_cleared_total"),
        ),
        "kv_batches": p("schedscope_kv_batches_total"),
        "raw_events": state["events"],
        "lost_messages": state["lost_messages"],
        "engine_dropped_messages": state["engine_dropped_messages"],
        "sidecar_dropped_frames": state["queue_dropped_frames"],
        "bad_frames": state["bad_frames"],
        "exporter_dropped_or_failed": export_lost,
        "recording_dropped_frames": recording.get("dropped_frames", 0),
        "forward_iter_anomalies": p("schedscope_forward_iter_anomalies_total"),
        "workload": workload,
        "files": {
            "perfetto": str(out_dir / PERFETTO_FILE),
            "otlp_traces": str(out_dir / TRACES_FILE),
            "otlp_metrics": str(out_dir / METRICS_FILE),
            "metrics_snapshot": str(out_dir / SNAPSHOT_FILE),
            "recording": str(out_dir / RECORDING_FILE),
            "sidecar_state": str(out_dir / STATE_FILE),
            "summary": str(out_dir / SUMMARY_FILE),
        },
    }
