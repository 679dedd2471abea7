"""KV-event ingest: subscribe to a stock SGLang or vLLM engine's KV-event stream.

Point it at the engine's ``--kv-events-config`` endpoint (SGLang) or ``KVEventsConfig``
endpoint (vLLM); with the replay endpoint given, a seq gap is filled through a DEALER replay
request before the batch that revealed it is delivered (DESIGN §6). Tolerates what the two
engines differ in: unknown fields, hashes as negative int64 / uint64 / 32-byte bytes (all
normalised to a signed int64, see ``kv_wire.hash_in``), dp_rank present, nil or missing.

Each batch becomes an ``IngestedKvBatch`` carrying our schema's ``KvEvents`` (its ``ts`` is this
machine's ``time.monotonic_ns()`` for the wire's wall time, like an engine on the same host
would send) and goes to ``on_batch`` — the sidecar feeds it into the telemetry layer under the
synthetic engine id ``kv:<endpoint>`` — and, if given, to a relay (any ``KvSink``). The
callback runs on the ingest thread: keep it short or hand off. Bounded: the SUB socket's
receive hwm; everything dropped, lost, replayed or unknown is counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from schedscope.exporters.kv_wire import (
    END_SEQ,
    UnknownKvEvent,
    decode_payload,
    event_from_wire,
)
from schedscope.exporters.stats import EXPORT_STATS, ExportStats, RateLimitedLogger
from schedscope.telemetry.kv_sinks import KvBatch, KvSink
from schedscope.telemetry.schema import KvBlockEventT, KvEvents

# One KV batch: generous (thousands of pages with their token ids), still bounded.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_log = RateLimitedLogger(logging.getLogger(__name__))


class IngestedKvBatch(msgspec.Struct, gc=False):
    engine_id: str  # "kv:<endpoint>" unless given
    seq: int
    dp_rank: int | None
    ts: float  # the wire's wall-clock seconds
    kv_events: KvEvents  # ts: local monotonic ns for that wall time
    replayed: bool = False


class KvIngest:
    """SUB (+ DEALER replay) client of one engine's KV-event endpoint. See the module doc."""

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        on_batch: Callable[[IngestedKvBatch], None] | None = None,
        relay: KvSink | None = None,
        engine_id: str | None = None,
        hwm: int = 100_000,
        replay_timeout_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        name: str = "kv_ingest",
        stats: ExportStats = EXPORT_STATS,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.on_batch = on_batch
        self.relay = relay
        self.engine_id = engine_id or f"kv:{endpoint}"
        self.max_message_bytes = max_message_bytes
        self.hwm = hwm
        self.replay_timeout_s = replay_timeout_s
        self.name = name
        self.stats = stats
        self._ctx = context or zmq.Context.instance()
        self.last_seq: int | None = None
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._dealer: zmq.Socket | None = None
        self.dead = False  # the ingest thread died (logged and counted as thread_dead)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> KvIngest:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"schedscope-{self.name}", daemon=True
            )
            self._thread.start()
            self._connected.wait(timeout=5)
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> KvIngest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ingest thread --------------------------------------------------------------------

    def _new_dealer(self) -> zmq.Socket | None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None
        if self.replay_endpoint:
            self._dealer = self._ctx.socket(zmq.DEALER)  # not REQ: REQ breaks after one reply
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            self._dealer.connect(self.replay_endpoint)
        return self._dealer

    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.hwm)
        sub.setsockopt(zmq.LINGER, 0)
        # A peer on the network must not make us buffer frames of any size.
        sub.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        self._new_dealer()
        self._connected.set()
        try:
            while not self._stop.is_set():
                if not sub.poll(100):
                    continue
                frames = sub.recv_multipart()
                try:
                    self._on_frames(frames)
                except Exception as exc:  # one input never stops the thread (issue 18)
                    self.stats.add("kv_batches", self.name, "internal_error")
                    _log.warn("internal", "error on one KV batch from %s: %r", self.endpoint, exc)
        except Exception as exc:
            # Not an input (those are caught above): say so loudly, never die silently.
            self.dead = True
            self.stats.add("kv_batches", self.name, "thread_dead")
            _log.warn("dead", "KV ingest thread for %s died: %r", self.endpoint, exc)
        finally:
            sub.close(linger=0)
            if self._dealer is not None:
                self._dealer.close(linger=0)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.add("kv_batches", self.name, "malformed")
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        last = self.last_seq
        if last is not None:
            if seq <= last:
                # Live batches never repeat (replay only fetches seqs below the live one), so a
                # seq going back means the publisher restarted, and a subscriber that joined
                # it late may first see seq > 0: fetch what it missed from the new one.
                self.stats.add("kv_batches", self.name, "publisher_restart")
                if seq > 0:
                    self._fill_gap(0, seq)
            elif seq > last + 1:
                self.stats.add("kv_batches", self.name, "gap")
                self._fill_gap(last + 1, seq)
        elif seq > 0 and self._dealer is not None:
            # Joined late: the first frame seen is seq N > 0; fetch 0..N-1 as routers do.
            self.stats.add("kv_batches", self.name, "late_join")
            self._fill_gap(0, seq)
        self._deliver(seq, frames[2], replayed=False)
        self.last_seq = seq

    def _fill_gap(self, start: int, stop: int) -> None:
        """Ask the replay socket for [start, stop); count what it cannot give."""
        dealer = self._dealer
        if dealer is None:
            self.stats.add("kv_batches", self.name, "lost", stop - start)
            return
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        expected = start
        deadline = time.monotonic() + self.replay_timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not dealer.poll(remaining_ms):
                # NOTE: a late reply would be mistaken for the next replay's: start afresh.
                _log.warn("replay", "KV replay from %s timed out", self.replay_endpoint)
                self.stats.add("kv_batches", self.name, "replay_timeout")
                self._new_dealer()
                break
            frames = dealer.recv_multipart()
            if len(frames) == 4 and frames[1] == b"" and frames[2] == END_SEQ:
                break  # the end marker
            if len(frames) != 4 or len(frames[2]) != 8:
                self.stats.add("kv_batches", self.name, "malformed")
                continue
            seq = int.from_bytes(frames[2], "big", signed=True)
            if seq < expected or seq >= stop:
                continue  # older than asked, or already live
            if seq > expected:  # older than the publisher's buffer: silently missing there
                self.stats.add("kv_batches", self.name, "lost", seq - expected)
            self._deliver(seq, frames[3], replayed=True)
            expected = seq + 1
        if expected < stop:
            self.stats.add("kv_batches", self.name, "lost", stop - expected)

    def _deliver(self, seq: int, payload: bytes, replayed: bool) -> None:
        try:
            ts, raw_events, dp_rank = decode_payload(payload)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            self.stats.add("kv_batches", self.name, "malformed")
            _log.warn("payload", "malformed KV payload from %s: %s", self.endpoint, exc)
            return
        events: list[KvBlockEventT] = []
        for raw in raw_events:
            try:
                events.append(event_from_wire(raw))
            except UnknownKvEvent:
                self.stats.add("kv_events", self.name, "unknown")
            except (KeyError, ValueError, TypeError):
                self.stats.add("kv_events", self.name, "malformed")
        self.stats.add("kv_batches", self.name, "replayed" if replayed else "received")
        self.stats.add("kv_events", self.name, "received", len(events))
        mono_ns = int(ts * 1e9) - (time.time_ns() - time.monotonic_ns())
        batch = IngestedKvBatch(
            self.engine_id, seq, dp_rank, ts, KvEvents(mono_ns, None, events), replayed
        )
        if self.on_batch is not None:
            try:
                self.on_batch(batch)
            except Exception as exc:  # a consumer bug must not stop the stream
                self.stats.add("kv_batches", self.name, "callback_error")
                _log.warn("callback", "KV ingest callback raised: %r", exc)
        if self.relay is not None and events:
            self.relay.publish(KvBatch(self.engine_id, dp_rank, ts, events))
