"""`schedscope demo` end to end (short mode), and record -> replay giving the live results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from schedscope.cli.demo_report import (
    otlp_metric_names,
    perfetto_slices,
    prom_totals,
    span_names,
)
from schedscope.telemetry.recording import RecordingReader
from schedscope.telemetry.schema import decode_envelope

from .reliability_support import OtlpHttpReceiver

SHORT = ["--requests", "9", "--concurrency", "3", "--max-new-tokens", "10"]


def _schedscope(*args: str, timeout: float = 90, env: dict | None = None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "schedscope", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def otlp_receiver():
    receiver = OtlpHttpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, otlp_receiver: OtlpHttpReceiver):
    """One short demo for the module, exporting to a live OTLP receiver as well. Run from a
    fresh folder without --out-dir, as the README's first command does."""
    cwd = tmp_path_factory.mktemp("demo")
    out = cwd / "schedscope-out"
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    proc = _schedscope("demo", *SHORT, "--device", "cpu", env=env, cwd=cwd)
    return out, proc


def test_demo_writes_every_file_and_the_summary_matches_them(demo_run) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "/metrics while it runs: http://127.0.0.1:" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for path in summary["files"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, path

    # Every file parses, and the summary's numbers are the files' numbers.
    spans = span_names(out / "traces.jsonl")
    slices = perfetto_slices(out / "timeline.perfetto.json")
    prom = prom_totals(out / "metrics.prom")
    otlp_names = otlp_metric_names(out / "metrics.jsonl")
    assert any("gen_throughput" in name for name in otlp_names)
    # histograms reach the sidecar's OTLP file too (built from the store at each export)
    assert "gen_ai.server.time_to_first_token" in otlp_names
    state = json.loads((out / "sidecar.json").read_text())
    assert summary["pause_spans"] == spans["pause"] == slices["pause"] == 1
    assert summary["idle_spans"] == spans["idle"] == slices["idle"] >= 1
    assert summary["requests_finished"] == prom["sglang:num_requests_total"] == 9
    assert summary["generation_tokens"] == prom["sglang:generation_tokens_total"] == 90
    assert summary["batches"] == sum(n for k, n in spans.items() if k.startswith("batch "))
    assert summary["batches"] == prom["schedscope_forward_iterations_total"]
    assert summary["request_spans"] == 9
    assert summary["requests_retracted"] >= 1  # the pause retracted running requests
    assert summary["kv_events"] > 0
    assert summary["raw_events"] == state["events"]
    assert summary["lost_messages"] == state["lost_messages"] == 0
    assert summary["sidecar_dropped_frames"] == 0
    # What the client saw agrees with what the telemetry counted.
    assert summary["workload"]["requests_completed_by_client"] == 9
    assert summary["workload"]["output_tokens_by_client"] == 90
    # The recording holds the stream: hello first, shutdown last.
    frames = [decode_envelope(f.data) for f in RecordingReader(out / "events.ssrec").raw_frames()]
    names = [type(e).__name__ for f in frames for e in f.events]
    assert names[0] == "EngineHello" and names[-1] == "Shutdown"
    assert names.count("Paused") == 1 and names.count("IdleBegin") >= 1


def test_demo_also_exports_to_the_otlp_endpoint(demo_run, otlp_receiver) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert otlp_receiver.span_names == span_names(out / "traces.jsonl")  # the same spans, twice
    assert otlp_receiver.span_names["pause"] == 1 and otlp_receiver.span_names["idle"] >= 1
    assert otlp_receiver.metric_requests >= 1


def test_record_then_replay_gives_the_live_spans_and_metrics(demo_run, tmp_path: Path) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = tmp_path / "replay"
    r = _schedscope("replay", str(out / "events.ssrec"), "--out-dir", str(again))
    assert r.returncode == 0, r.stderr
    assert span_names(again / "traces.jsonl") == span_names(out / "traces.jsonl")
    assert perfetto_slices(again / "timeline.perfetto.json") == perfetto_slices(
        out / "timeline.perfetto.json"
    )
    live, replayed = prom_totals(out / "metrics.prom"), prom_totals(again / "metrics.prom")
    # Everything the telemetry computed is identical. Two things depend on wall-clock timing,
    # not on the events: the exporters' own line counts (periodic OTLP file writes) and how KV
    # events were grouped into batches by the time window (the events themselves must match).
    timing = ("schedscope_export_", "schedscope_kv_batches_total")
    differ = {
        k
        for k in live.keys() | replayed.keys()
        if live.get(k) != replayed.get(k) and not k.startswith(timing)
    }
    assert not differ, {k: (live.get(k), replayed.get(k)) for k in differ}


def test_demo_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _schedscope("demo", "--prometheus-port", str(port), "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --prometheus-port"), r.stderr
    assert "already in use" in lines[0]


def test_demo_unwritable_out_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _schedscope("demo", "--out-dir", str(blocker / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid out dir" in lines[0] and "not a directory" in lines[0]
