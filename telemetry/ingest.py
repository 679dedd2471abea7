"""Sidecar ingest: receive raw-event frames on a ZMQ PULL socket, decode and validate them on a
receiving thread, and hand them to the processing thread through a bounded queue.

Nothing here blocks the engine: the engine side is non-blocking, and when this side falls
behind, the bounded queue drops whole frames and counts them (the seq gap shows up as well).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import zmq

from schedscope.telemetry.schema import DecodedFrame, FrameError, decode_envelope

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 10_000


@dataclass
class IngestCounters:
    """Written by the receiving thread only; read by anyone (ints: reads are atomic)."""

    frames_received: int = 0
    bytes_received: int = 0
    events_received: int = 0
    bad_frames: dict[str, int] = field(
        default_factory=lambda: {"malformed": 0, "schema_version": 0, "oversized": 0}
    )
    rejected_events: int = 0  # unknown tag / invalid event inside an otherwise good frame
    queue_dropped_frames: int = 0
    queue_dropped_events: int = 0
    peer_disconnects: int = 0  # includes connections libzmq cut for exceeding MAXMSGSIZE
    last_error: str = ""

    @property
    def bad_frames_total(self) -> int:
        return sum(self.bad_frames.values())


@dataclass
class Received:
    """One decoded frame, stamped with the sidecar's wall clock at receipt."""

    frame: DecodedFrame
    recv_wall_ns: int


class Ingest:
    """Owns the PULL socket and the receiving thread.

    ``bind=True`` (default): engines connect to ``endpoint``. ``bind=False``: connect to an
    engine whose emitter binds.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = True,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        rcvhwm: int = 10_000,
        context: zmq.Context | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        self.endpoint = endpoint
        self.bind = bind
        self.max_message_bytes = max_message_bytes
        self.counters = IngestCounters()
        self.queue: queue.Queue[Received] = queue.Queue(maxsize=queue_size)
        self._owns_context = context is None
        self._ctx = context or zmq.Context()
        self._rcvhwm = rcvhwm
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.bound_endpoint: str | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Ingest:
        """Open the socket (errors surface here, in the caller's thread) and start receiving."""
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops the connection of a peer that sends more than this (DoS guard).
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        try:
            if self.bind:
                sock.bind(self.endpoint)
                self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                sock.connect(self.endpoint)
                self.bound_endpoint = self.endpoint
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            verb = "bind" if self.bind else "connect"
            raise OSError(f"cannot {verb} raw-event socket {self.endpoint!r}: {exc}") from None
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="schedscope-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._owns_context:
            self._ctx.term()

    def __enter__(self) -> Ingest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- consumer side -------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Received | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self, max_items: int = 10_000) -> list[Received]:
        out: list[Received] = []
        while len(out) < max_items:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    # -- receiving thread ----------------------------------------------------------------

    def _run(self) -> None:
        assert self._sock is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                break
            if self._monitor in ready:
                self._drain_monitor()
            if self._sock in ready:
                self._receive_available()

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.counters.peer_disconnects += 1

    def _receive_available(self, budget: int = 1000) -> None:
        assert self._sock is not None
        for _ in range(budget):
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.accept(b"".join(p.buffer for p in parts) if len(parts) > 1 else parts[0].buffer)

    def accept(self, data: bytes | memoryview) -> None:
        """Decode, validate and enqueue one frame (public so tests and replay can feed bytes)."""
        c = self.counters
        c.frames_received += 1
        c.bytes_received += len(data)
        if len(data) > self.max_message_bytes:
            c.bad_frames["oversized"] += 1
            c.last_error = f"frame of {len(data)} bytes exceeds {self.max_message_bytes}"
            return
        try:
            frame = decode_envelope(data)
        except FrameError as exc:
            c.bad_frames[exc.kind] = c.bad_frames.get(exc.kind, 0) + 1
            c.last_error = str(exc)
            log.debug("rejected frame: %s", exc)
            return
        if frame.rejected_events:
            c.rejected_events += frame.rejected_events
            c.last_error = frame.errors[-1]
        c.events_received += len(frame.events)
        try:
            self.queue.put_nowait(Received(frame, time.time_ns()))
        except queue.Full:
            c.queue_dropped_frames += 1
            c.queue_dropped_events += len(frame.events)
