"""A Chrome trace-event JSON timeline of the scheduler (opens in ui.perfetto.dev).

An OTel ``SpanExporter``: plug it into the same TracerProvider as every other exporter. It keeps
a bounded list of compact records (``max_events``; what does not fit is counted as dropped) and
writes the whole file on ``force_flush()`` and ``shutdown()`` (atomically: temp file + rename).

Layout, one process (pid) per engine, named by its engine id:
- thread "scheduler": batch slices named ``"<mode> #<forward_iter>"``; with overlap scheduling
  batch N+1 starts before batch N ends, so overlapping batches go to extra lanes
  ("scheduler overlap 1", ...) — Chrome trace slices on one thread must nest;
- thread "state": pause and idle slices;
- thread "admin": other top-level spans (weight update, cache flush, memory check, profile);
- async track "requests": one slice per request span, its phase spans nested inside;
- counters ``gen_throughput``, ``running_reqs``, ``token_usage``, read from batch span
  attributes (any attribute key ending in those names); a pause slice sets gen_throughput to 0
  at its start (DESIGN §5).

Classification needs no import of the telemetry layer: a batch span has an attribute ending in
``forward_iter`` and its mode in ``*batch.mode`` or as the last word of its name ("batch decode"); pause/idle spans have "pause"/"idle" in their name; a
request span has a ``gen_ai.*`` attribute, an attribute ending in ``rid`` or a name starting
with "request"; the engine is the attribute ending in ``engine_id`` (else the resource's
``service.instance.id``, else "engine").
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from schedscope.exporters.stats import EXPORT_STATS, ExportStats

BATCH_MODES = ("prefill", "decode", "mixed")
COUNTER_KEYS = ("gen_throughput", "running_reqs", "token_usage")

TID_STATE = 100
TID_ADMIN = 101
TID_LANE0 = 1  # scheduler lanes: 1, 2, 3, ...


@dataclass(slots=True)
class _Rec:
    kind: str  # batch | pause | idle | request | phase | admin
    engine: str
    name: str
    start_ns: int  # wall clock, unix ns
    end_ns: int
    span_id: int
    parent_id: int | None
    args: dict[str, Any]


def _suffix(attrs: Mapping[str, Any], suffix: str) -> Any:
    for key, value in attrs.items():
        if key == suffix or key.endswith("." + suffix) or key.endswith("_" + suffix):
            return value
    return None


def _batch_mode(name: str, attrs: Mapping[str, Any]) -> str | None:
    """prefill/decode/mixed from a ``*batch.mode`` attribute or the span name ("batch decode")."""
    mode = _suffix(attrs, "batch.mode")
    if mode in BATCH_MODES:
        return str(mode)
    last = name.rsplit(" ", 1)[-1]
    return last if last in BATCH_MODES else None


def _plain(value: Any) -> Any:
    # NaN/Infinity are not JSON: written as null so the file stays loadable.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return [_plain(v) for v in value]  # OTel sequences (tuples) -> JSON arrays


class PerfettoSpanExporter(SpanExporter):
    """Collects spans; writes a Chrome trace-event JSON file on flush/shutdown."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_events: int = 1_000_000,
        name: str = "perfetto",
        stats: ExportStats = EXPORT_STATS,
    ) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.name = name
        self.stats = stats
        self._records: list[_Rec] = []
        self._lock = threading.Lock()
        self._shutdown = False
        self.dropped = 0
        self.origin_ns = 0

    # -- SpanExporter ---------------------------------------------------------------------

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        with self._lock:
            for span in spans:
                if len(self._records) >= self.max_events:
                    self.dropped += 1
                    self.stats.add("trace_events", self.name, "dropped")
                    continue
                self._records.append(self._record(span))
                self.stats.add("trace_events", self.name, "recorded")
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.write()
        return True

    def shutdown(self) -> None:
        if not self._shutdown:
            self.write()
            self._shutdown = True

    # -- classification -------------------------------------------------------------------

    def _record(self, span: ReadableSpan) -> _Rec:
        attrs = dict(span.attributes or {})
        engine = _suffix(attrs, "engine_id")
        if engine is None and span.resource is not None:
            engine = span.resource.attributes.get("service.instance.id")
        forward_iter = _suffix(attrs, "forward_iter")
        name = span.name
        lname = name.lower()
        parent = span.parent.span_id if span.parent is not None else None
        mode = _batch_mode(name, attrs) if forward_iter is not None else None
        if mode is not None:
            kind, label = "batch", f"{mode} #{forward_iter}"
        elif "pause" in lname:
            kind, label = "pause", name
        elif "idle" in lname:
            kind, label = "idle", name
        elif (
            lname.startswith("request")
            or _suffix(attrs, "rid") is not None
            or any(k.startswith("gen_ai.") for k in attrs)
        ):
            kind, label = "request", name
        else:
            kind, label = "admin", name
        sid = span.context.span_id if span.context is not None else id(span)
        start = span.start_time or 0
        end = span.end_time or start
        args = {k: _plain(v) for k, v in attrs.items()}
        return _Rec(kind, str(engine or "engine"), label, start, end, sid, parent, args)

    # -- output ---------------------------------------------------------------------------

    def trace_events(self) -> list[dict[str, Any]]:
        """The Chrome trace events for everything recorded so far."""
        with self._lock:
            records = sorted(self._records, key=lambda r: (r.start_ns, r.end_ns))
        # NOTE: microseconds since the first span, not since 1970: a double holding unix µs
        # only resolves 0.25 µs. The origin goes into otherData.origin_unix_ns.
        self.origin_ns = origin = records[0].start_ns if records else 0
        # A child of a request span is one of its phases (children end, and so arrive, first).
        request_ids = {r.span_id for r in records if r.kind == "request"}
        for r in records:
            if r.kind in ("request", "admin") and r.parent_id in request_ids:
                r.kind = "phase"
        pids: dict[str, int] = {}
        lanes: dict[str, list[float]] = {}  # engine -> end time of the last slice per lane
        events: list[dict[str, Any]] = []
        counters: list[dict[str, Any]] = []

        def pid_of(engine: str) -> int:
            if engine not in pids:
                pids[engine] = len(pids) + 1
                pid = pids[engine]
                events.append(
                    {
                        "ph": "M",
                        "name": "process_name",
                        "pid": pid,
                        "tid": 0,
                        "args": {"name": engine},
                    }
                )
                for tid, tname in (
                    (TID_LANE0, "scheduler"),
                    (TID_STATE, "state"),
                    (TID_ADMIN, "admin"),
                ):
                    events.append(
                        {
                            "ph": "M",
                            "name": "thread_name",
                            "pid": pid,
                            "tid": tid,
                            "args": {"name": tname},
                        }
                    )
            return pids[engine]

        def counter(pid: int, ts: float, key: str, value: Any) -> None:
            counters.append(
                {"ph": "C", "name": key, "pid": pid, "tid": 0, "ts": ts, "args": {"value": value}}
            )

        for r in records:
            pid = pid_of(r.engine)
            start_us = (r.start_ns - origin) / 1000.0
            end_us = (r.end_ns - origin) / 1000.0
            dur = max(end_us - start_us, 0.0)
            if r.kind == "batch":
                ends = lanes.setdefault(r.engine, [])
                lane = next((i for i, e in enumerate(ends) if e <= start_us), None)
                if lane is None:
                    lane = len(ends)
                    ends.append(end_us)
                    if lane > 0:
                        events.append(
                            {
                                "ph": "M",
                                "name": "thread_name",
                                "pid": pid,
                                "tid": TID_LANE0 + lane,
                                "args": {"name": f"scheduler overlap {lane}"},
                            }
                        )
                ends[lane] = end_us
                events.append(self._slice(r, pid, TID_LANE0 + lane, start_us, dur, "batch"))
                for key in COUNTER_KEYS:
                    value = _suffix(r.args, key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        counter(pid, end_us, key, value)
            elif r.kind in ("pause", "idle"):
                events.append(self._slice(r, pid, TID_STATE, start_us, dur, r.kind))
                if r.kind == "pause":  # DESIGN §5: gen_throughput is 0 for the whole pause
                    counter(pid, start_us, "gen_throughput", 0)
            elif r.kind in ("request", "phase"):
                aid = f"0x{(r.span_id if r.kind == 'request' else r.parent_id or 0):016x}"
                common = {"cat": "request", "id": aid, "pid": pid, "tid": 0, "name": r.name}
                events.append({**common, "ph": "b", "ts": start_us, "args": r.args})
                events.append({**common, "ph": "e", "ts": end_us})
            else:
                events.append(self._slice(r, pid, TID_ADMIN, start_us, dur, "admin"))
        return events + counters

    @staticmethod
    def _slice(r: _Rec, pid: int, tid: int, ts: float, dur: float, cat: str) -> dict[str, Any]:
        return {
            "ph": "X",
            "name": r.name,
            "cat": cat,
            "pid": pid,
            "tid": tid,
            "ts": ts,
            "dur": dur,
            "args": r.args,
        }

    def write(self) -> Path:
        events = self.trace_events()
        doc = {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {
                "producer": "schedscope",
                "origin_unix_ns": self.origin_ns,
                "dropped_spans": self.dropped,
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"), allow_nan=False)
        os.replace(tmp, self.path)
        return self.path
