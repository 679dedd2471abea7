"""KV-event relay and ingest against the SGLang/vLLM wire format (DESIGN §6).

The subscriber and publisher in this file are written from the wire-format facts with raw zmq and
an untyped msgpack decode/encode — not with the exporters' own encoder or decoder.
"""

from __future__ import annotations

import threading
import time

import msgspec
import zmq

from schedscope.exporters.kv_ingest import IngestedKvBatch, KvIngest
from schedscope.exporters.kv_relay import KvRelay
from schedscope.exporters.kv_wire import KvEventsConfig, offset_endpoint
from schedscope.exporters.stats import ExportStats
from schedscope.telemetry.kv_sinks import KvBatch, ListKvSink
from schedscope.telemetry.schema import AllBlocksCleared, BlockRemoved, BlockStored

END = (-1).to_bytes(8, "big", signed=True)
NEG = -(2**62) - 12345  # a negative int64 hash (SGLang)
BIG = 2**64 - 5  # an unsigned hash above 2^63 (vLLM); as int64 it is -5


def batch(i: int, dp_rank: int | None = 0) -> KvBatch:
    return KvBatch(
        engine_id="e0",
        dp_rank=dp_rank,
        ts=1_700_000_000.0 + i,
        events=[
            BlockStored(
                [NEG + i, i],
                parent_block_hash=None if i == 0 else NEG,
                token_ids=[1, 2, 3, 4],
                block_size=4,
                medium="GPU",
                lora_id=None,
            ),
            BlockRemoved([-5]),
            AllBlocksCleared(),
        ],
        first_forward_iter=i,
        last_forward_iter=i,
    )


def recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "nothing received"
    return sock.recv_multipart()


def subscriber(ctx: zmq.Context, endpoint: str, topic: bytes = b"") -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    return sub


def until_first(relay: KvRelay, sub: zmq.Socket) -> int:
    """PUB drops until the subscription has propagated: send probes until one arrives."""
    for i in range(500):
        relay.publish(batch(i))
        if sub.poll(20):
            frames = sub.recv_multipart()
            return int.from_bytes(frames[1], "big")
    raise AssertionError("subscriber never connected")


def test_relay_speaks_the_sglang_wire_format_and_replays_to_a_late_subscriber() -> None:
    ctx = zmq.Context()
    stats = ExportStats()
    relay = KvRelay(
        '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:0", "replay_endpoint": "tcp://127.0.0.1:0",'
        ' "buffer_steps": 1000, "hwm": 1000, "max_queue_size": 1000, "topic": "kv", "extra": 1}',
        stats=stats,
        context=ctx,
    )
    pub_ep, replay_ep = relay.endpoints(0)
    sub = subscriber(ctx, pub_ep, b"kv")
    try:
        first = until_first(relay, sub)
        # drain probes still in flight
        while sub.poll(50):
            first = int.from_bytes(sub.recv_multipart()[1], "big")
        for i in range(10):
            relay.publish(batch(100 + i))
        for i in range(10):
            topic, seq, payload = recv(sub)
            assert topic == b"kv"
            assert len(seq) == 8 and int.from_bytes(seq, "big") == first + 1 + i
            ts, events, dp_rank = msgspec.msgpack.decode(payload)  # untyped: plain msgpack
            assert ts == 1_700_000_100.0 + i and dp_rank == 0
            stored, removed, cleared = events
            assert next(iter(stored)) == "type" and stored["type"] == "BlockStored"
            assert stored["block_hashes"] == [NEG + 100 + i, 100 + i]
            assert stored["parent_block_hash"] == NEG
            assert stored["token_ids"] == [1, 2, 3, 4] and stored["block_size"] == 4
            assert "lora_id" in stored and stored["lora_id"] is None  # no default: always sent
            assert stored["medium"] == "GPU"
            assert removed == {"type": "BlockRemoved", "block_hashes": [-5], "medium": "GPU"}
            assert cleared == {"type": "AllBlocksCleared"}

        # A late subscriber asks the ROUTER for everything from seq 0 with a DEALER.
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay_ep)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs = []
        while True:
            frames = recv(dealer)
            if frames[2] == END:
                assert frames == [b"", b"", END, b""]
                break
            empty, topic, seq, payload = frames
            assert empty == b"" and topic == b"kv"
            seqs.append(int.from_bytes(seq, "big"))
            msgspec.msgpack.decode(payload)
        assert seqs == list(range(first + 11))
        # A malformed request gets no reply at all.
        dealer.send_multipart([b"", b"xx"])
        assert not dealer.poll(200)
        dealer.close()
        assert stats.get("kv_batches", "kv_relay", "sent") == first + 11
        assert stats.get("kv_batches", "kv_relay", "replayed") == first + 11
    finally:
        sub.close()
        relay.close()
        ctx.term()


def test_relay_vllm_hash_styles_dp_rank_offset_and_bounded_queue() -> None:
    ctx = zmq.Context()
    stats = ExportStats()
    cfg = KvEventsConfig(endpoint="tcp://127.0.0.1:0", hash_style="vllm")
    relay = KvRelay(cfg, stats=stats, context=ctx)
    sub = subscriber(ctx, relay.endpoints(0)[0])
    try:
        until_first(relay, sub)
        while sub.poll(50):
            sub.recv_multipart()
        relay.publish(batch(1))
        _, _, payload = recv(sub)
        stored, removed, _ = msgspec.msgpack.decode(payload)[1]
        assert stored["block_hashes"] == [(NEG + 1) % 2**64, 1]  # unsigned low 64 bits
        assert "lora_name" in stored and stored["medium"] == "GPU"
        assert removed["block_hashes"] == [BIG]
    finally:
        sub.close()
        relay.close()

    relay = KvRelay(
        {"endpoint": "tcp://127.0.0.1:0", "hash_style": "vllm_bytes"}, stats=stats, context=ctx
    )
    sub = subscriber(ctx, relay.endpoints(0)[0])
    try:
        until_first(relay, sub)
        while sub.poll(50):
            sub.recv_multipart()
        relay.publish(batch(1))
        stored = msgspec.msgpack.decode(recv(sub)[2])[1][0]
        h = stored["block_hashes"][0]
        assert isinstance(h, bytes) and len(h) == 32
        assert int.from_bytes(h[-8:], "big", signed=True) == NEG + 1
    finally:
        sub.close()
        relay.close()

    assert offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559"
    assert offset_endpoint("tcp://127.0.0.1:5557", None) == "tcp://127.0.0.1:5557"
    assert KvEventsConfig(replay_endpoint="tcp://*:5600").replay_endpoint_for(1) == "tcp://*:5601"

    # publish() never blocks: with a tiny queue and a burst, the overflow is counted.
    tiny = KvRelay(
        {"endpoint": "tcp://127.0.0.1:0", "max_queue_size": 2},
        stats=stats,
        context=ctx,
        name="tiny",
    )
    for i in range(5000):
        tiny.publish(batch(i))
    tiny.close()
    sent = stats.get("kv_batches", "tiny", "sent")
    dropped = stats.get("kv_batches", "tiny", "dropped")
    assert dropped > 0 and sent + dropped == 5000
    ctx.term()


class RawEnginePublisher:
    """An engine-like publisher from the wire facts: XPUB (to know a subscriber is there),
    ROUTER replay answering from a dict, seq chosen by the test (so it can make gaps)."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:0")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:0")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.buffer: dict[int, bytes] = {}
        self.replay_requests: list[int] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve_replay, daemon=True)
        self.thread.start()

    def wait_subscriber(self) -> None:
        assert self.pub.poll(5000), "no subscriber"
        self.pub.recv()  # the subscription message

    def send(self, seq: int, payload: bytes, *, live: bool = True) -> None:
        with self.lock:
            self.buffer[seq] = payload
        if live:
            self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    def _serve_replay(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            ident, _empty, start = self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            self.replay_requests.append(start_seq)
            with self.lock:
                items = sorted(self.buffer.items())
            for seq, payload in items:
                if seq >= start_seq:
                    self.router.send_multipart([ident, b"", b"", seq.to_bytes(8, "big"), payload])
            self.router.send_multipart([ident, b"", b"", END, b""])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.pub.close()
        self.router.close()


def sglang_payload(i: int, dp_rank: int | None = 0) -> bytes:
    stored = {
        "type": "BlockStored",
        "block_hashes": [NEG - i],  # negative: msgpack int64
        "parent_block_hash": None,
        "token_ids": [10, 11],
        "block_size": 2,
        "lora_id": None,
        "medium": "CPU_PINNED",
        "session_id": "s1",  # optional field of newer SGLang
        "future_field": {"x": 1},  # unknown: tolerated
    }
    removed = {"type": "BlockRemoved", "block_hashes": [2**63 + 7], "medium": "GPU"}  # uint64
    return msgspec.msgpack.encode(
        [1_700_000_000.5 + i, [stored, removed, {"type": "AllBlocksCleared"}], dp_rank]
    )


def vllm_payload(i: int, with_dp: bool) -> bytes:
    digest = bytes(range(24)) + (BIG - i).to_bytes(8, "big")  # 32-byte hash style
    stored = {
        "type": "BlockStored",
        "block_hashes": [digest, BIG],
        "parent_block_hash": digest,
        "token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        "extra_keys": None,
    }
    unknown = {"type": "BlockTouched", "block_hashes": [1]}  # a type we do not know
    body = [
        1_700_000_000.0 + i,
        [
            stored,
            unknown,
            {"type": "BlockRemoved", "block_hashes": [BIG], "medium": "GPU", "group_idx": 0},
        ],
    ]
    if with_dp:
        body.append(3)
    return msgspec.msgpack.encode(body)


def test_ingest_sglang_and_vllm_styles_and_fills_gaps_through_replay() -> None:
    ctx = zmq.Context()
    stats = ExportStats()
    engine = RawEnginePublisher(ctx)
    got: list[IngestedKvBatch] = []
    done = threading.Event()
    relayed = ListKvSink()

    def on_batch(b: IngestedKvBatch) -> None:
        got.append(b)
        if len(got) == 6:
            done.set()

    ingest = KvIngest(
        engine.endpoint,
        replay_endpoint=engine.replay_endpoint,
        on_batch=on_batch,
        relay=relayed,
        stats=stats,
        context=ctx,
    ).start()
    try:
        engine.wait_subscriber()
        engine.send(0, sglang_payload(0))
        engine.send(1, sglang_payload(1, dp_rank=None))
        engine.send(2, vllm_payload(2, with_dp=True), live=False)  # lost on the way: a gap
        engine.send(3, vllm_payload(3, with_dp=False), live=False)
        engine.send(4, sglang_payload(4))
        engine.send(5, vllm_payload(5, with_dp=True))
        assert done.wait(10)
        assert [b.seq for b in got] == [0, 1, 2, 3, 4, 5]
        assert [b.replayed for b in got] == [False, False, True, True, False, False]
        assert engine.replay_requests == [2]

        s0 = got[0]
        assert (
            s0.engine_id == f"kv:{engine.endpoint}" and s0.dp_rank == 0 and s0.ts == 1_700_000_000.5
        )
        stored, removed, cleared = s0.kv_events.events
        assert isinstance(stored, BlockStored) and stored.block_hashes == [NEG]
        assert (
            stored.medium == "CPU_PINNED"
            and stored.token_ids == [10, 11]
            and stored.block_size == 2
        )
        assert isinstance(removed, BlockRemoved) and removed.block_hashes == [-(2**63) + 7]
        assert isinstance(cleared, AllBlocksCleared)
        assert got[1].dp_rank is None  # nil dp_rank accepted

        v2 = got[2]
        assert v2.dp_rank == 3
        stored, removed = v2.kv_events.events  # the unknown BlockTouched was skipped
        assert stored.block_hashes == [-5 - 2, -5] and stored.parent_block_hash == -7
        assert removed.block_hashes == [-5]
        assert got[3].dp_rank is None  # dp_rank missing entirely
        # KvEvents.ts is this host's monotonic clock for the wire's wall time.
        offset = time.time_ns() - time.monotonic_ns()
        assert abs(got[0].kv_events.ts + offset - 1_700_000_000.5e9) < 1e9
        assert stats.get("kv_events", "kv_ingest", "unknown") == 3
        assert stats.get("kv_batches", "kv_ingest", "replayed") == 2
        assert stats.get("kv_batches", "kv_ingest", "gap") == 1
        assert len(relayed.batches) == 6  # also handed to a relay, as asked
    finally:
        ingest.close()
        engine.close()
        ctx.term()


def test_ingest_counts_what_replay_cannot_give_and_relay_round_trips() -> None:
    """Our relay -> our ingest: hashes survive every style; a gap with no replay is counted lost."""
    ctx = zmq.Context()
    stats = ExportStats()
    engine = RawEnginePublisher(ctx)
    got: list[IngestedKvBatch] = []
    ingest = KvIngest(engine.endpoint, on_batch=got.append, stats=stats, context=ctx).start()
    try:
        engine.wait_subscriber()
        engine.send(0, sglang_payload(0))
        engine.send(5, sglang_payload(5))
        engine.send(6, b"\xc1garbage")
        engine.send(7, sglang_payload(7))
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [b.seq for b in got] == [0, 5, 7]
        assert stats.get("kv_batches", "kv_ingest", "lost") == 4
        assert stats.get("kv_batches", "kv_ingest", "malformed") == 1
    finally:
        ingest.close()
        engine.close()

    for style in ("sglang", "vllm", "vllm_bytes"):
        relay = KvRelay(
            {
                "endpoint": "tcp://127.0.0.1:0",
                "replay_endpoint": "tcp://127.0.0.1:0",
                "hash_style": style,
            },
            stats=stats,
            context=ctx,
            name=style,
        )
        pub_ep, replay_ep = relay.endpoints(0)
        got2: list[IngestedKvBatch] = []
        ingest = KvIngest(
            pub_ep,
            replay_endpoint=replay_ep,
            on_batch=got2.append,
            stats=stats,
            context=ctx,
            name=f"in-{style}",
        ).start()
        try:
            for i in range(500):  # until the subscription is live
                relay.publish(batch(i))
                if got2:
                    break
                time.sleep(0.01)
            assert got2, style
            ev = got2[0].kv_events.events[0]
            i = got2[0].seq
            assert ev.block_hashes == [NEG + i, i], style
        finally:
            ingest.close()
            relay.close()
    ctx.term()


def test_relay_lag_is_exported_for_the_dashboard_and_alert() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from schedscope.exporters.kv_relay import KvRelayCollector

    ctx = zmq.Context()
    relay = KvRelay({"endpoint": "tcp://127.0.0.1:0"}, stats=ExportStats(), context=ctx)
    registry = CollectorRegistry()
    registry.register(KvRelayCollector(relay))
    try:
        stale = KvBatch("e0", 0, time.time() - 5.0, [AllBlocksCleared()])
        relay.publish(stale)  # an engine batch that reached the relay 5 s late
        deadline = time.monotonic() + 5
        while relay.lag_seconds() < 5.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        text = generate_latest(registry).decode()
        line = next(
            r for r in text.splitlines() if r.startswith("schedscope_kv_relay_lag_seconds{")
        )
        assert 5.0 <= float(line.split()[-1]) < 60.0
        assert 'schedscope_kv_relay_queued_batches{exporter="kv_relay"}' in text

        relay.publish(KvBatch("e0", 0, time.time(), [AllBlocksCleared()]))  # a fresh one
        while relay.lag_seconds() >= 5.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.lag_seconds() < 5.0
    finally:
        relay.close()
        ctx.term()


def test_ingest_joining_late_fetches_the_history_from_replay() -> None:
    """First frame seen is seq 3 (the sidecar started after the engine): 0..2 come from replay."""
    ctx = zmq.Context()
    stats = ExportStats()
    engine = RawEnginePublisher(ctx)
    got: list[IngestedKvBatch] = []
    done = threading.Event()

    def on_batch(b: IngestedKvBatch) -> None:
        got.append(b)
        if len(got) == 4:
            done.set()

    ingest = KvIngest(
        engine.endpoint,
        replay_endpoint=engine.replay_endpoint,
        on_batch=on_batch,
        stats=stats,
        context=ctx,
    ).start()
    try:
        engine.wait_subscriber()
        for seq in range(3):
            engine.send(seq, sglang_payload(seq), live=False)  # before the sidecar was there
        engine.send(3, sglang_payload(3))
        assert done.wait(10)
        assert [b.seq for b in got] == [0, 1, 2, 3]
        assert [b.replayed for b in got] == [True, True, True, False]
        assert engine.replay_requests == [0]
        assert stats.get("kv_batches", "kv_ingest", "late_join") == 1
        assert stats.get("kv_batches", "kv_ingest", "lost") == 0
    finally:
        ingest.close()
        engine.close()
        ctx.term()
