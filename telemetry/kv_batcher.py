"""Per-engine coalescing of KV cache events into KvBatch objects for the KV sinks.

A batch closes when it holds ``max_events`` events, when its oldest event has waited
``window_ns`` (checked by ``tick``), or at once when the engine goes quiet (idle or pause span
opens: ``flush_kv_batches_on_idle``) or goes away (shutdown, restart, sidecar close).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from schedscope.telemetry.kv_sinks import KvBatch, KvSink
from schedscope.telemetry.schema import KvBlockEventT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvBatchingConfig:
    max_events: int = 32
    window_ns: int = 20_000_000  # 20 ms: well inside the 50 ms idle -> KV-out target

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.window_ns < 0:
            raise ValueError("max_events must be >= 1 and window_ns >= 0")


class KvBatcher:
    """Pending KV events of one engine. ``on_flush(trigger)`` counts batches by trigger;
    ``on_sink_error(sink_name)`` counts sinks that raised."""

    __slots__ = (
        "_first_iter",
        "_last_iter",
        "_pending",
        "_pending_since_ns",
        "config",
        "dp_rank",
        "engine_id",
        "on_flush",
        "on_sink_error",
        "sinks",
    )

    def __init__(
        self,
        engine_id: str,
        dp_rank: int | None,
        sinks: list[KvSink],
        config: KvBatchingConfig,
        on_flush: Callable[[str], None],
        on_sink_error: Callable[[str], None],
    ) -> None:
        self.engine_id = engine_id
        self.dp_rank = dp_rank
        self.sinks = sinks  # shared list: sinks added later get later batches
        self.config = config
        self.on_flush = on_flush
        self.on_sink_error = on_sink_error
        self._pending: list[KvBlockEventT] = []
        self._pending_since_ns = 0
        self._first_iter: int | None = None
        self._last_iter: int | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, events: list[KvBlockEventT], forward_iter: int | None, now_ns: int) -> None:
        if not events:
            return
        if not self._pending:
            self._pending_since_ns = now_ns
            self._first_iter = forward_iter
        self._pending.extend(events)
        if forward_iter is not None:
            self._last_iter = forward_iter
            if self._first_iter is None:
                self._first_iter = forward_iter
        if len(self._pending) >= self.config.max_events:
            self.flush("count")

    def tick(self, now_ns: int) -> None:
        if self._pending and now_ns - self._pending_since_ns >= self.config.window_ns:
            self.flush("window")

    def flush(self, trigger: str) -> None:
        """Deliver every pending event, in order, as one batch to every sink."""
        if not self._pending:
            return
        batch = KvBatch(
            self.engine_id,
            self.dp_rank,
            time.time(),
            self._pending,
            self._first_iter,
            self._last_iter,
        )
        self._pending = []
        self._first_iter = self._last_iter = None
        self.on_flush(trigger)
        for sink in self.sinks:
            try:
                sink.publish(batch)
            except Exception:  # a broken sink must not stop the others or the pipeline
                log.exception("KV sink %r failed", getattr(sink, "name", sink))
                self.on_sink_error(getattr(sink, "name", type(sink).__name__))


def flush_kv_batches_on_idle(batcher: KvBatcher, trigger: str = "idle") -> None:
    """DESIGN §5: when an idle span opens (or a pause span: trigger="pause"), every pending KV
    batch goes out at once, so a router's view of the cache is current whenever the engine
    goes quiet. Called before the span is recorded, without waiting for the window."""
    batcher.flush(trigger)
