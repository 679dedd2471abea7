"""Raw-event recordings: format, size cap, truncated tail; `schedscope record` end to end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedscope.telemetry.recording import (
    RecordingError,
    RecordingReader,
    RecordingWriter,
)


def test_round_trip_keeps_bytes_and_times(tmp_path: Path) -> None:
    path = tmp_path / "r.ssrec"
    frames = [(bytes([i]) * (i + 1), 1_000 + i) for i in range(50)]
    with RecordingWriter(path, meta={"endpoint": "ipc:///x"}) as w:
        for data, t in frames:
            assert w.write(data, t)
    r = RecordingReader(path)
    got = [(f.data, f.recv_wall_ns) for f in r]
    assert got == frames
    assert r.meta["endpoint"] == "ipc:///x"
    assert r.trailer == {
        "frames": 50,
        "bytes": w.bytes_written,
        "dropped_frames": 0,
        "dropped_bytes": 0,
    }
    assert not r.truncated_tail


def test_size_cap_counts_what_it_leaves_out(tmp_path: Path) -> None:
    path = tmp_path / "r.ssrec"
    with RecordingWriter(path, max_bytes=4096) as w:
        written = sum(w.write(b"x" * 100, i) for i in range(100))
    assert 0 < written < 100
    assert w.dropped_frames == 100 - written and w.dropped_bytes == 100 * w.dropped_frames
    assert path.stat().st_size <= 4096
    r = RecordingReader(path)
    assert sum(1 for _ in r) == written
    assert r.trailer["dropped_frames"] == w.dropped_frames


def test_truncated_tail_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "r.ssrec"
    with RecordingWriter(path) as w:
        for i in range(10):
            w.write(b"frame-%d" % i, i)
    data = path.read_bytes()
    for cut in (len(data) - 3, len(data) - 40, len(data) - 60):
        part = tmp_path / f"cut{cut}.ssrec"
        part.write_bytes(data[:cut])
        r = RecordingReader(part)
        frames = list(r)
        assert frames == [f for f in RecordingReader(path)][: len(frames)]
        assert r.truncated_tail or r.trailer is None


def test_not_a_recording(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"hello world, not a recording")
    with pytest.raises(RecordingError, match="not a schedscope recording"):
        RecordingReader(tmp_path / "x")


def test_record_command_captures_engine_frames(tmp_path: Path, ipc_endpoint: str) -> None:
    from schedscope.engine.emitter import Emitter
    from schedscope.telemetry.schema import EngineInfo, IdleBegin, decode_envelope

    out = tmp_path / "rec.ssrec"
    proc = subprocess.Popen(
        [sys.executable, "-m", "schedscope", "record", "--endpoint", ipc_endpoint,
         "--out", str(out), "--duration", "3"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)  # let it bind
    em = Emitter(EngineInfo(model="m"), ipc_endpoint, flush_interval_s=0)
    time.sleep(0.5)  # connect completes in the background; before that sends drop (counted)
    for _ in range(5):
        em.emit(IdleBegin(time.monotonic_ns()))
        em.flush()
        time.sleep(0.05)
    em.close()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    frames = [decode_envelope(f.data) for f in RecordingReader(out).raw_frames()]
    assert sum(isinstance(e, IdleBegin) for f in frames for e in f.events) == 5
    assert "lost messages 0" in err
