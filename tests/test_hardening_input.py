"""Issue 18, the sidecar's input side: one frame (nested, out of range, forged seq) never kills
a receiving thread, poisons a count or mutes an engine; everything refused is counted."""

from __future__ import annotations

import time

import msgspec
import zmq

from schedscope.telemetry import schema as s
from schedscope.telemetry.engines import EngineRegistry
from schedscope.telemetry.ingest import Ingest

from .reliability_support import ipc_endpoint, wait_for
from .test_fuzz_frames import _kv_ingest_survives, good_frame

# ~1 KB: an envelope whose event list holds arrays nested 1,000 deep.
NESTED_FRAME = b"\x94\x01\xa1e\x00" + b"\x91" * 1000 + b"\xc0"


def _send_all(endpoint: str, frames: list[bytes]) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(endpoint)
    for f in frames:
        push.send(f)
    push.close()
    ctx.term()


def test_nested_frame_is_counted_and_the_thread_takes_the_next_good_frame() -> None:
    with Ingest(ipc_endpoint("nested")) as ingest:
        _send_all(ingest.bound_endpoint or "", [NESTED_FRAME, good_frame(seq=0)])
        c = ingest.counters
        assert wait_for(lambda: c.frames_received == 2, timeout=10)
        assert c.bad_frames["too_deep"] == 1
        assert ingest.alive and not c.thread_dead
        got = ingest.get(timeout=1)
        assert got is not None and got.frame.engine_id == "fuzz"


class _BuggyIngest(Ingest):
    """An ingest whose processing of one frame raises an unexpected exception."""

    def accept(self, data: bytes | memoryview) -> s.DecodedFrame | None:
        if bytes(data) == b"boom":
            raise KeyError("a bug")
        return super().accept(data)


def test_any_exception_on_one_frame_is_counted_and_the_thread_goes_on() -> None:
    with _BuggyIngest(ipc_endpoint("buggy")) as ingest:
        _send_all(ingest.bound_endpoint or "", [b"boom", b"boom", good_frame(seq=0)])
        c = ingest.counters
        assert wait_for(lambda: ingest.queue.qsize() == 1, timeout=10)
        assert c.bad_frames["internal_error"] == 2
        assert ingest.alive


def test_kv_ingest_survives_a_nested_payload() -> None:
    nested = msgspec.msgpack.encode([time.time(), [], 0])[:-1] + b"\x91" * 1000 + b"\xc0"
    after, alive = _kv_ingest_survives([nested, b"\x93" + b"\x91" * 2000])
    assert alive and len(after) == 1


def test_seq_outside_int64_is_refused_and_counted() -> None:
    ingest = Ingest("inproc://unused")
    assert ingest.accept(good_frame(seq=2**64 - 1)) is None
    assert ingest.counters.bad_frames["out_of_range"] == 1
    assert ingest.accept(good_frame(seq=1)) is not None


def test_event_with_int_outside_int64_or_non_finite_float_is_rejected_alone() -> None:
    events = [
        s.ReqQueued(2**64 - 1, "r-bad-ts", 5),
        s.BatchDone(3, 1, s.MODE_DECODE, None, s.DecodeStats(1, 6, 1, float("nan"), 0.1, 0)),
        s.BatchDone(3, 1, s.MODE_DECODE, None, s.DecodeStats(1, 6, 1, 10.0, float("inf"), 0)),
        s.ReqQueued(7, "r-good", 5),
    ]
    frame = s.decode_envelope(s.encode_envelope("e", 1, events))
    assert [type(e).__name__ for e in frame.events] == ["ReqQueued"]
    assert frame.events[0].ts == 7
    assert frame.rejected_events == 3


def test_emitter_stats_outside_int64_never_reach_the_registry() -> None:
    ingest = Ingest("inproc://unused")
    bad = s.EmitterStats(1, 2**64 - 1, 2**64 - 1, sent_messages=2**64 - 1)
    frame = ingest.accept(s.encode_envelope("e", 0, [bad]))
    assert frame is not None and frame.events == [] and ingest.counters.rejected_events == 1


def _frame(engine_id: str, seq: int) -> s.DecodedFrame:
    return s.decode_envelope(good_frame(seq=seq, engine_id=engine_id))


def test_one_frame_with_a_huge_seq_does_not_mute_the_engine() -> None:
    reg = EngineRegistry()
    for seq in range(3):
        assert not reg.observe(_frame("e", seq)).duplicate
    forged = reg.observe(_frame("e", 2**62))
    assert forged.duplicate and forged.implausible
    for seq in range(3, 6):  # the engine's real frames go on being taken
        obs = reg.observe(_frame("e", seq))
        assert not obs.duplicate and obs.gap == 0
    rec = reg.get("e")
    assert rec is not None and rec.lost_messages == 0 and rec.implausible_seq == 1
    assert reg.implausible_seq_total == 1


def test_a_forged_first_frame_does_not_mute_the_engine() -> None:
    reg = EngineRegistry()
    reg.observe(_frame("e", 2**62))
    obs = reg.observe(_frame("e", 5))
    assert not obs.duplicate and obs.gap == 0
    assert not reg.observe(_frame("e", 6)).duplicate
    assert reg.implausible_seq_total == 1


def test_a_real_big_jump_confirmed_by_the_next_frame_is_a_gap() -> None:
    reg = EngineRegistry(max_seq_jump=100)
    reg.observe(_frame("e", 0))
    assert reg.observe(_frame("e", 1000)).implausible
    obs = reg.observe(_frame("e", 1001))
    assert not obs.duplicate and obs.gap == 1000


def test_evicted_engines_and_implausible_seqs_are_on_metrics() -> None:
    from prometheus_client import generate_latest

    from schedscope.telemetry.pipeline import in_memory_pipeline
    from schedscope.telemetry.sidecar import Sidecar

    tel = in_memory_pipeline()
    ingest = Ingest("inproc://unused")
    sidecar = Sidecar(ingest, tel.pipeline, registry=EngineRegistry(max_engines=2))
    tel.pipeline.watch_ingest(ingest.counters)
    for name in ("a", "b", "c", "d"):
        ingest.accept(good_frame(seq=0, engine_id=name))
    ingest.accept(good_frame(seq=2**62, engine_id="d"))
    while (got := ingest.get(timeout=0)) is not None:
        sidecar.process_one(got)
    text = generate_latest(tel.registry).decode()
    assert "schedscope_engines_evicted_total 2.0" in text
    assert "schedscope_implausible_seq_total 1.0" in text
    assert "schedscope_ingest_thread_dead 0.0" in text


def test_metrics_server_bounds_idle_connections_and_times_them_out() -> None:
    import socket
    import threading
    import urllib.request

    from prometheus_client import CollectorRegistry

    from schedscope.exporters.prometheus import serve_metrics

    before = threading.active_count()
    srv = serve_metrics(CollectorRegistry(), port=0, read_timeout_s=1.0, max_connections=4)
    idle = []
    try:
        for _ in range(40):  # idle: connect, never send a request
            idle.append(socket.create_connection(("127.0.0.1", srv.port)))
        assert threading.active_count() <= before + 1 + 4  # serve thread + the bound
        # Every idle connection ends: past the bound closed by the server at once, within
        # it by the read timeout (recv sees EOF either way); none holds a thread forever.
        for sock in idle:
            sock.settimeout(60)
            assert sock.recv(1) == b""
        assert srv._server.refused_connections >= 1

        def scrape_ok() -> bool:
            try:
                with urllib.request.urlopen(srv.url, timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        assert wait_for(scrape_ok, timeout=30)
    finally:
        for sock in idle:
            sock.close()
        srv.close()


# -- damaged recordings -------------------------------------------------------------------------


def _recording(path, n: int = 20) -> bytes:
    from schedscope.telemetry.recording import RecordingWriter

    now = time.time_ns()
    with RecordingWriter(path) as w:
        for i in range(n):
            w.write(good_frame(seq=i, engine_id="rec"), now + i * 1_000_000)
    return path.read_bytes()


def _replay(path, *extra: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "schedscope", "replay", str(path), "--out-dir",
         str(path.parent / "out"), *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _flip_record_kind(data: bytes, index: int, kind: int) -> bytes:
    """Set the kind byte of record ``index`` (walking the real record headers)."""
    from schedscope.telemetry import recording as rec

    _, _, meta_len = rec._HEADER.unpack(data[: rec._HEADER.size])
    off = rec._HEADER.size + meta_len
    for _ in range(index):
        _, length, _ = rec._RECORD.unpack(data[off : off + rec._RECORD.size])
        off += rec._RECORD.size + length
    return data[:off] + bytes([kind]) + data[off + 1 :]


def test_an_end_marker_in_the_middle_is_reported_as_damage(tmp_path) -> None:
    from schedscope.telemetry.recording import KIND_END, RecordingReader

    path = tmp_path / "r.ssrec"
    data = _recording(path)
    path.write_bytes(_flip_record_kind(data, 3, KIND_END))
    reader = RecordingReader(path)
    assert len(list(reader.raw_frames())) == 3
    assert any("more bytes follow" in d for d in reader.damage)
    done = _replay(path)
    assert done.returncode != 0
    assert "damaged recording" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_an_intact_recording_replays_with_success(tmp_path) -> None:
    path = tmp_path / "r.ssrec"
    _recording(path)
    done = _replay(path)
    assert done.returncode == 0, done.stderr
    from schedscope.telemetry.recording import RecordingReader

    assert RecordingReader(path).damage == []


def test_crafted_header_trailer_and_far_future_times_are_one_line_errors(tmp_path) -> None:
    import json

    from schedscope.telemetry import recording as rec

    path = tmp_path / "r.ssrec"
    meta = b"[1, 2]"
    head = rec._HEADER.pack(rec.MAGIC, rec.VERSION, len(meta)) + meta
    path.write_bytes(head)
    done = _replay(path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "corrupt header" in done.stderr + done.stdout
    # A trailer that is not an object, and a far-future receive time.
    meta = json.dumps({}).encode()
    body = rec._HEADER.pack(rec.MAGIC, rec.VERSION, len(meta)) + meta
    frame = good_frame(seq=0, engine_id="rec")
    body += rec._RECORD.pack(rec.KIND_RAW_EVENTS, len(frame), 2**64 - 1) + frame
    body += rec._RECORD.pack(rec.KIND_END, 2, 1) + b"[]"
    path.write_bytes(body)
    reader = rec.RecordingReader(path)
    assert list(reader) == [] and len(reader.damage) == 2
    done = _replay(path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "damaged recording" in done.stderr + done.stdout


def test_a_tiny_speed_is_a_one_line_error(tmp_path) -> None:
    path = tmp_path / "r.ssrec"
    _recording(path)
    done = _replay(path, "--realtime", "--speed", "1e-300")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "use a higher --speed" in done.stderr + done.stdout
