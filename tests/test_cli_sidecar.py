"""`schedscope sidecar` next to a stock engine: KV ingest in, KV relay out, files at the end."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import zmq

from schedscope.demo_report import prom_totals
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
