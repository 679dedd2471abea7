"""Per-engine bookkeeping in the sidecar: identity, clock anchor, seq tracking, restarts.

One EngineRegistry per sidecar; it is bounded (least recently seen engines are forgotten and
counted). Only the processing thread touches it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from schedscope.telemetry.schema import (
    DecodedFrame,
    EmitterStats,
    EngineHello,
    EngineInfo,
    Heartbeat,
    Shutdown,
)

# An engine_id that has been silent this long (heartbeats come every second) and whose
# identity shows up under a new engine_id is taken to have restarted. A live one is not: two
# replicas on one host can share (model, ranks).
DEFAULT_RESTART_STALE_S = 3.0
# A seq gap larger than this from one frame to the next is not believed on one frame alone
# (an emitter drops at most a few thousand messages a second; this is hours of drops).
DEFAULT_MAX_SEQ_JUMP = 10_000_000


@dataclass
class EngineRecord:
    """What the sidecar knows about one engine instance (one engine_id)."""

    engine_id: str
    info: EngineInfo | None = None
    anchor_wall_ns: int | None = None  # wall clock at anchor_mono_ns, from hello/heartbeat
    anchor_mono_ns: int | None = None
    last_seq: int = -1
    first_seq: int = -1  # seq of the first frame this sidecar saw (> 0: it joined late)
    messages: int = 0
    lost_messages: int = 0  # seq gaps
    out_of_order: int = 0  # seq not increasing without a restart
    engine_dropped_messages: int = 0  # as reported by the emitter (EmitterStats)
    engine_dropped_events: int = 0
    engine_sent_messages: int = 0
    engine_oversized_messages: int = 0
    implausible_seq: int = 0  # frames refused for a seq jump past max_seq_jump
    pending_jump_seq: int = -2  # seq of the last refused jump (its successor confirms it)
    saw_hello: bool = False
    shut_down: bool = False  # sent Shutdown: it exited on purpose
    last_seen_wall_ns: int = field(default_factory=time.time_ns)

    def to_wall_ns(self, mono_ns: int) -> int:
        """Engine monotonic time -> wall time, via the latest clock anchor.

        Before any anchor arrives, assume the engine's clock is this machine's monotonic clock
        (true for an engine on the same host, which is the common case).
        """
        if self.anchor_wall_ns is None or self.anchor_mono_ns is None:
            return mono_ns + (time.time_ns() - time.monotonic_ns())
        return self.anchor_wall_ns + (mono_ns - self.anchor_mono_ns)

    def same_identity(self, info: EngineInfo) -> bool:
        """Another engine_id with this identity means this engine restarted."""
        mine = self.info
        return mine is not None and (
            mine.hostname,
            mine.model,
            mine.engine_type,
            mine.tp_rank,
            mine.pp_rank,
            mine.dp_rank,
        ) == (info.hostname, info.model, info.engine_type, info.tp_rank, info.pp_rank, info.dp_rank)


@dataclass
class Observation:
    """What one frame told the registry."""

    record: EngineRecord
    new_engine: bool = False
    gap: int = 0  # messages lost just before this one
    duplicate: bool = False  # seq already seen: caller should skip the frame
    implausible: bool = False  # seq jumped implausibly far ahead: refused (caller skips)
    restarted: bool = False  # same engine_id re-sent a hello with a lower seq
    replaced: list[EngineRecord] = field(default_factory=list)  # older instances it replaces


class EngineRegistry:
    def __init__(
        self,
        max_engines: int = 1024,
        restart_stale_s: float = DEFAULT_RESTART_STALE_S,
        max_seq_jump: int = DEFAULT_MAX_SEQ_JUMP,
    ) -> None:
        if max_engines < 1:
            raise ValueError("max_engines must be >= 1")
        self.max_engines = max_engines
        self.restart_stale_ns = int(restart_stale_s * 1e9)
        self.max_seq_jump = max_seq_jump
        self.implausible_seq_total = 0
        self._engines: OrderedDict[str, EngineRecord] = OrderedDict()
        self.evicted_engines = 0
        self.lost_messages_total = 0
        self.restarts_total = 0

    def __len__(self) -> int:
        return len(self._engines)

    def __iter__(self) -> Iterator[EngineRecord]:
        return iter(list(self._engines.values()))

    def get(self, engine_id: str) -> EngineRecord | None:
        return self._engines.get(engine_id)

    def observe(self, frame: DecodedFrame) -> Observation:
        """Account for one frame: seq gaps, restarts, identity and clock anchors."""
        hello = next((e for e in frame.events if isinstance(e, EngineHello)), None)
        record = self._engines.get(frame.engine_id)
        obs: Observation
        if record is None:
            record = EngineRecord(frame.engine_id, first_seq=frame.seq)
            self._remember(record)
            # NOTE: no gap on first sight. Frames before it went to an earlier sidecar or were
            # dropped by the emitter, which reports those itself (EmitterStats).
            obs = Observation(record, new_engine=True)
        else:
            self._engines.move_to_end(frame.engine_id)
            obs = Observation(record)
            expected = record.last_seq + 1
            jump = frame.seq - expected
            if jump > self.max_seq_jump and frame.seq != record.pending_jump_seq + 1:
                # One forged frame with a huge seq would make every later real frame a
                # "duplicate" (issue 18). Refuse it, counted; a real engine's next frame
                # continues right after it, and then the jump is taken as a gap.
                record.pending_jump_seq = frame.seq
                record.implausible_seq += 1
                self.implausible_seq_total += 1
                obs.implausible = obs.duplicate = True  # the sidecar skips duplicates
                return obs
            if frame.seq >= expected:
                obs.gap = frame.seq - expected
            elif hello is not None:
                # Same id counting from a lower seq, with a hello: a new instance (an engine
                # restarted with a fixed engine_id).
                obs.restarted = True
                self.restarts_total += 1
                record.shut_down = False
            elif expected - frame.seq > self.max_seq_jump:
                # Far behind: the frame we believed first was the forged one. Follow the
                # engine's real seq again (no gap counted), counted.
                record.implausible_seq += 1
                self.implausible_seq_total += 1
            else:
                obs.duplicate = True
                record.out_of_order += 1
                return obs
        record.lost_messages += obs.gap
        self.lost_messages_total += obs.gap
        record.last_seq = frame.seq
        record.messages += 1
        now = time.time_ns()
        record.last_seen_wall_ns = now
        for ev in frame.events:
            if isinstance(ev, EngineHello | Heartbeat):
                record.anchor_wall_ns = ev.wall_ns
                record.anchor_mono_ns = ev.ts
                if record.info is None and isinstance(ev, EngineHello):
                    obs.replaced = self._replaced_by(record, ev.info, now)
                record.info = ev.info
                record.saw_hello = record.saw_hello or isinstance(ev, EngineHello)
            elif isinstance(ev, EmitterStats):
                record.engine_dropped_messages = ev.dropped_messages
                record.engine_dropped_events = ev.dropped_events
                record.engine_sent_messages = ev.sent_messages
                record.engine_oversized_messages = ev.oversized_messages
            elif isinstance(ev, Shutdown):
                record.shut_down = True
        return obs

    def forget(self, engine_id: str) -> EngineRecord | None:
        return self._engines.pop(engine_id, None)

    def _replaced_by(self, record: EngineRecord, info: EngineInfo, now: int) -> list[EngineRecord]:
        """Older engine_ids with the same identity that exited or went silent: the engine
        restarted under a new id."""
        old = [
            r
            for r in self._engines.values()
            if r.engine_id != record.engine_id
            and r.same_identity(info)
            and (r.shut_down or now - r.last_seen_wall_ns >= self.restart_stale_ns)
        ]
        for r in old:
            self._engines.pop(r.engine_id, None)
            self.restarts_total += 1
        return old

    def _remember(self, record: EngineRecord) -> None:
        self._engines[record.engine_id] = record
        while len(self._engines) > self.max_engines:
            self._engines.popitem(last=False)
            self.evicted_engines += 1
