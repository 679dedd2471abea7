"""The sidecar's processing loop: Ingest -> EngineRegistry -> a pluggable frame handler.

Torch-free, and free of the CLI: ``schedscope sidecar`` wraps it, tests and the demo drive it
directly. The telemetry layer (spans, metrics, KV batches) plugs in as the handler.

Threads: Ingest receives and decodes on its own thread; everything here (registry, handler,
summary counts) runs on the one thread that calls ``run``/``process``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from schedscope.telemetry.engines import EngineRegistry, Observation
from schedscope.telemetry.ingest import Ingest, Received

log = logging.getLogger(__name__)


@runtime_checkable
class FrameHandler(Protocol):
    """What the sidecar calls for every accepted frame (duplicates are skipped before it).

    Called on the processing thread; it must not block for long (the ingest queue fills and
    drops, counted, while it does).
    """

    def handle(self, received: Received, observation: Observation) -> None: ...


@runtime_checkable
class TickingHandler(FrameHandler, Protocol):
    """A handler that also wants the clock: time-based flushes and staleness checks."""

    def tick(self, now_ns: int) -> None: ...


HandlerLike = FrameHandler | Callable[[Received, Observation], None]


@dataclass
class Summary:
    """A point-in-time view of what the sidecar has seen (for the CLI's live summary)."""

    wall_ns: int
    frames: int
    events: int
    events_by_type: dict[str, int]
    engines: int
    lost_messages: int  # seq gaps seen by this sidecar
    engine_dropped_messages: int  # reported by the engines' emitters (EmitterStats)
    queue_dropped_frames: int  # this sidecar's ingest queue was full
    bad_frames: dict[str, int]
    rejected_events: int
    unknown_events: int
    duplicates: int
    restarts: int
    peer_disconnects: int
    unexpected_disconnects: int
    handler_errors: int

    @property
    def bad_frames_total(self) -> int:
        return sum(self.bad_frames.values())


@dataclass
class SidecarStats:
    frames: int = 0
    events: int = 0
    duplicates: int = 0
    handler_errors: int = 0
    events_by_type: Counter[str] = field(default_factory=Counter)


class Sidecar:
    """Owns an Ingest and an EngineRegistry; feeds every accepted frame to the handler."""

    def __init__(
        self,
        ingest: Ingest,
        handler: HandlerLike | None = None,
        *,
        registry: EngineRegistry | None = None,
        tick_interval_s: float = 0.1,
    ) -> None:
        self.ingest = ingest
        # NOTE: not `registry or ...`: an empty EngineRegistry is falsy (it has __len__).
        self.registry = registry if registry is not None else EngineRegistry()
        self.stats = SidecarStats()
        self._handle: Callable[[Received, Observation], None] | None = None
        self._tick: Callable[[int], None] | None = None
        if handler is not None:
            self.set_handler(handler)
        self.tick_interval_s = tick_interval_s
        self._stop = threading.Event()

    def set_handler(self, handler: HandlerLike) -> None:
        if isinstance(handler, FrameHandler):
            self._handle = handler.handle
            self._tick = handler.tick if isinstance(handler, TickingHandler) else None
        elif callable(handler):
            self._handle = handler
            self._tick = None
        else:
            raise TypeError(f"handler must have handle(received, observation): {handler!r}")
        watch = getattr(handler, "watch_registry", None)
        if watch is not None:  # the registry's counts on /metrics (issue 18)
            watch(self.registry)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Sidecar:
        """Open the socket (raises OSError with a one-line reason) and start receiving."""
        self.ingest.start()
        return self

    def stop(self) -> None:
        """Ask ``run`` to return; safe from a signal handler or another thread."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self.ingest.stop()

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- processing ----------------------------------------------------------------------

    def run(self, on_idle: Callable[[], None] | None = None) -> None:
        """Process frames until ``stop()``. ``on_idle`` runs at least every tick interval."""
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self.process(timeout=self.tick_interval_s)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.tick_interval_s
                self._run_tick()
                if on_idle is not None:
                    on_idle()

    def process(self, timeout: float | None = 0.0, max_frames: int = 10_000) -> int:
        """Process queued frames: wait up to ``timeout`` for the first, then take what is
        there. Returns how many frames were processed."""
        first = self.ingest.get(timeout=timeout)
        if first is None:
            return 0
        self.process_one(first)
        n = 1
        for received in self.ingest.drain(max_frames - 1):
            self.process_one(received)
            n += 1
        return n

    def process_one(self, received: Received) -> Observation:
        obs = self.registry.observe(received.frame)
        st = self.stats
        if obs.duplicate:
            st.duplicates += 1
            return obs
        st.frames += 1
        events = received.frame.events
        st.events += len(events)
        by_type = st.events_by_type
        for ev in events:
            by_type[type(ev).__name__] += 1
        if self._handle is not None:
            try:
                self._handle(received, obs)
            except Exception:
                # A handler bug must not take the sidecar (and everyone's telemetry) down.
                st.handler_errors += 1
                if st.handler_errors <= 10 or st.handler_errors % 1000 == 0:
                    log.exception("frame handler failed (%d failures)", st.handler_errors)
        return obs

    def _run_tick(self) -> None:
        if self._tick is None:
            return
        try:
            self._tick(time.time_ns())
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler tick failed")

    # -- views ---------------------------------------------------------------------------

    def summary(self) -> Summary:
        c = self.ingest.counters
        st = self.stats
        engines = list(self.registry)
        return Summary(
            wall_ns=time.time_ns(),
            frames=st.frames,
            events=st.events,
            events_by_type=dict(st.events_by_type),
            engines=len(engines),
            lost_messages=self.registry.lost_messages_total,
            engine_dropped_messages=sum(r.engine_dropped_messages for r in engines),
            queue_dropped_frames=c.queue_dropped_frames,
            bad_frames=dict(c.bad_frames),
            rejected_events=c.rejected_events,
            unknown_events=c.unknown_events,
            duplicates=st.duplicates,
            restarts=self.registry.restarts_total,
            peer_disconnects=c.peer_disconnects,
            unexpected_disconnects=c.unexpected_disconnects,
            handler_errors=st.handler_errors,
        )
