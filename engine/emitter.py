"""Engine-side event emitter: the only telemetry code on the scheduler's hot path.

Thread-safety: an Emitter belongs to the scheduler thread. ``emit``/``end_step``/``flush`` must
only be called from that thread (no locks on the hot path, by design).

Cost model (DESIGN §3): building a msgspec Struct and appending it is ~0.5 µs; a ZMQ send after
an idle gap (a GPU step) costs ~20 µs because it wakes libzmq's I/O thread. So events are
appended to a buffer and sent as one message when ``flush_interval_s`` has passed or the buffer
is full, checked at ``end_step()``. Pause, idle and shutdown call ``flush()`` so the sidecar
sees them at once. An idle engine should still call ``end_step()`` now and then (e.g. from its
idle hook): with an empty buffer it only sends the heartbeat when one is due.

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
import time
import uuid
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
        flush_interval_s: float = 0.01,
        max_batch_events: int = 1024,
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

        self._events: list[Event] = []
        self._seq = 0
        self.sent_messages = 0
        self.sent_events = 0
        self.dropped_messages = 0
        self.dropped_events = 0
        self.oversized_messages = 0
        self._drops_unreported = False
        self._hello_pending = True  # re-sent until one message carrying it gets through
        self._closed = False
        now = _now_ns()
        self._next_flush_ns = now + self._flush_interval_ns
        self._next_heartbeat_ns = now
        # The hello goes out with the first send: a connect has not completed yet here.

    # -- hot path -------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Append one event to the current buffer (no I/O)."""
        self._events.append(event)

    def end_step(self) -> None:
        """End of a scheduler step: send the buffer if the interval passed or it is full."""
        if len(self._events) >= self._max_batch_events:
            self._send(_now_ns())
            return
        now = _now_ns()
        if now >= self._next_flush_ns:
            self._send(now)

    def flush(self) -> None:
        """Send whatever is buffered now (pause, idle, shutdown, tests)."""
        self._send(_now_ns())

    # -- internals ------------------------------------------------------------------------

    def _send(self, now: int) -> None:
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
        events = self._events
        if not events and not prefix:
            return
        self._events = []
        first = True
        while events or prefix:
            engine_events = events[: self._max_batch_events]
            chunk = prefix + engine_events
            events = events[self._max_batch_events :]
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
        self.emit(Shutdown(ts=_now_ns(), reason=reason))
        self.flush()
        self._closed = True
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
