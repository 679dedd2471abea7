"""Bad input (issue 10): property tests and a fuzz loop over raw-event frame decoding, the
sidecar's accept path, and KV-event ingest decoding. Nothing may crash; every bad frame is
counted; the next good frame is processed."""

from __future__ import annotations

import contextlib
import random
import time

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schedscope.exporters.kv_wire import UnknownKvEvent, decode_payload, event_from_wire
from schedscope.telemetry import schema as s
from schedscope.telemetry.ingest import Ingest
from schedscope.telemetry.pipeline import in_memory_pipeline
from schedscope.telemetry.sidecar import Sidecar

from .reliability_support import free_port, ipc_endpoint, prom, wait_for

FUZZ = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# Anything msgpack can carry, nested.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), children, max_size=5)
    ),
    max_leaves=20,
)


def good_frame(seq: int = 0, engine_id: str = "fuzz") -> bytes:
    return s.encode_envelope(
        engine_id,
        seq,
        [
            s.ReqQueued(1, "r1", 5),
            s.BatchLaunched(2, seq, s.MODE_DECODE, ["r1"], 1),
            s.BatchDone(3, seq, s.MODE_DECODE, None, s.DecodeStats(1, 6, 1, 10.0, 0.1, 0)),
        ],
    )


def decodes_or_frame_error(data: bytes) -> s.DecodedFrame | None:
    """The contract: a DecodedFrame or a FrameError with a known kind, never anything else."""
    try:
        frame = s.decode_envelope(data)
    except s.FrameError as exc:
        assert exc.kind in ("malformed", "schema_version", "oversized")
        return None
    assert isinstance(frame.engine_id, str) and frame.seq >= 0
    assert all(isinstance(e, s.Event) for e in frame.events)
    assert frame.rejected_events == len(frame.errors) >= frame.unknown_events
    return frame


# -- properties of decode_envelope -------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_decoding(data: bytes) -> None:
    decodes_or_frame_error(data)


@FUZZ
@given(msgpack_values)
def test_arbitrary_msgpack_never_crashes_decoding(value: object) -> None:
    decodes_or_frame_error(msgspec.msgpack.encode(value))


@FUZZ
@given(
    st.integers(-3, 3),
    st.text(max_size=10),
    st.integers(-(2**63), 2**63 - 1),
    st.lists(msgpack_values, max_size=5),
)
def test_envelope_shaped_garbage_is_decoded_or_refused(version, engine_id, seq, events) -> None:
    frame = decodes_or_frame_error(msgspec.msgpack.encode([version, engine_id, seq, events]))
    if frame is not None:
        # Every event is either decoded or counted as rejected.
        assert len(frame.events) + frame.rejected_events == len(events)


@FUZZ
@given(st.data())
def test_mutated_good_frames_never_crash(data: st.DataObject) -> None:
    frame = bytearray(good_frame(data.draw(st.integers(0, 1000))))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(frame)))
    decodes_or_frame_error(bytes(frame[:cut]))


def test_a_frame_with_one_bad_event_keeps_the_good_ones() -> None:
    good = msgspec.msgpack.decode(good_frame())
    good[3].insert(1, [999, 5, "unknown tag"])
    good[3].insert(2, [11, "not an int ts", "r1"])
    frame = s.decode_envelope(msgspec.msgpack.encode(good))
    assert len(frame.events) == 3
    assert frame.rejected_events == 2 and frame.unknown_events == 1


# -- 10k malformed frames through the real socket ---------------------------------------------


def bad_utf8_engine_id() -> bytes:
    frame = bytearray(s.encode_envelope("zz", 0, []))
    frame[frame.index(b"zz")] = 0x80  # a str that is not UTF-8
    return bytes(frame)


def test_invalid_utf8_is_a_counted_bad_frame_not_a_crash() -> None:
    # Regression: msgspec raises UnicodeDecodeError (not DecodeError) for such a str.
    ingest = Ingest("inproc://unused")
    assert ingest.accept(bad_utf8_engine_id()) is None
    assert ingest.counters.bad_frames["malformed"] == 1
    frame = bytearray(good_frame())
    frame[frame.index(b"r1")] = 0xFF  # inside one event: that event alone is rejected
    decoded = ingest.accept(bytes(frame))
    assert decoded is not None and decoded.rejected_events >= 1


def malformed_frames(n: int, rng: random.Random) -> list[bytes]:
    """Frames that are bad as a whole (each must land in a bad_frames counter)."""
    good = good_frame()
    makers = [
        lambda: good[: rng.randrange(1, len(good))],  # truncated msgpack
        lambda: b"\xc1" + rng.randbytes(rng.randrange(0, 40)),  # 0xc1: never valid msgpack
        lambda: msgspec.msgpack.encode([rng.choice([0, 2, 99, -1]), "e", 0, []]),  # version
        lambda: msgspec.msgpack.encode(rng.choice([{}, "x", 7, None, 1.5, b"b"])),  # not array
        lambda: msgspec.msgpack.encode([s.SCHEMA_VERSION, 42, "seq", []]),  # wrong types
        lambda: msgspec.msgpack.encode([s.SCHEMA_VERSION, "e", -5, []]),  # negative seq
        lambda: msgspec.msgpack.encode([]),  # empty envelope
        lambda: bad_utf8_engine_id(),  # once killed the receiving thread (UnicodeDecodeError)
    ]
    return [rng.choice(makers)() for _ in range(n)]


def test_10k_malformed_frames_over_a_real_socket_are_counted_and_the_next_good_one_lands() -> None:
    n = 10_000
    endpoint = ipc_endpoint("fuzz")
    tel = in_memory_pipeline()
    ingest = Ingest(endpoint, queue_size=n + 10, rcvhwm=n + 10)
    sidecar = Sidecar(ingest, tel.pipeline)
    tel.pipeline.watch_ingest(ingest.counters)
    sidecar.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, n + 10)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    try:
        for frame in malformed_frames(n, random.Random(1234)):
            push.send(frame)
        push.send(good_frame(seq=0, engine_id="after-garbage"))
        c = ingest.counters
        assert wait_for(lambda: c.frames_received == n + 1, timeout=30)
        assert c.bad_frames_total == n  # every one counted, by kind
        assert c.bad_frames["malformed"] > 0 and c.bad_frames["schema_version"] > 0
        wait_for(lambda: sidecar.process(timeout=0.05) or sidecar.stats.frames >= 1)
        assert sidecar.stats.frames == 1  # the good frame, processed
        asm = tel.pipeline.engines["after-garbage"]
        assert asm.m.events.value == 3
        # The counts are on /metrics too.
        from prometheus_client import generate_latest

        text = generate_latest(tel.registry).decode()
        assert prom("ingest_bad_frames") in text
    finally:
        push.close(0)
        ctx.term()
        sidecar.close()


def test_oversized_frames_are_refused_and_counted() -> None:
    ingest = Ingest("inproc://unused", max_message_bytes=4096)
    for _ in range(5):
        assert ingest.accept(b"\x94" + bytes(5000)) is None
    assert ingest.accept(good_frame()) is not None
    assert ingest.counters.bad_frames["oversized"] == 5
    assert ingest.queue.qsize() == 1


# -- KV ingest decoding ------------------------------------------------------------------------

KV_ERRORS = (msgspec.DecodeError, ValueError, TypeError, KeyError, UnknownKvEvent)


@FUZZ
@given(st.binary(max_size=200) | msgpack_values.map(msgspec.msgpack.encode))
def test_kv_payload_decoding_raises_only_known_errors(payload: bytes) -> None:
    try:
        ts, events, dp = decode_payload(payload)
    except KV_ERRORS:
        return
    assert isinstance(ts, float) and isinstance(events, list)
    assert dp is None or isinstance(dp, int)


finite_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)

kv_event_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"])},
    optional={
        "block_hashes": finite_values,
        "parent_block_hash": finite_values,
        "token_ids": finite_values,
        "block_size": finite_values,
        "medium": finite_values,
        "lora_id": finite_values,
    },
)


@FUZZ
@given(kv_event_like | finite_values)
def test_kv_event_decoding_raises_only_known_errors(raw: object) -> None:
    with contextlib.suppress(ValueError, TypeError, KeyError, UnknownKvEvent):
        event_from_wire(raw)


@pytest.mark.parametrize("field", ["block_hashes", "token_ids"])
def test_kv_event_with_an_infinite_number_is_a_known_error(field: str) -> None:
    raw = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
           "token_ids": [1], "block_size": 1}  # fmt: skip
    raw[field] = [float("inf")]
    with pytest.raises((ValueError, TypeError, KeyError)):
        event_from_wire(raw)


def _kv_ingest_survives(payloads: list[bytes]) -> tuple[list, bool]:
    """Publish ``payloads`` then a good batch to a real KvIngest; return what it delivered
    and whether its thread is alive."""
    from schedscope.exporters.kv_ingest import KvIngest
    from schedscope.exporters.stats import ExportStats

    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    got: list = []
    ing = KvIngest(f"tcp://127.0.0.1:{port}", on_batch=got.append, stats=ExportStats())
    ing.start()
    try:
        good = msgspec.msgpack.encode([time.time(), [{"type": "AllBlocksCleared"}], 0])
        # PUB/SUB joins late: send probes until the subscriber is there.
        assert wait_for(
            lambda: pub.send_multipart([b"", (0).to_bytes(8, "big"), good]) or got, timeout=10
        )
        seq = 1
        for p in payloads:
            pub.send_multipart([b"", seq.to_bytes(8, "big"), p])
            seq += 1
        pub.send_multipart([b"", (0).to_bytes(8, "big")])  # 2 frames: malformed
        pub.send_multipart([b"", seq.to_bytes(8, "big"), good])
        wait_for(lambda: any(b.seq == seq for b in got), timeout=3)
        return [b for b in got if b.seq == seq], ing._thread is not None and ing._thread.is_alive()
    finally:
        ing.close()
        pub.close(0)
        ctx.term()


def test_kv_ingest_survives_malformed_payloads_and_takes_the_next_good_batch() -> None:
    rng = random.Random(7)
    bad = [rng.randbytes(rng.randrange(0, 50)) for _ in range(200)]
    bad += [msgspec.msgpack.encode(v) for v in ([], [1], {"a": 1}, "x", [1.0, 5, 0])]
    bad += [msgspec.msgpack.encode([1.0, [{"type": "BlockStored"}, {"type": "Nope"}, 5], "dp"])]
    after, alive = _kv_ingest_survives(bad)
    assert alive and len(after) == 1


def test_kv_ingest_survives_a_non_finite_timestamp() -> None:
    bad = [msgspec.msgpack.encode([float("nan"), [], 0])]
    after, alive = _kv_ingest_survives(bad)
    assert alive and len(after) == 1
