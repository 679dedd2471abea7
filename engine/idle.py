"""What the engine does when it goes quiet: idle spans, the memory check, the log limiter.

Seeds 003 and 004: an idle span opens only when the engine is *fully* idle; on entering it the
engine checks its KV memory (free + cached + in-use slots must equal the pool size and the
request table must be empty) and flushes pending KV events so routers see a current cache.
The check's result is always an event (metrics are never rate-limited); only the log line is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from schedscope.engine.emitter import AnyEmitter
from schedscope.telemetry.schema import IdleBegin, IdleEnd, MemoryCheck

log = logging.getLogger("schedscope.engine")

_now_ns: Callable[[], int] = time.monotonic_ns


@dataclass(frozen=True)
class PoolSnapshot:
    """KV slot accounting at one instant, counted independently so a leak shows up."""

    pool_size: int
    free_slots: int
    cached_slots: int  # held by the radix cache (evictable or locked)
    in_use_slots: int  # held by live requests, not (yet) in the cache
    req_table_used: int  # request -> token table rows in use


def check_memory(snap: PoolSnapshot, *, expect_empty: bool = True) -> MemoryCheck:
    """Seed 003's check_memory, as an event instead of a raised error.

    ``expect_empty``: the engine is fully idle, so no request may hold slots or table rows.
    """
    problems = []
    total = snap.free_slots + snap.cached_slots + snap.in_use_slots
    if total != snap.pool_size:
        problems.append(
            f"slot leak: free {snap.free_slots} + cached {snap.cached_slots} + in-use "
            f"{snap.in_use_slots} = {total} != pool size {snap.pool_size} "
            f"({snap.pool_size - total} missing)"
        )
    if expect_empty and snap.in_use_slots:
        problems.append(f"{snap.in_use_slots} slots held by requests while idle")
    if expect_empty and snap.req_table_used:
        problems.append(f"request table has {snap.req_table_used} rows in use while idle")
    return MemoryCheck(
        ts=_now_ns(),
        ok=not problems,
        pool_size=snap.pool_size,
        free_slots=snap.free_slots,
        cached_slots=snap.cached_slots,
        in_use_slots=snap.in_use_slots,
        req_table_used=snap.req_table_used,
        detail="; ".join(problems),
    )


class RateLimitedLog:
    """At most one log line per ``interval_s`` (SGLang's idle log: 30 s)."""

    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_ns = int(interval_s * 1e9)
        self._last_ns: int | None = None

    def __call__(self, level: int, msg: str, *args: object) -> bool:
        now = _now_ns()
        if self._last_ns is not None and now - self._last_ns < self.interval_ns:
            return False
        self._last_ns = now
        log.log(level, msg, *args)
        return True


class IdleTracker:
    """Opens and closes idle spans; on opening, runs the memory check and flushes events.

    ``snapshot`` returns the pool accounting; ``flush_kv`` emits pending KV events now.
    """

    def __init__(
        self,
        emitter: AnyEmitter,
        snapshot: Callable[[], PoolSnapshot],
        flush_kv: Callable[[], None],
        *,
        log_interval_s: float = 30.0,
    ) -> None:
        self.emitter = emitter
        self.snapshot = snapshot
        self.flush_kv = flush_kv
        self.idle = False
        self.last_check: MemoryCheck | None = None
        self.leaks_found = 0
        self._ok_log = RateLimitedLog(log_interval_s)
        self._leak_log = RateLimitedLog(log_interval_s)

    def update(self, fully_idle: bool) -> None:
        """Call once per loop iteration with the engine's ``is_fully_idle()``."""
        if fully_idle and not self.idle:
            self.enter()
        elif not fully_idle and self.idle:
            self.leave()

    def enter(self) -> None:
        self.idle = True
        check = check_memory(self.snapshot())
        self.last_check = check
        if not check.ok:
            self.leaks_found += 1
            self._leak_log(logging.ERROR, "KV memory leak detected: %s", check.detail)
        else:
            self._ok_log(logging.INFO, "engine idle; KV memory check passed")
        if self.emitter.enabled:
            self.emitter.emit(check)
            self.emitter.emit(IdleBegin(ts=_now_ns()))
        # Seed 000/§5: pending KV batches go out the moment the engine goes quiet.
        self.flush_kv()
        self.emitter.flush()

    def leave(self) -> None:
        self.idle = False
        if self.emitter.enabled:
            self.emitter.emit(IdleEnd(ts=_now_ns()))
