"""Engine -> ZMQ -> sidecar over real sockets: round trips, bad frames, drops, restarts."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from schedscope.engine.emitter import Emitter, NullEmitter
from schedscope.telemetry import schema as s
from schedscope.telemetry.engines import Observation
from schedscope.telemetry.ingest import Ingest, Received
from schedscope.telemetry.sidecar import Sidecar


class Recorder:
    """A frame handler that keeps what it was given."""

    def __init__(self) -> None:
        self.frames: list[tuple[Received, Observation]] = []

    def handle(self, received: Received, observation: Observation) -> None:
        self.frames.append((received, observation))

    @property
    def events(self) -> list[s.Event]:
        return [e for r, _ in self.frames for e in r.frame.events]

    def of(self, cls: type) -> list:
        return [e for e in self.events if isinstance(e, cls)]

    @property
    def seqs(self) -> list[int]:
        return [r.frame.seq for r, _ in self.frames]


def make_sidecar(endpoint: str, **ingest_kw) -> tuple[Sidecar, Recorder]:
    rec = Recorder()
    return Sidecar(Ingest(endpoint, **ingest_kw), rec).start(), rec


def make_emitter(endpoint: str, **kw) -> Emitter:
    kw.setdefault("flush_interval_s", 3600.0)  # tests flush by hand
    return Emitter(s.EngineInfo(model="m"), endpoint, **kw)


def connected(em: Emitter, sc: Sidecar | None = None):
    def check() -> bool:
        if sc is not None:
            sc.process()
        return em.poll_connection()

    return check


@pytest.fixture
def sidecar(ipc_endpoint):
    sc, rec = make_sidecar(ipc_endpoint)
    yield sc, rec
    sc.close()


def test_every_event_type_round_trips(sidecar, ipc_endpoint, sample_events, wait_until):
    sc, rec = sidecar
    em = make_emitter(ipc_endpoint)
    assert wait_until(connected(em))
    for ev in sample_events:
        em.emit(ev)
    em.flush()
    assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.ProfileEnd)) == 1)
    got = [e for e in rec.events if e.ts >= sample_events[0].ts and e.ts < 10_000]
    assert got == sample_events
    hello = rec.of(s.EngineHello)[0]
    assert hello.info.model == "m" and hello.info.pid > 0
    _, obs = rec.frames[0]
    assert obs.new_engine and obs.record.saw_hello and obs.record.engine_id == em.engine_id
    em.close()


def test_events_round_trip_over_tcp(tcp_port, sample_events, wait_until):
    endpoint = f"tcp://127.0.0.1:{tcp_port}"
    sc, rec = make_sidecar(endpoint)
    em = make_emitter(endpoint)
    try:
        assert wait_until(connected(em))
        for ev in sample_events:
            em.emit(ev)
        em.flush()
        assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.ProfileEnd)) == 1)
        assert [e for e in rec.events if e.ts < 10_000] == sample_events
    finally:
        em.close()
        sc.close()


def test_shutdown_closes_cleanly(sidecar, ipc_endpoint, wait_until):
    sc, rec = sidecar
    em = make_emitter(ipc_endpoint)
    assert wait_until(connected(em))
    em.close("done")
    c = sc.ingest.counters
    assert wait_until(lambda: sc.process() >= 0 and c.peer_disconnects == 1)
    assert rec.of(s.Shutdown)[0].reason == "done"
    assert c.unexpected_disconnects == 0
    assert sc.registry.get(em.engine_id).shut_down


def raw_pusher(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def good(seq: int) -> bytes:
    return s.encode_envelope("raw", seq, [s.IdleBegin(seq)])


@pytest.mark.parametrize(
    ("payload", "counter"),
    [
        (b"\x93garbage", "malformed"),
        (good(0)[:-3], "malformed"),
        (msgspec.msgpack.encode([7, "raw", 0, []]), "schema_version"),
        (msgspec.msgpack.encode([s.SCHEMA_VERSION, "raw", 0, [[222, 1]]]), "unknown_event"),
    ],
    ids=["garbage", "truncated", "schema-version", "unknown-tag"],
)
def test_bad_frame_is_counted_and_next_good_one_processed(
    sidecar, ipc_endpoint, payload, counter, wait_until
):
    sc, rec = sidecar
    c = sc.ingest.counters
    push = raw_pusher(ipc_endpoint)
    try:
        push.send(payload)
        push.send(good(1))
        assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.IdleBegin)) == 1)
    finally:
        push.close()
    if counter == "unknown_event":
        assert (c.unknown_events, c.rejected_events, c.bad_frames_total) == (1, 1, 0)
    else:
        assert c.bad_frames[counter] == 1 and c.bad_frames_total == 1
    assert c.last_error


def test_multipart_message_is_malformed(sidecar, ipc_endpoint, wait_until):
    sc, rec = sidecar
    push = raw_pusher(ipc_endpoint)
    try:
        push.send_multipart([good(0), good(1)])
        push.send(good(2))
        assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.IdleBegin)) == 1)
    finally:
        push.close()
    assert sc.ingest.counters.bad_frames["malformed"] == 1


def test_oversized_frame_cuts_the_peer_and_is_counted(ipc_endpoint, wait_until):
    """libzmq refuses a frame over MAXMSGSIZE by dropping the connection. The sidecar counts
    the disconnect, and the seq gap once the emitter is back on a new connection."""
    sc, rec = make_sidecar(ipc_endpoint, max_message_bytes=4096)
    em = make_emitter(ipc_endpoint)  # its own guard is bigger than the sidecar's limit
    try:
        assert wait_until(connected(em, sc))
        em.emit(s.IdleBegin(1))
        em.flush()
        assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.IdleBegin)) == 1)
        em.emit(s.WeightsUpdateBegin(2, "x" * 10_000))
        em.flush()  # sent into the pipe: the sidecar's libzmq will cut the connection
        c = sc.ingest.counters
        assert wait_until(lambda: c.unexpected_disconnects == 1)
        # The emitter reconnects by itself; its next message gets through with a new hello.
        assert wait_until(lambda: em.poll_connection() and em.connects == 2)
        assert em.disconnects == 1
        em.emit(s.IdleEnd(3))
        em.flush()
        assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.IdleEnd)) == 1)
        assert not rec.of(s.WeightsUpdateBegin)
        assert sc.registry.lost_messages_total == 1  # exactly the oversized frame
        assert rec.frames[-1][1].gap == 1
        assert len(rec.of(s.EngineHello)) == 2  # the hello went out again on reconnect
    finally:
        em.close()
        sc.close()


def test_emitter_refuses_frames_over_its_own_limit(sidecar, ipc_endpoint, wait_until):
    sc, rec = sidecar
    em = make_emitter(ipc_endpoint, max_message_bytes=2048)
    assert wait_until(connected(em))
    em.flush()  # hello
    em.emit(s.WeightsUpdateBegin(2, "x" * 4096))
    em.flush()
    em.emit(s.IdleEnd(3))
    em.flush()
    assert (em.oversized_messages, em.dropped_messages) == (1, 1)
    assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.IdleEnd)) == 1)
    stats = rec.of(s.EmitterStats)[-1]
    assert (stats.dropped_messages, stats.oversized_messages) == (1, 1)
    assert sc.registry.lost_messages_total == 1
    assert sc.ingest.counters.peer_disconnects == 0
    em.close()


def test_emitter_without_sidecar_never_blocks_and_counts_drops(ipc_endpoint):
    em = make_emitter(ipc_endpoint)
    for i in range(200):
        em.emit(s.IdleBegin(i))
        em.flush()
    assert (em.sent_messages, em.dropped_messages, em.dropped_events) == (0, 200, 200)
    assert em.next_seq == 200  # dropped messages still consumed their seq
    em.close()  # also non-blocking with nobody listening


def test_null_emitter_is_inert():
    em = NullEmitter()
    em.emit(s.IdleBegin(0))
    em.end_step()
    em.flush()
    em.close()
    assert not em.enabled and em.sent_messages == 0


def test_late_sidecar_gets_hello_drop_counts_and_later_events(ipc_endpoint, wait_until):
    em = make_emitter(ipc_endpoint)
    for i in range(5):
        em.emit(s.ReqQueued(i, f"r{i}", 10))
        em.flush()
    assert em.dropped_messages == 5
    sc, rec = make_sidecar(ipc_endpoint)
    try:
        assert wait_until(connected(em))
        em.emit(s.ReqQueued(99, "late", 10))
        em.flush()
        assert wait_until(lambda: sc.process() >= 0 and len(rec.of(s.ReqQueued)) == 1)
        first = rec.frames[0][0].frame
        assert isinstance(first.events[0], s.EngineHello)
        stats = next(e for e in first.events if isinstance(e, s.EmitterStats))
        assert (stats.dropped_messages, stats.sent_messages) == (5, 0)
        record = sc.registry.get(em.engine_id)
        assert record.first_seq == 5 and record.lost_messages == 0
        assert record.engine_dropped_messages == 5
        assert rec.of(s.ReqQueued)[0].rid == "late"
    finally:
        em.close()
        sc.close()


def test_idle_engine_heartbeats_reach_a_late_sidecar(ipc_endpoint, wait_until):
    em = make_emitter(ipc_endpoint, flush_interval_s=0.0, heartbeat_interval_s=0.01)
    sc, rec = make_sidecar(ipc_endpoint)
    try:

        def heartbeat_seen() -> bool:
            em.end_step()  # what an idle engine's loop does now and then: no events
            sc.process()
            return bool(rec.of(s.Heartbeat))

        assert wait_until(heartbeat_seen)
        record = sc.registry.get(em.engine_id)
        assert record.info.model == "m" and record.anchor_wall_ns is not None
        # Wall time conversion goes through the anchor.
        hb = rec.of(s.Heartbeat)[-1]
        assert record.to_wall_ns(hb.ts + 1000) == hb.wall_ns + 1000
    finally:
        em.close()
        sc.close()


def test_restarting_the_sidecar_loses_only_counted_messages(ipc_endpoint, wait_until):
    em = make_emitter(ipc_endpoint)
    sc1, rec1 = make_sidecar(ipc_endpoint)
    seen: list[int] = []
    try:
        assert wait_until(connected(em))
        for i in range(20):
            em.emit(s.ReqQueued(i, f"a{i}", 1))
            em.flush()
        assert wait_until(lambda: sc1.process() >= 0 and len(rec1.of(s.ReqQueued)) == 20)
        seen += rec1.seqs
    finally:
        sc1.close()
    # The emitter notices the sidecar is gone; everything sent meanwhile is counted as dropped.
    assert wait_until(lambda: not em.poll_connection())
    for i in range(30):
        em.emit(s.ReqQueued(100 + i, f"b{i}", 1))
        em.flush()
    assert em.dropped_messages == 30
    sc2, rec2 = make_sidecar(ipc_endpoint)
    try:
        assert wait_until(connected(em))
        for i in range(10):
            em.emit(s.ReqQueued(200 + i, f"c{i}", 1))
            em.flush()
        assert wait_until(lambda: sc2.process() >= 0 and len(rec2.of(s.ReqQueued)) == 10)
        seen += rec2.seqs
        record = sc2.registry.get(em.engine_id)
        # Every seq the emitter used is either received by a sidecar or counted as dropped,
        # and the new sidecar learned the count from the emitter itself.
        assert len(seen) + record.engine_dropped_messages == em.next_seq
        assert len(set(seen)) == len(seen)
        assert record.lost_messages == 0 and record.saw_hello
    finally:
        em.close()
        sc2.close()


class DroppingSocket:
    """Wraps the emitter's socket to make chosen sends fail as if the queue were full."""

    def __init__(self, sock: zmq.Socket, drop: set[int]) -> None:
        self._sock, self._drop, self._n = sock, drop, 0

    def send(self, *args, **kw):
        n, self._n = self._n, self._n + 1
        if n in self._drop:
            raise zmq.Again()
        return self._sock.send(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_seq_gaps_match_messages_dropped_on_purpose(sidecar, ipc_endpoint, wait_until):
    sc, rec = sidecar
    em = make_emitter(ipc_endpoint)
    assert wait_until(connected(em))
    drop = {3, 4, 10, 20, 21, 22}
    em._sock = DroppingSocket(em._sock, drop)
    for i in range(30):
        em.emit(s.ReqQueued(i, f"r{i}", 1))
        em.flush()
    assert em.dropped_messages == len(drop)
    assert wait_until(lambda: sc.process() >= 0 and len(rec.seqs) == 30 - len(drop))
    assert sorted(set(range(30)) - set(rec.seqs)) == sorted(drop)
    assert sc.registry.lost_messages_total == len(drop)
    assert sum(obs.gap for _, obs in rec.frames) == len(drop)
    assert rec.of(s.EmitterStats)[-1].dropped_messages == len(drop)
    em.close()


def test_full_ingest_queue_drops_are_counted_and_show_as_gaps(ipc_endpoint, wait_until):
    sc, rec = make_sidecar(ipc_endpoint, queue_size=3)
    em = make_emitter(ipc_endpoint)
    try:
        assert wait_until(connected(em))
        for i in range(12):  # nobody processes meanwhile: the queue holds 3
            em.emit(s.IdleBegin(i))
            em.flush()
        c = sc.ingest.counters
        assert wait_until(lambda: c.frames_received == 12)
        assert c.queue_dropped_frames == 9
        sc.process()
        em.emit(s.IdleEnd(99))
        em.flush()
        assert wait_until(lambda: sc.process() >= 0 and rec.of(s.IdleEnd))
        assert sc.registry.lost_messages_total == 9
    finally:
        em.close()
        sc.close()


def test_engine_restart_with_same_id_is_recognised(sidecar, ipc_endpoint, wait_until):
    sc, rec = sidecar
    em1 = make_emitter(ipc_endpoint, engine_id="fixed")
    assert wait_until(connected(em1))
    for i in range(3):
        em1.emit(s.IdleBegin(i))
        em1.flush()
    em1.close()
    em2 = make_emitter(ipc_endpoint, engine_id="fixed")
    assert wait_until(connected(em2))
    em2.emit(s.IdleEnd(0))
    em2.flush()
    assert wait_until(lambda: sc.process() >= 0 and rec.of(s.IdleEnd))
    assert [obs.restarted for _, obs in rec.frames][-1]
    assert sc.registry.restarts_total == 1 and sc.registry.lost_messages_total == 0
    em2.close()


def test_handler_errors_are_counted_not_fatal(ipc_endpoint, wait_until):
    calls: list[int] = []

    def flaky(received: Received, observation: Observation) -> None:
        calls.append(received.frame.seq)
        if len(calls) == 1:
            raise RuntimeError("bug in a handler")

    sc = Sidecar(Ingest(ipc_endpoint), flaky).start()
    em = make_emitter(ipc_endpoint)
    try:
        assert wait_until(connected(em))
        for i in range(3):
            em.emit(s.IdleBegin(i))
            em.flush()
        assert wait_until(lambda: sc.process() >= 0 and len(calls) == 3)
        assert sc.stats.handler_errors == 1
        assert sc.summary().events_by_type["IdleBegin"] == 3
    finally:
        em.close()
        sc.close()


def test_second_sidecar_on_a_live_ipc_endpoint_is_refused(sidecar, ipc_endpoint):
    with pytest.raises(OSError, match="already in use"):
        Ingest(ipc_endpoint).start()


def test_ingest_queue_is_bounded_in_events_not_only_frames(ipc_endpoint: str) -> None:
    """Frames carry 1 to ~1,000 events: memory is bounded by the events waiting, and what
    does not fit is dropped and counted, frames and events."""
    ingest = Ingest(ipc_endpoint, queue_size=100, max_queued_events=10)  # not started
    four = [s.IdleBegin(ts=i) for i in range(4)]
    for seq in range(3):
        ingest.accept(s.encode_envelope("e", seq, four))
    c = ingest.counters
    assert ingest.queued_events == 8
    assert (c.queue_dropped_frames, c.queue_dropped_events) == (1, 4)
    assert ingest.get(timeout=0) is not None  # the consumer takes one: room again
    assert ingest.queued_events == 4
    ingest.accept(s.encode_envelope("e", 3, four))
    assert ingest.queued_events == 8 and c.queue_dropped_frames == 1
    assert len(ingest.drain()) == 2 and ingest.queued_events == 0
    # An empty queue takes any one frame, however many events (its bytes are capped).
    ingest.accept(s.encode_envelope("e", 4, four * 5))
    assert ingest.queued_events == 20
    with pytest.raises(ValueError, match="max_queued_events"):
        Ingest(ipc_endpoint, max_queued_events=0)
