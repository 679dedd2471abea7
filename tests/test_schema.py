"""The raw event schema: round trips, rejection of bad frames, additive evolution."""

from __future__ import annotations

import msgspec
import pytest

from schedscope.telemetry import schema as s


def test_every_event_type_has_a_unique_tag_and_a_sample(sample_events):
    tags = [cls.__struct_config__.tag for cls in s.EVENT_TYPES]
    assert len(tags) == len(set(tags))
    assert {type(e) for e in sample_events} == set(s.EVENT_TYPES)


def test_envelope_round_trips_every_event(sample_events):
    frame = s.encode_envelope("eng-1", 7, sample_events)
    decoded = s.decode_envelope(frame)
    assert (decoded.engine_id, decoded.seq) == ("eng-1", 7)
    assert decoded.events == sample_events
    assert decoded.rejected_events == 0


def test_wire_shape_is_the_documented_envelope(sample_events):
    raw = msgspec.msgpack.decode(s.encode_envelope("e", 3, sample_events[:1]))
    assert raw[:3] == [s.SCHEMA_VERSION, "e", 3]
    assert raw[3][0][0] == 1  # events are arrays with the integer tag first


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"not msgpack at all", msgspec.msgpack.encode({"a": 1})],
    ids=["empty", "invalid-byte", "text", "map"],
)
def test_garbage_is_malformed(data):
    with pytest.raises(s.FrameError) as exc:
        s.decode_envelope(data)
    assert exc.value.kind == "malformed"


def test_truncated_frame_is_malformed(sample_events):
    frame = s.encode_envelope("e", 0, sample_events)
    for cut in (1, len(frame) // 2, len(frame) - 1):
        with pytest.raises(s.FrameError) as exc:
            s.decode_envelope(frame[:cut])
        assert exc.value.kind == "malformed"


def test_negative_seq_is_malformed():
    with pytest.raises(s.FrameError) as exc:
        s.decode_envelope(msgspec.msgpack.encode([s.SCHEMA_VERSION, "e", -1, []]))
    assert exc.value.kind == "malformed"


@pytest.mark.parametrize(
    "envelope",
    [[2, "e", 0, []], [0, "e", 0, []], [99, {"future": "shape"}]],
    ids=["newer", "older", "other-shape"],
)
def test_wrong_schema_version_is_named_as_such(envelope):
    with pytest.raises(s.FrameError) as exc:
        s.decode_envelope(msgspec.msgpack.encode(envelope))
    assert exc.value.kind == "schema_version"
    assert "schema version" in str(exc.value)


def test_unknown_event_tag_is_rejected_alone():
    good = s.ReqQueued(5, "r", 3)
    frame = msgspec.msgpack.encode([s.SCHEMA_VERSION, "e", 4, [[250, 1, "x"], good]])
    decoded = s.decode_envelope(frame)
    assert decoded.events == [good]
    assert (decoded.rejected_events, decoded.unknown_events) == (1, 1)
    assert "unknown event tag 250" in decoded.errors[0]


def test_invalid_event_is_rejected_alone():
    good = s.IdleBegin(9)
    bad_queued = [10, 1, "rid"]  # ReqQueued without prompt_tokens
    frame = msgspec.msgpack.encode([s.SCHEMA_VERSION, "e", 0, [bad_queued, good]])
    decoded = s.decode_envelope(frame)
    assert decoded.events == [good]
    assert (decoded.rejected_events, decoded.unknown_events) == (1, 0)


def test_additive_fields_decode_both_ways():
    # A newer engine appends optional fields: this sidecar ignores what it does not know.
    newer = msgspec.msgpack.encode([s.SCHEMA_VERSION, "e", 0, [[10, 1, "r", 3, 0, None, None, 7]]])
    assert s.decode_envelope(newer).events == [s.ReqQueued(1, "r", 3)]
    # An older engine omits fields added later: they take their defaults.
    older = msgspec.msgpack.encode([s.SCHEMA_VERSION, "e", 0, [[3, 1, 2, 5]]])
    assert s.decode_envelope(older).events == [s.EmitterStats(1, 2, 5, 0, 0)]


def test_resolve_endpoint(monkeypatch):
    monkeypatch.delenv(s.ENV_ENDPOINT, raising=False)
    assert s.resolve_endpoint() == s.DEFAULT_ENDPOINT
    monkeypatch.setenv(s.ENV_ENDPOINT, "tcp://127.0.0.1:5999")
    assert s.resolve_endpoint() == "tcp://127.0.0.1:5999"
    assert s.resolve_endpoint("ipc:///tmp/a.sock") == "ipc:///tmp/a.sock"
    for bad in ("localhost:5557", "tcp://", "http://x"):
        with pytest.raises(ValueError, match="invalid endpoint"):
            s.resolve_endpoint(bad)
