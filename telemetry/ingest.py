"""Sidecar ingest: receive raw-event frames on a ZMQ PULL socket, decode and validate them on a
receiving thread, and hand them to the processing thread through a bounded queue.

Nothing here blocks the engine: the engine side is non-blocking, and when this side falls
behind, the bounded queue drops whole frames and counts them (the seq gap shows up as well).

Oversized frames: the socket has ZMQ_MAXMSGSIZE set. libzmq does not hand such a frame up, nor
say why: it closes that peer's connection (monitor event DISCONNECTED), discarding the frame
and whatever the peer had queued behind it; the peer reconnects on its own (reconnect_ivl).
So it is counted twice, honestly: ``unexpected_disconnects`` (a connection that went away
without its engine saying Shutdown) here, and the lost messages as a seq gap once the engine's
next frame arrives on the new connection (EngineRegistry). Frames fed to ``accept()`` directly
(replay, tests) over the limit are counted in ``bad_frames["oversized"]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from schedscope.telemetry.schema import DecodedFrame, FrameError, Shutdown, decode_envelope

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_MAX_QUEUED_EVENTS = 500_000  # decoded events waiting for processing (~100-200 MiB)
DEFAULT_RCVHWM = 1_000  # frames buffered by ZMQ itself; with the queue, bounds memory


@dataclass
class IngestCounters:
    """Written by the receiving thread only; read by anyone (ints: reads are atomic)."""

    frames_received: int = 0
    bytes_received: int = 0
    events_received: int = 0
    bad_frames: dict[str, int] = field(
        default_factory=lambda: {
            "malformed": 0,
            "schema_version": 0,
            "oversized": 0,
            "too_deep": 0,
            "out_of_range": 0,
            "internal_error": 0,  # an unexpected exception on one frame: counted, go on
        }
    )
    rejected_events: int = 0  # unknown tag / invalid event inside an otherwise good frame
    unknown_events: int = 0  # the part of rejected_events with a tag this sidecar doesn't know
    queue_dropped_frames: int = 0
    queue_dropped_events: int = 0
    peer_connections: int = 0  # connections that completed the ZMTP handshake
    peer_disconnects: int = 0  # every connection that went away
    # Went away without a Shutdown from its engine: crash, network, or libzmq cutting a peer
    # that sent a frame over MAXMSGSIZE (libzmq does not say which).
    unexpected_disconnects: int = 0
    last_error: str = ""
    # The receiving thread died (a bug, not an input): logged and shown here, never silent.
    thread_dead: bool = False

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
        max_queued_events: int = DEFAULT_MAX_QUEUED_EVENTS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        rcvhwm: int = DEFAULT_RCVHWM,
        context: zmq.Context | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if max_queued_events < 1:
            raise ValueError("max_queued_events must be >= 1")
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        self.endpoint = endpoint
        self.bind = bind
        self.max_message_bytes = max_message_bytes
        self.counters = IngestCounters()
        self.queue: queue.Queue[Received] = queue.Queue(maxsize=queue_size)
        # Frames vary from 1 to ~1,000 events: memory is bounded by events queued, not frames.
        self.max_queued_events = max_queued_events
        self._queued_events = 0
        self._queued_lock = threading.Lock()  # the receiving thread adds, the consumer takes
        self._owns_context = context is None
        self._ctx = context or zmq.Context()
        self._rcvhwm = rcvhwm
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.bound_endpoint: str | None = None
        self._stopped = False
        # Connection (source fd) -> engine_id and whether its last frame said Shutdown, so a
        # disconnect can be told apart from a clean exit. Receiving thread only.
        self._conn_engine: dict[int, tuple[str, bool]] = {}

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
                _refuse_live_ipc_socket(self.endpoint)
                sock.bind(self.endpoint)
                self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                sock.connect(self.endpoint)
                self.bound_endpoint = self.endpoint
        except (zmq.ZMQError, OSError) as exc:
            sock.close(linger=0)
            if self._owns_context:
                self._ctx.term()
            self._stopped = True
            verb = "bind" if self.bind else "connect"
            raise OSError(f"cannot {verb} raw-event socket {self.endpoint}: {exc}") from None
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="schedscope-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
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
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self._taken(len(item.frame.events))
        return item

    def drain(self, max_items: int = 10_000) -> list[Received]:
        out: list[Received] = []
        while len(out) < max_items:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        self._taken(sum(len(r.frame.events) for r in out))
        return out

    @property
    def queued_events(self) -> int:
        return self._queued_events

    def _taken(self, n: int) -> None:
        with self._queued_lock:
            self._queued_events -= n

    # -- receiving thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            self.counters.thread_dead = True
            self.counters.last_error = f"ingest thread died: {exc!r}"
            log.error("schedscope ingest thread died: %r", exc, exc_info=True)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        assert self._sock is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                break
            if ready:
                # Frames first: a Shutdown frame is already queued when its disconnect is
                # reported, and must be seen first for the disconnect to count as clean.
                self._receive_available()
            if self._monitor in ready:
                self._drain_monitor()

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        c = self.counters
        while True:
            try:
                msg = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if msg["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                c.peer_connections += 1
                continue
            c.peer_disconnects += 1
            _engine, said_shutdown = self._conn_engine.pop(int(msg["value"]), ("", False))
            if not said_shutdown:
                c.unexpected_disconnects += 1

    def _receive_available(self, budget: int = 1000) -> None:
        assert self._sock is not None
        for _ in range(budget):
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) != 1:
                self._count_bad("malformed", f"expected 1 ZMQ frame per message, got {len(parts)}")
                continue
            try:
                frame = self.accept(parts[0].buffer)
            except Exception as exc:  # one frame must never stop the thread (issue 18)
                self._count_bad("internal_error", f"error on one frame: {exc!r}")
                log.warning("error processing one frame: %r", exc)
                continue
            if frame is not None:
                # NOTE: SRCFD is deprecated in libzmq 4.3 but is the only way to know which
                # connection a PULL message came from; -1 where unsupported (e.g. inproc).
                said_shutdown = bool(frame.events) and type(frame.events[-1]) is Shutdown
                fd = parts[0].get(zmq.SRCFD)
                if fd >= 0:
                    self._conn_engine[fd] = (frame.engine_id, said_shutdown)

    def _count_bad(self, kind: str, message: str) -> None:
        c = self.counters
        c.frames_received += 1
        c.bad_frames[kind] = c.bad_frames.get(kind, 0) + 1
        c.last_error = message

    def accept(self, data: bytes | memoryview) -> DecodedFrame | None:
        """Decode, validate and enqueue one frame (public so tests and replay can feed bytes).

        Returns the decoded frame (even when the queue was full), or None if it was refused.
        """
        c = self.counters
        c.frames_received += 1
        c.bytes_received += len(data)
        if len(data) > self.max_message_bytes:
            c.bad_frames["oversized"] += 1
            c.last_error = f"frame of {len(data)} bytes exceeds {self.max_message_bytes}"
            return None
        try:
            frame = decode_envelope(data)
        except FrameError as exc:
            c.bad_frames[exc.kind] = c.bad_frames.get(exc.kind, 0) + 1
            c.last_error = str(exc)
            log.debug("rejected frame: %s", exc)
            return None
        if frame.rejected_events:
            c.rejected_events += frame.rejected_events
            c.unknown_events += frame.unknown_events
            c.last_error = frame.errors[-1]
        n = len(frame.events)
        c.events_received += n
        with self._queued_lock:
            # An empty queue takes any frame (its size is bounded by max_message_bytes).
            fits = self._queued_events == 0 or self._queued_events + n <= self.max_queued_events
            if fits:
                try:
                    self.queue.put_nowait(Received(frame, time.time_ns()))
                    self._queued_events += n
                except queue.Full:
                    fits = False
        if not fits:
            c.queue_dropped_frames += 1
            c.queue_dropped_events += n
        return frame


def _refuse_live_ipc_socket(endpoint: str) -> None:
    """libzmq binds an ipc:// path by unlinking whatever is there, silently stealing the
    endpoint from a sidecar that is still running. Refuse instead if someone answers on it."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    if not path or path.startswith("@") or not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # a stale file from a process that is gone: libzmq replaces it
    raise OSError("address already in use (another process is listening on it)")
