"""Engine-side event emitter: the only telemetry code on the scheduler's hot path.

Threads: ``emit``/``end_step``/``flush``/``close`` are for the scheduler thread. With
``flush_interval_s > 0`` (the default) a small background thread does the periodic sends.

Cost model, measured (benchmarks/emit_overhead.py, 2 vCPUs): building two Structs and
appending them is ~4 µs per decode step; encoding a 10 ms batch after a 1 ms idle gap ~25 µs,
and the ZMQ send ~70 µs (p50; it wakes libzmq's I/O thread, caches are cold). Paid on the
scheduler thread every 10 ms, that is ~20 µs per step on average; so the scheduler thread only
appends to a deque (atomic, lock-free) and the background thread encodes and sends every
``flush_interval_s``. It needs the GIL only to encode (msgspec), and takes it while the
scheduler thread waits on the GPU; pyzmq releases the GIL while sending. ``flush()`` sends at
once on the caller's thread (pause, idle, shutdown: the sidecar must see them without delay).
A lock serialises the socket between the two threads (ZMQ allows migrating a socket across
threads with a full memory barrier). ``flush_interval_s=0`` sends on every ``end_step()``
with no thread. With no thread, an idle engine should still call ``end_step()`` now and then:
with an empty buffer it only sends the heartbeat when one is due.

The engine never waits: sends are non-blocking. If the socket would block (queue full, no
sidecar connected), the message is dropped, its seq is still consumed (so the sidecar sees the
gap), and cumulative drop counts travel in an EmitterStats event with the next message.

Known blind spot: messages ZMQ accepted into its pipe just before the sidecar died are lost
without the emitter knowing; a sidecar that keeps running sees them as a seq gap.

Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from schedscope import __version__
from schedscope.telemetry.schema import (
    DEFAULT_ENDPOINT,
    ENV_ENDPOINT,
    EmitterStats,
    EngineHello,
    EngineInfo,
    Event,
    Heartbeat,
    Shutdown,
    encode_envelope,
    resolve_endpoint,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "ENV_ENDPOINT",
    "AnyEmitter",
    "Emitter",
    "NullEmitter",
    "new_engine_id",
    "resolve_endpoint",
]

_now_ns: Callable[[], int] = time.monotonic_ns


def new_engine_id() -> str:
    return uuid.uuid4().hex[:16]


class Emitter:
    """Buffers raw events and sends them to the sidecar without ever blocking."""

    enabled = True

    def __init__(
        self,
        info: EngineInfo,
        endpoint: str | None = None,
        *,
        engine_id: str | None = None,
        flush_interval_s: float = 0.005,
        max_batch_events: int = 1024,
        max_pending_events: int = 100_000,
        heartbeat_interval_s: float = 1.0,
        sndhwm: int = 1000,
        max_message_bytes: int = 16 * 1024 * 1024,
        bind: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        if flush_interval_s < 0 or heartbeat_interval_s <= 0:
            raise ValueError("flush_interval_s must be >= 0 and heartbeat_interval_s > 0")
        if max_batch_events < 1:
            raise ValueError("max_batch_events must be >= 1")
        self.endpoint = resolve_endpoint(endpoint)
        self.engine_id = engine_id or new_engine_id()
        if not info.pid:
            info.pid = os.getpid()
        if not info.hostname:
            info.hostname = socket.gethostname()
        if not info.version:
            info.version = __version__
        self.info = info
        self._flush_interval_ns = int(flush_interval_s * 1e9)
        self._heartbeat_interval_ns = int(heartbeat_interval_s * 1e9)
        self._max_batch_events = max_batch_events
        # Frames the sidecar's MAXMSGSIZE would refuse are dropped here: libzmq would otherwise
        # cut the whole connection and take the messages queued behind it down too.
        self.max_message_bytes = max_message_bytes

        self._owns_context = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Without IMMEDIATE, messages would queue up for a peer that is not there.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        # Connection events tell us when a (new) sidecar is there, so the hello goes out again
        # at once: a sidecar that (re)starts learns who we are without waiting for a heartbeat.
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self.connected = False
        self.connects = 0
        self.disconnects = 0
        try:
            if bind:
                self._sock.bind(self.endpoint)
            else:
                self._sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            verb = "bind" if bind else "connect"
            raise OSError(f"cannot {verb} raw-event socket {self.endpoint!r}: {exc}") from None

        # deque: append (scheduler thread) and popleft (sender) are atomic without a lock.
        self._events: deque[Event] = deque()
        self._max_pending_events = max(max_pending_events, max_batch_events)
        self._lock = threading.Lock()  # the socket, seq and counters belong to its holder
        self._wake = threading.Event()
        # NOTE: emit is the deque's own append (no Python frame on the hot path).
        self.emit = self._events.append  # type: ignore[method-assign]
        self._seq = 0
        self.sent_messages = 0
        self.sent_events = 0
        self.dropped_messages = 0
        self.dropped_events = 0
        self.oversized_messages = 0
        self._drops_unreported = False
        self._hello_pending = True  # re-sent until one message carrying it gets through
        self._closed = False
        self._thread: threading.Thread | None = None
        now = _now_ns()
        self._next_flush_ns = now + self._flush_interval_ns
        self._next_heartbeat_ns = now
        # The hello goes out with the first send: a connect has not completed yet here.
        if flush_interval_s > 0:
            self._thread = threading.Thread(
                target=self._sender, name="schedscope-emitter", daemon=True
            )
            self._thread.start()

    # -- hot path -------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Append one event to the current buffer (no I/O)."""
        self._events.append(event)

    def end_step(self) -> None:
        """End of a scheduler step. With the sender thread: only wakes it if the buffer is
        full. Without: sends if the buffer is full or on every step (flush_interval_s=0)."""
        pending = len(self._events)
        if self._thread is not None:
            if pending >= self._max_batch_events:
                if pending > self._max_pending_events:
                    self._shed()
                self._wake.set()
            return
        now = _now_ns()
        if pending >= self._max_batch_events or now >= self._next_flush_ns:
            with self._lock:
                self._send(now)

    def flush(self) -> None:
        """Send whatever is buffered now, on this thread (pause, idle, shutdown, tests)."""
        with self._lock:
            self._send(_now_ns())

    # -- internals ------------------------------------------------------------------------

    def _sender(self) -> None:
        interval = self._flush_interval_ns / 1e9
        while not self._closed:
            self._wake.wait(interval)
            self._wake.clear()
            with self._lock:
                self._send(_now_ns())

    def _shed(self) -> None:
        """The sender fell far behind (GIL-starved): drop the oldest events, counted."""
        with self._lock:
            excess = len(self._events) - self._max_pending_events
            for _ in range(max(excess, 0)):
                self._events.popleft()
            if excess > 0:
                self.dropped_messages += 1
                self.dropped_events += excess
                self._drops_unreported = True

    def _take(self, n: int) -> list[Event]:
        q = self._events
        pop = q.popleft
        return [pop() for _ in range(min(n, len(q)))]

    def _send(self, now: int) -> None:
        """Encode and send what is pending. Caller holds ``_lock``."""
        if self._closed:
            self._events.clear()
            return
        self._next_flush_ns = now + self._flush_interval_ns
        self._poll_connection()
        prefix: list[Event] = []
        if self._hello_pending:
            prefix.append(EngineHello(ts=now, wall_ns=time.time_ns(), info=self.info))
            self._next_heartbeat_ns = now + self._heartbeat_interval_ns
        elif now >= self._next_heartbeat_ns:
            prefix.append(Heartbeat(ts=now, wall_ns=time.time_ns(), info=self.info))
            self._next_heartbeat_ns = now + self._heartbeat_interval_ns
        if prefix or self._drops_unreported:
            prefix.append(self._stats_event(now))
        if not self._events and not prefix:
            return
        first = True
        while self._events or prefix:
            # Events emitted meanwhile by the scheduler thread simply join a later chunk.
            engine_events = self._take(self._max_batch_events)
            chunk = prefix + engine_events
            # Only the first chunk carries the hello/heartbeat/stats prefix.
            carries_hello = first and self._hello_pending
            carries_stats = first and bool(prefix)
            prefix = []
            first = False
            frame = encode_envelope(self.engine_id, self._seq, chunk)
            self._seq += 1
            if len(frame) > self.max_message_bytes:
                self.oversized_messages += 1
                self._drop(len(engine_events))
                continue
            try:
                self._sock.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)
            except zmq.Again:
                self._drop(len(engine_events))
                continue
            self.sent_messages += 1
            self.sent_events += len(chunk)
            if carries_hello:
                self._hello_pending = False
            if carries_stats:
                self._drops_unreported = False

    def _drop(self, n_events: int) -> None:
        # n_events counts the engine's events only, not our own hello/heartbeat/stats.
        self.dropped_messages += 1
        self.dropped_events += n_events
        self._drops_unreported = True

    def _stats_event(self, now: int) -> EmitterStats:
        return EmitterStats(
            now,
            self.dropped_messages,
            self.dropped_events,
            self.sent_messages,
            self.oversized_messages,
        )

    def _poll_connection(self) -> None:
        """Read pending connection events (cheap: a flag check unless something happened)."""
        mon = self._monitor
        while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(mon, zmq.NOBLOCK)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.connects += 1
                self._hello_pending = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.disconnects += 1

    def poll_connection(self) -> bool:
        """Update and return ``connected`` (for health checks and tests; not the hot path)."""
        with self._lock:
            if not self._closed:
                self._poll_connection()
        return self.connected

    @property
    def next_seq(self) -> int:
        return self._seq

    def close(self, reason: str = "shutdown") -> None:
        """Send Shutdown (best effort, never blocks) and close the socket."""
        if self._closed:
            return
        thread, self._thread = self._thread, None
        self.emit(Shutdown(ts=_now_ns(), reason=reason))
        with self._lock:
            self._send(_now_ns())
            self._closed = True
        if thread is not None:
            self._wake.set()
            thread.join(2.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._owns_context:
            self._ctx.term()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullEmitter:
    """Telemetry off: every call is a no-op. Callers guard event construction on ``enabled``."""

    enabled = False
    engine_id = ""
    connected = False
    sent_messages = sent_events = dropped_messages = dropped_events = oversized_messages = 0

    def emit(self, event: Event) -> None:
        pass

    def end_step(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, reason: str = "shutdown") -> None:
        pass


AnyEmitter = Emitter | NullEmitter
