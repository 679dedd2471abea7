"""`schedscope sidecar` next to a stock engine: KV ingest in, KV relay out, files at the end."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from schedscope.cli.demo_report import prom_totals
from schedscope.exporters.kv_relay import KvRelay
from schedscope.telemetry.kv_sinks import KvBatch
from schedscope.telemetry.schema import BlockStored


def test_sidecar_ingests_a_stock_engines_kv_events_and_relays_them(
    tmp_path: Path, ipc_endpoint: str, tcp_port: int
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        relay_port = s.getsockname()[1]
    engine_port = tcp_port
    # A publisher speaking SGLang's wire format stands in for the engine.
    engine = KvRelay({"endpoint": f"tcp://127.0.0.1:{engine_port}"})
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "schedscope", "sidecar", "--no-summary",
            "--endpoint", ipc_endpoint, "--out-dir", str(tmp_path), "--prometheus-port", "0",
            "--kv-ingest-config", f'{{"endpoint": "tcp://*:{engine_port}"}}',
            "--kv-relay-endpoint", f"tcp://127.0.0.1:{relay_port}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.SUB)  # what a KV-aware router does
    router.setsockopt(zmq.SUBSCRIBE, b"")
    router.connect(f"tcp://127.0.0.1:{relay_port}")
    got: list = []
    try:
        deadline = time.monotonic() + 30
        h = 1
        while not got and time.monotonic() < deadline:
            events = [BlockStored([h], None if h == 1 else h - 1, [1, 2], 2)]
            engine.publish(KvBatch("engine", 0, time.time(), events))
            h += 1
            if router.poll(200):
                _topic, _seq, payload = router.recv_multipart()
                got.append(msgspec.msgpack.decode(payload))
        assert got, "nothing relayed"
        _ts, events, _dp_rank = got[0]
        assert events[0]["type"] == "BlockStored"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        engine.close()
        router.close(linger=0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "KV events from tcp://127.0.0.1:" in err and "Traceback" not in err
    assert prom_totals(tmp_path / "metrics.prom")["schedscope_kv_blocks_stored_total"] >= 1


def test_shutdown_backlog_past_the_deadline_is_counted_not_lost(
    tmp_path: Path, ipc_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood's backlog must not hold the sidecar's exit: what is not processed before the
    drain deadline is counted as dropped by the sidecar's queue."""
    from schedscope.cli import sidecar_app
    from schedscope.cli.common import load_settings
    from schedscope.telemetry.schema import IdleBegin, encode_envelope

    flags = {"endpoint": ipc_endpoint, "out_dir": str(tmp_path), "prometheus_port": 0}
    app = sidecar_app.build_sidecar_app(load_settings("sidecar", flags, None, environ={}))
    ingest = app.sidecar.ingest
    for seq in range(50):  # a backlog: accepted by ingest, not yet processed
        ingest.accept(encode_envelope("engine-x", seq, [IdleBegin(ts=seq)] * 3))
    monkeypatch.setattr(sidecar_app, "DRAIN_DEADLINE_S", 0.0)
    app.close()
    c = ingest.counters
    assert (c.queue_dropped_frames, c.queue_dropped_events) == (50, 150)
    assert ingest.queue.empty()
