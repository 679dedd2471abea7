"""Per-engine state machine: raw events -> OTel spans (optional) and metric updates.

One EngineAssembler per engine_id. Only the processing thread calls it. Span times come from
the engine's clock (``ts + wall_offset_ns``, the offset from the engine's clock anchor);
timeouts use the sidecar's receive clock.

Spans: ``batch <mode>`` per forward_iter (BatchLaunched -> BatchDone); ``text_completion
<model>`` per request (ReqQueued -> end) with child phase spans ``queued`` / ``prefill`` /
``decode`` and links to the first and last few batch spans it ran in; ``pause``, ``idle``,
``weights_update``, ``profile``, ``cache_flush``, ``memory_check``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schedscope.telemetry.engines import EngineRecord
from schedscope.telemetry.kv_batcher import KvBatcher, KvBatchingConfig, flush_kv_batches_on_idle
from schedscope.telemetry.kv_sinks import KvSink
from schedscope.telemetry.metric_store import (
    EngineMetrics,
    release_gen_throughput_after_pause,
    set_gen_throughput_from_decode,
    zero_gen_throughput_on_pause,
)
from schedscope.telemetry.schema import (
    MODE_DECODE,
    AllBlocksCleared,
    BatchDone,
    BatchLaunched,
    BlockRemoved,
    BlockStored,
    CacheFlush,
    EngineInfo,
    Event,
    IdleBegin,
    IdleEnd,
    KvEvents,
    KvLoad,
    MemoryCheck,
    Paused,
    ProfileBegin,
    ProfileEnd,
    ReqAborted,
    ReqFinished,
    ReqFirstToken,
    ReqQueued,
    ReqRetracted,
    Resumed,
    Shutdown,
    WeightsUpdateBegin,
    WeightsUpdateEnd,
)
from schedscope.telemetry.spans import end_span, engine_tracer

_propagator = TraceContextTextMapPropagator()
# Media counted as the device cache (None: an engine that does not say).
_DEVICE_MEDIA = frozenset({None, "GPU", "cuda", "CUDA"})
_NS = 1e-9

QUEUED, PREFILL, DECODE = "queued", "prefill", "decode"


@dataclass(frozen=True)
class AssemblerConfig:
    batch_timeout_ns: int = 60_000_000_000  # a BatchDone later than this will not come
    max_open_batches: int = 4096
    # In-flight requests per engine (~6.6 KiB each, so ~130 MiB at the bound); beyond it the
    # oldest is dropped, its span ended with error status, and counted.
    max_requests: int = 20_000
    batch_links: int = 4  # a request links to its first and last N batch spans
    recent_iters: int = 4096  # done forward_iters remembered to spot duplicates
    kv: KvBatchingConfig = field(default_factory=KvBatchingConfig)


class OpenBatch:
    __slots__ = ("launch_ts", "mode", "recv_ns", "rids", "span")

    def __init__(self, mode: str, rids: list[str], launch_ts: int, recv_ns: int, span) -> None:
        self.mode = mode
        self.rids = rids
        self.launch_ts = launch_ts
        self.recv_ns = recv_ns
        self.span = span


class ReqState:
    __slots__ = (
        "first_links",
        "first_token_ts",
        "last_links",
        "last_token_ts",
        "launched",
        "n_links",
        "phase",
        "phase_span",
        "queued_ts",
        "span",
    )

    def __init__(self, queued_ts: int) -> None:
        self.queued_ts = queued_ts
        self.phase = QUEUED
        self.launched = False
        self.first_token_ts: int | None = None
        self.last_token_ts: int | None = None
        self.span = None
        self.phase_span = None
        self.first_links: list = []
        self.last_links: deque | None = None
        self.n_links = 0


class EngineAssembler:
    def __init__(
        self,
        record: EngineRecord,
        metrics: EngineMetrics,
        tracer_provider,  # opentelemetry.sdk.trace.TracerProvider | None
        sinks: list[KvSink],
        config: AssemblerConfig,
    ) -> None:
        self.engine_id = record.engine_id
        self.record = record
        self.m = metrics
        self.config = config
        self._tracer_provider = tracer_provider
        self.tracer: trace.Tracer | None = None
        self.info: EngineInfo | None = None
        self.model = ""
        self.kv = KvBatcher(
            record.engine_id,
            None,
            sinks,
            config.kv,
            on_flush=lambda trigger: self._inc(self.m.kv_batches(trigger)),
            on_sink_error=lambda name: self._inc(self.m.kv_sink_errors(name)),
        )
        self.off_ns = 0  # engine monotonic -> wall, for the frame being processed
        self.recv_ns = 0  # sidecar wall clock when that frame arrived
        self.last_wall_ns = 0  # wall time of the latest event seen
        self._handlers = {
            BatchLaunched: self._batch_launched,
            BatchDone: self._batch_done,
            KvEvents: self._kv_events,
            ReqQueued: self._req_queued,
            ReqFirstToken: self._req_first_token,
            ReqFinished: self._req_finished,
            ReqAborted: self._req_aborted,
            ReqRetracted: self._req_retracted,
            Paused: self._paused,
            Resumed: self._resumed,
            IdleBegin: self._idle_begin,
            IdleEnd: self._idle_end,
            KvLoad: self._kv_load,
            MemoryCheck: self._memory_check,
            CacheFlush: self._cache_flush,
            WeightsUpdateBegin: self._weights_begin,
            WeightsUpdateEnd: self._weights_end,
            ProfileBegin: self._profile_begin,
            ProfileEnd: self._profile_end,
            Shutdown: self._shutdown,
        }
        self._reset_state()
        self._per_mode: dict[str, tuple] = {}
        self._decode_tokens = metrics.realtime_tokens("decode")
        self.set_info(record.info)

    def _reset_state(self) -> None:
        self.batches: OrderedDict[int, OpenBatch] = OrderedDict()
        self.done_iters: set[int] = set()
        self.last_launched: int | None = None
        self._lost_at_last_launch = self.record.lost_messages
        self.reqs: OrderedDict[str, ReqState] = OrderedDict()
        self.pause_span = None
        self.idle_span = None
        self.idle_start_ts: int | None = None
        self.weights: tuple[object, int, str] | None = None  # (span, start ts, source)
        self.profile_span = None
        self.kv_cached_blocks = 0
        self._cohort_rids: list[str] | None = None  # see _observe_itl
        self._cohort_ts = 0
        self._cohort_ctx: trace.SpanContext | None = None

    # -- identity ------------------------------------------------------------------------

    def set_info(self, info: EngineInfo | None) -> None:
        old = self.info
        self.info = info
        if info is None:
            if self._tracer_provider is not None and self.tracer is None:
                self.tracer = engine_tracer(self._tracer_provider, self.engine_id, None)
            return
        self.model = info.model
        self.kv.dp_rank = info.dp_rank
        self.m.relabel(engine_label_values(self.engine_id, info))
        if self._tracer_provider is not None and (
            self.tracer is None or old is None or _resource_key(old) != _resource_key(info)
        ):
            self.tracer = engine_tracer(self._tracer_provider, self.engine_id, info)

    # -- entry points --------------------------------------------------------------------

    def process(self, events: list[Event], off_ns: int, recv_ns: int) -> None:
        self.off_ns = off_ns
        self.recv_ns = recv_ns
        handlers = self._handlers
        for ev in events:
            h = handlers.get(type(ev))
            if h is not None:  # hello/heartbeat/emitter stats: handled by the registry
                h(ev)
        if events:
            self.m.events.value += len(events)
            last = events[-1].ts + off_ns
            if last > self.last_wall_ns:
                self.last_wall_ns = last

    def tick(self, now_ns: int) -> None:
        """Time-based work: KV window flushes, batches whose BatchDone never came, and idle
        time accrued so far (so the idle-seconds counter grows while an idle span is open)."""
        self.kv.tick(now_ns)
        if self.idle_start_ts is not None:
            # Only up to the engine's latest event (heartbeats keep coming while it idles):
            # the sidecar's own clock may already be past an IdleEnd still in flight.
            now_engine = min(now_ns, self.last_wall_ns) - self.off_ns
            if now_engine > self.idle_start_ts:
                self.m.idle_seconds.value += (now_engine - self.idle_start_ts) * _NS
                self.idle_start_ts = now_engine
        limit = now_ns - self.config.batch_timeout_ns
        batches = self.batches
        while batches:
            fi, b = next(iter(batches.items()))
            if b.recv_ns > limit:
                break
            del batches[fi]
            self._force_end_batch(fi, b, "timeout")

    def close_all(self, reason: str, end_wall_ns: int | None = None) -> None:
        """Engine shut down / restarted / forgotten, or sidecar closing: end everything open.
        Batches and requests still open end with error status; pause, idle and admin spans
        end normally (they were not failures). Pending KV events go out."""
        end = max(end_wall_ns or 0, self.last_wall_ns)
        self.kv.flush(reason)
        for fi, b in list(self.batches.items()):
            self._force_end_batch(fi, b, reason, end)
        for r in list(self.reqs.values()):
            self._force_end_request(r, reason, end)
        for attr, kind in (
            ("pause_span", "pause"),
            ("idle_span", "idle"),
            ("profile_span", "admin"),
        ):
            span = getattr(self, attr)
            if span is not None:
                end_span(span, end)
                self._inc(self.m.spans_force_ended(kind, reason))
        if self.weights is not None and self.weights[0] is not None:
            end_span(self.weights[0], end, f"engine {reason} during weight update")  # type: ignore[arg-type]
            self._inc(self.m.spans_force_ended("admin", reason))
        if self.idle_start_ts is not None:
            self.m.idle_seconds.value += max(0, end - self.off_ns - self.idle_start_ts) * _NS
        self.m.zero_gauges()
        release_gen_throughput_after_pause(self.m)
        self._reset_state()

    # -- batches (forward_iter is the identity: seed 002) ---------------------------------

    def _anomaly(self, kind: str) -> None:
        self.m.forward_iter_anomalies(kind).value += 1

    def _batch_launched(self, ev: BatchLaunched) -> None:
        fi = ev.forward_iter
        if fi in self.batches or fi in self.done_iters:
            self._anomaly("duplicate")  # first launch wins; nothing double-counted
            return
        last = self.last_launched
        lost = self.record.lost_messages
        if last is not None:
            if fi < last:
                self._anomaly("backwards")
            elif fi > last + 1 and lost == self._lost_at_last_launch:
                self._anomaly("gap")  # no lost message to explain the skipped iters
        if last is None or fi > last:
            self.last_launched = fi
        self._lost_at_last_launch = lost
        if self.idle_span is not None:  # IdleEnd lost: a launch means not idle
            self._idle_end(ev)
        span = None
        mode = ev.mode
        tracer = self.tracer
        if tracer is not None:
            span = tracer.start_span(
                "batch " + mode,
                start_time=ev.ts + self.off_ns,
                attributes={
                    "schedscope.forward_iter": fi,
                    "schedscope.batch.mode": mode,
                    "schedscope.batch.num_reqs": len(ev.rids),
                    "schedscope.batch.num_tokens": ev.num_tokens,
                },
            )
        batches = self.batches
        batches[fi] = OpenBatch(mode, ev.rids, ev.ts, self.recv_ns, span)
        if len(batches) > self.config.max_open_batches:
            old_fi, old = batches.popitem(last=False)
            self._force_end_batch(old_fi, old, "evicted")
        if mode == MODE_DECODE and span is None:
            return  # nothing per request to do: no phase change, no links
        reqs = self.reqs
        link_ctx = span.get_span_context() if span is not None else None
        for rid in ev.rids:
            r = reqs.get(rid)
            if r is None:
                continue
            if r.phase == QUEUED and mode != MODE_DECODE:
                if not r.launched:
                    r.launched = True
                    self.m.queue_time.observe((ev.ts - r.queued_ts) * _NS, 1, _ctx(r.span))
                self._phase(r, PREFILL, ev.ts)
            if link_ctx is not None:
                self._add_link(r, link_ctx)

    def _batch_done(self, ev: BatchDone) -> None:
        fi = ev.forward_iter
        b = self.batches.pop(fi, None)
        if b is None:
            if fi in self.done_iters:
                self._anomaly("duplicate")
                return
            self._anomaly("done_without_launch")  # launch lost: the stats are still real
        self._remember_done(fi)
        m = self.m
        mode = ev.mode
        per_mode = self._per_mode.get(mode)
        if per_mode is None:  # cached: no Labelled lookup per batch
            per_mode = self._per_mode[mode] = (m.forward_iterations(mode), m.batch_seconds(mode))
        per_mode[0].value += 1
        if b is not None and ev.ts > b.launch_ts:
            per_mode[1].value += (ev.ts - b.launch_ts) * _NS
        p = ev.prefill
        if p is not None:
            m.num_running_reqs.value = p.running_reqs
            m.num_queue_reqs.value = p.queued_reqs
            m.token_usage.value = p.token_usage
            rt = m.realtime_tokens
            rt("prefill_compute").value += p.new_tokens
            rt("prefill_cache").value += p.cached_tokens
            total = p.new_tokens + p.cached_tokens
            if total > 0:
                m.cache_hit_rate.value = p.cached_tokens / total
        d = ev.decode
        if d is not None:
            m.num_running_reqs.value = d.running_reqs
            m.num_queue_reqs.value = d.queued_reqs
            m.token_usage.value = d.token_usage
            m.num_used_tokens.value = d.num_tokens
            m.spec_accept_length.value = d.spec_accept_length
            m.is_cuda_graph.value = 1.0 if d.cuda_graph else 0.0
            self._decode_tokens.value += d.generated_tokens
            set_gen_throughput_from_decode(m, d.gen_throughput)
            if b is not None and b.rids:
                self._observe_itl(b.rids, ev.ts, d.generated_tokens)
        if b is not None and b.span is not None:
            span = b.span
            if p is not None:
                span.set_attributes(
                    {
                        "schedscope.prefill.new_seqs": p.new_seqs,
                        "schedscope.prefill.new_tokens": p.new_tokens,
                        "schedscope.prefill.cached_tokens": p.cached_tokens,
                        "schedscope.prefill.chunked_reqs": p.chunked_reqs,
                        "schedscope.batch.running_reqs": p.running_reqs,
                        "schedscope.batch.queued_reqs": p.queued_reqs,
                        "schedscope.batch.token_usage": p.token_usage,
                    }
                )
            if d is not None:
                span.set_attributes(
                    {
                        "schedscope.decode.kv_tokens": d.num_tokens,
                        "schedscope.decode.generated_tokens": d.generated_tokens,
                        "schedscope.decode.gen_throughput": d.gen_throughput,
                        "schedscope.decode.spec_accept_length": d.spec_accept_length,
                        "schedscope.decode.cuda_graph": d.cuda_graph,
                        "schedscope.batch.running_reqs": d.running_reqs,
                        "schedscope.batch.queued_reqs": d.queued_reqs,
                        "schedscope.batch.token_usage": d.token_usage,
                    }
                )
            span.end(end_time=ev.ts + self.off_ns)

    def _observe_itl(self, rids: list[str], ts: int, generated: int) -> None:
        """One inter-token latency per request of the batch: time since its previous token.
        Requests whose previous token came at the same moment share one weighted observe."""
        n = len(rids)
        per_req = generated / n if generated > n else 1.0  # > 1 under speculative decoding
        itl = self.m.itl
        # NOTE: fast path. In steady decode the batch holds exactly the requests of the previous
        # decode batch (the "cohort"), whose previous token all came at the cohort's time: one
        # C-level list compare instead of a lookup per request. Per-request times are written
        # back (materialized) only when the cohort changes.
        if rids == self._cohort_rids:
            interval = (ts - self._cohort_ts) * _NS
            self._cohort_ts = ts
            ctx = self._cohort_ctx
            if per_req > 1.0:
                itl.observe(interval / per_req, round(n * per_req), ctx)
            else:
                itl.observe(interval, n, ctx)
            return
        self._materialize_cohort()
        reqs = self.reqs
        groups: dict[int, int] = {}
        last_r = None
        for rid in rids:
            r = reqs.get(rid)
            if r is None:
                continue
            prev = r.last_token_ts
            if prev is None:
                continue
            r.last_token_ts = ts
            groups[prev] = groups.get(prev, 0) + 1
            last_r = r
        ctx = _ctx(last_r.span) if last_r is not None else None
        if sum(groups.values()) == n:  # every request had a previous token: a new cohort
            self._cohort_rids = rids
            self._cohort_ts = ts
            self._cohort_ctx = ctx
        for prev, k in groups.items():
            interval = (ts - prev) * _NS
            if per_req > 1.0:
                itl.observe(interval / per_req, round(k * per_req), ctx)
            else:
                itl.observe(interval, k, ctx)

    def _materialize_cohort(self) -> None:
        rids = self._cohort_rids
        if rids is None:
            return
        ts = self._cohort_ts
        reqs = self.reqs
        for rid in rids:
            r = reqs.get(rid)
            if r is not None and r.last_token_ts is not None and r.last_token_ts < ts:
                r.last_token_ts = ts
        self._cohort_rids = None

    def _remember_done(self, fi: int) -> None:
        done = self.done_iters
        done.add(fi)
        if len(done) > 2 * self.config.recent_iters:
            # Amortized pruning: keep the newest recent_iters (forward_iters mostly increase).
            self.done_iters = set(sorted(done)[-self.config.recent_iters :])

    def _force_end_batch(self, fi: int, b: OpenBatch, reason: str, end: int | None = None) -> None:
        self._remember_done(fi)  # a late BatchDone is then a duplicate, not a new batch
        if b.span is not None:
            when = max(end if end is not None else self.last_wall_ns, b.launch_ts + self.off_ns)
            end_span(b.span, when, f"BatchDone never arrived ({reason})")
        self._inc(self.m.spans_force_ended("batch", reason))

    # -- requests --------------------------------------------------------------------------

    def _req_queued(self, ev: ReqQueued) -> None:
        reqs = self.reqs
        if ev.rid in reqs:
            return  # duplicate
        r = ReqState(ev.ts)
        tracer = self.tracer
        if tracer is not None:
            parent = None
            if ev.traceparent:
                carrier = {"traceparent": ev.traceparent}
                if ev.tracestate:
                    carrier["tracestate"] = ev.tracestate
                parent = _propagator.extract(carrier)
            attrs: dict[str, str | int] = {
                "gen_ai.operation.name": "text_completion",
                "gen_ai.provider.name": "schedscope",
                "gen_ai.request.model": self.model,
                "gen_ai.response.id": ev.rid,
                "gen_ai.usage.input_tokens": ev.prompt_tokens,
                "schedscope.rid": ev.rid,
            }
            if ev.max_new_tokens:
                attrs["gen_ai.request.max_tokens"] = ev.max_new_tokens
            r.span = tracer.start_span(
                f"text_completion {self.model}".rstrip(),
                context=parent,
                kind=SpanKind.SERVER,
                start_time=ev.ts + self.off_ns,
                attributes=attrs,
            )
            r.phase_span = self._start_phase(r, QUEUED, ev.ts)
        reqs[ev.rid] = r
        if len(reqs) > self.config.max_requests:
            _, old = reqs.popitem(last=False)
            self.m.requests_evicted.value += 1
            self._force_end_request(old, "evicted", self.last_wall_ns)

    def _req_first_token(self, ev: ReqFirstToken) -> None:
        r = self.reqs.get(ev.rid)
        if r is None or r.first_token_ts is not None:
            return
        r.first_token_ts = r.last_token_ts = ev.ts
        self.m.ttft.observe((ev.ts - r.queued_ts) * _NS, 1, _ctx(r.span))
        if r.span is not None and ev.cached_tokens:
            r.span.set_attribute("gen_ai.usage.cache_read.input_tokens", ev.cached_tokens)
        self._phase(r, DECODE, ev.ts)

    def _req_finished(self, ev: ReqFinished) -> None:
        m = self.m
        m.prompt_tokens.value += ev.prompt_tokens
        m.generation_tokens.value += ev.output_tokens
        m.num_requests.value += 1
        m.requests_by_reason(ev.finish_reason).value += 1
        if ev.finish_reason == "abort":
            m.aborted_requests.value += 1
        r = self.reqs.pop(ev.rid, None)
        if r is None:
            return
        ctx = _ctx(r.span)
        m.e2e.observe((ev.ts - r.queued_ts) * _NS, 1, ctx)
        if r.first_token_ts is not None and ev.output_tokens > 1:
            m.tpot.observe((ev.ts - r.first_token_ts) * _NS / (ev.output_tokens - 1), 1, ctx)
        if r.span is not None:
            attrs: dict[str, object] = {
                "gen_ai.usage.input_tokens": ev.prompt_tokens,
                "gen_ai.usage.output_tokens": ev.output_tokens,
                "gen_ai.response.finish_reasons": [ev.finish_reason],
                "schedscope.streaming": ev.streaming,
            }
            if ev.cached_tokens:
                attrs["gen_ai.usage.cache_read.input_tokens"] = ev.cached_tokens
            r.span.set_attributes(attrs)  # type: ignore[arg-type]
            self._end_request(r, ev.ts + self.off_ns)

    def _req_aborted(self, ev: ReqAborted) -> None:
        m = self.m
        m.generation_tokens.value += ev.output_tokens
        m.num_requests.value += 1
        m.requests_by_reason("abort").value += 1
        m.aborted_requests.value += 1
        r = self.reqs.pop(ev.rid, None)
        if r is not None and r.span is not None:
            r.span.set_attributes(
                {
                    "gen_ai.usage.output_tokens": ev.output_tokens,
                    "gen_ai.response.finish_reasons": ["abort"],
                    "schedscope.abort_reason": ev.reason,
                }
            )
            self._end_request(r, ev.ts + self.off_ns)

    def _req_retracted(self, ev: ReqRetracted) -> None:
        self.m.retracted_requests.value += 1
        r = self.reqs.get(ev.rid)
        if r is None:
            return
        if r.span is not None:
            r.span.add_event(
                "retracted",
                {
                    "schedscope.output_tokens": ev.output_tokens,
                    "schedscope.freed_tokens": ev.freed_tokens,
                },
                timestamp=ev.ts + self.off_ns,
            )
        self._phase(r, QUEUED, ev.ts)

    def _phase(self, r: ReqState, phase: str, ts: int) -> None:
        if r.phase == phase:
            return
        r.phase = phase
        if r.phase_span is not None:
            r.phase_span.end(end_time=ts + self.off_ns)
            r.phase_span = self._start_phase(r, phase, ts)

    def _start_phase(self, r: ReqState, phase: str, ts: int):
        assert self.tracer is not None
        return self.tracer.start_span(
            phase, context=trace.set_span_in_context(r.span), start_time=ts + self.off_ns
        )

    def _add_link(self, r: ReqState, ctx: trace.SpanContext) -> None:
        r.n_links += 1
        n = self.config.batch_links
        if len(r.first_links) < n:
            r.first_links.append(ctx)
        else:
            if r.last_links is None:
                r.last_links = deque(maxlen=n)
            r.last_links.append(ctx)

    def _end_request(self, r: ReqState, end_wall: int, error: str | None = None) -> None:
        span = r.span
        if span is None:
            return
        if r.phase_span is not None:
            end_span(r.phase_span, end_wall)
        # Links go on at the end: only then are the first and last few known (bounded).
        for ctx in r.first_links:
            span.add_link(ctx, {"schedscope.link": "first"})
        for ctx in r.last_links or ():
            span.add_link(ctx, {"schedscope.link": "last"})
        span.set_attribute("schedscope.batches", r.n_links)
        end_span(span, end_wall, error)

    def _force_end_request(self, r: ReqState, reason: str, end: int) -> None:
        self._inc(self.m.spans_force_ended("request", reason))
        self._end_request(
            r, max(end, r.queued_ts + self.off_ns), f"request did not finish ({reason})"
        )

    # -- pause / idle (seed 000 and DESIGN §5) -----------------------------------------------

    def _paused(self, ev: Paused) -> None:
        if self.pause_span is not None:
            return  # already paused: one span
        zero_gen_throughput_on_pause(self.m)
        flush_kv_batches_on_idle(self.kv, "pause")
        m = self.m
        m.paused.value = 1.0
        m.pauses(ev.mode).value += 1
        if self.tracer is not None:
            self.pause_span = self.tracer.start_span(
                "pause",
                start_time=ev.ts + self.off_ns,
                attributes={"schedscope.pause.mode": ev.mode, "schedscope.pause.reason": ev.reason},
            )
        else:
            self.pause_span = _NO_SPAN

    def _resumed(self, ev: Resumed) -> None:
        self.m.paused.value = 0.0
        release_gen_throughput_after_pause(self.m)
        if self.pause_span is not None:
            self.pause_span.end(end_time=ev.ts + self.off_ns)
            self.pause_span = None

    def _idle_begin(self, ev: IdleBegin) -> None:
        if self.idle_span is not None:
            return
        flush_kv_batches_on_idle(self.kv, "idle")
        m = self.m
        m.idle.value = 1.0
        m.gen_throughput.value = 0.0  # fully idle: nothing generates (SGLang zeroes it too)
        # Fully idle means no request runs or waits: any still open lost its end event.
        for r in list(self.reqs.values()):
            self._force_end_request(r, "idle", ev.ts + self.off_ns)
        self.reqs.clear()
        self.idle_start_ts = ev.ts
        if self.tracer is not None:
            self.idle_span = self.tracer.start_span("idle", start_time=ev.ts + self.off_ns)
        else:
            self.idle_span = _NO_SPAN

    def _idle_end(self, ev: Event) -> None:
        self.m.idle.value = 0.0
        if self.idle_start_ts is not None:
            self.m.idle_seconds.value += max(0, ev.ts - self.idle_start_ts) * _NS
            self.idle_start_ts = None
        if self.idle_span is not None:
            self.idle_span.end(end_time=ev.ts + self.off_ns)
            self.idle_span = None

    # -- KV ----------------------------------------------------------------------------------

    def _kv_events(self, ev: KvEvents) -> None:
        stored = removed = 0
        cached = self.kv_cached_blocks
        m = self.m
        for e in ev.events:
            t = type(e)
            if t is BlockStored or t is BlockRemoved:
                k = len(e.block_hashes)  # type: ignore[union-attr]
                # Occupancy is the device tier's; the CPU offload tier has its own events.
                on_device = e.medium in _DEVICE_MEDIA  # type: ignore[union-attr]
                if t is BlockStored:
                    stored += k
                    cached += k if on_device else 0
                else:
                    removed += k
                    cached -= k if on_device else 0
            elif t is AllBlocksCleared:
                cached = 0
                m.kv_cache_cleared.value += 1
        self.kv_cached_blocks = cached = max(cached, 0)
        m.kv_cached_blocks.value = cached
        m.kv_blocks_stored.value += stored
        m.kv_blocks_removed.value += removed
        self.kv.add(ev.events, ev.forward_iter, self.recv_ns)

    def _kv_load(self, ev: KvLoad) -> None:
        self.m.kv_active_blocks.value = ev.kv_active_blocks
        self.m.kv_total_blocks.value = ev.kv_total_blocks

    # -- admin actions -------------------------------------------------------------------------

    def _start_admin_span(self, name: str, start_ts: int, attrs: dict, parent=None):
        """An admin action's span (None when tracing is off); the caller ends it."""
        if self.tracer is None:
            return None
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        return self.tracer.start_span(
            name, context=ctx, start_time=start_ts + self.off_ns, attributes=attrs
        )

    def _memory_check(self, ev: MemoryCheck) -> None:
        leaked = ev.pool_size - ev.free_slots - ev.cached_slots - ev.in_use_slots
        m = self.m
        m.memory_checks("ok" if ev.ok else "leak").value += 1
        m.memory_leaked_slots.value = leaked
        m.memory_req_table_used.value = ev.req_table_used
        if self.tracer is None:
            return
        numbers = {
            "schedscope.memory.ok": ev.ok,
            "schedscope.memory.pool_size": ev.pool_size,
            "schedscope.memory.free_slots": ev.free_slots,
            "schedscope.memory.cached_slots": ev.cached_slots,
            "schedscope.memory.in_use_slots": ev.in_use_slots,
            "schedscope.memory.req_table_used": ev.req_table_used,
            "schedscope.memory.leaked_slots": leaked,
            "schedscope.memory.detail": ev.detail,
        }
        parent = self.idle_span if self.idle_span is not _NO_SPAN else None
        span = self._start_admin_span("memory_check", ev.ts, numbers, parent=parent)
        when = ev.ts + self.off_ns
        if not ev.ok:
            span.add_event("memory_leak", numbers, timestamp=when)
            if parent is not None:
                parent.add_event("memory_leak", numbers, timestamp=when)
        end_span(span, when, None if ev.ok else f"memory leak: {leaked} slots, {ev.detail}")

    def _cache_flush(self, ev: CacheFlush) -> None:
        self.m.cache_flushes("ok" if ev.ok else "refused").value += 1
        if self.tracer is None:
            return
        start = ev.start_ts or ev.ts
        span = self._start_admin_span(
            "cache_flush",
            start,
            {
                "schedscope.cache_flush.outcome": "ok" if ev.ok else "refused",
                "schedscope.cache_flush.reason": ev.reason,
            },
        )
        if not ev.ok:  # a refusal is the engine doing its job (not fully idle): not an error
            span.add_event(
                "refused", {"schedscope.reason": ev.reason}, timestamp=ev.ts + self.off_ns
            )
        end_span(span, ev.ts + self.off_ns)

    def _weights_begin(self, ev: WeightsUpdateBegin) -> None:
        if self.weights is not None:
            return
        span = self._start_admin_span(
            "weights_update", ev.ts, {"schedscope.weights.source": ev.source}
        )
        self.weights = (span, ev.ts, ev.source)

    def _weights_end(self, ev: WeightsUpdateEnd) -> None:
        m = self.m
        m.weight_updates("ok" if ev.ok else "error").value += 1
        if self.weights is None:
            return
        span, start, source = self.weights
        self.weights = None
        m.weight_load_duration(source).value = max(0, ev.ts - start) * _NS
        if span is not None:
            span.set_attribute("schedscope.weights.message", ev.message)  # type: ignore[attr-defined]
            end_span(
                span, ev.ts + self.off_ns, None if ev.ok else ev.message or "weight update failed"
            )  # type: ignore[arg-type]

    def _profile_begin(self, ev: ProfileBegin) -> None:
        if self.profile_span is not None:
            return
        attrs: dict[str, str | int] = {"schedscope.profile.output_dir": ev.output_dir}
        if ev.num_steps is not None:
            attrs["schedscope.profile.num_steps"] = ev.num_steps
        self.profile_span = self._start_admin_span("profile", ev.ts, attrs) or _NO_SPAN

    def _profile_end(self, ev: ProfileEnd) -> None:
        span = self.profile_span
        self.profile_span = None
        if span is not None and span is not _NO_SPAN:
            span.set_attribute("schedscope.profile.path", ev.path)
            end_span(span, ev.ts + self.off_ns, None if ev.ok else "profile failed")

    def _shutdown(self, ev: Shutdown) -> None:
        self.close_all("shutdown", ev.ts + self.off_ns)

    @staticmethod
    def _inc(series) -> None:
        series.value += 1


class _NoSpan:
    """Stands in for a span when tracing is off, so open/closed state is tracked the same."""

    def end(self, end_time: int | None = None) -> None:
        pass

    def set_status(self, *args) -> None:
        pass

    def add_event(self, *args, **kwargs) -> None:
        pass


_NO_SPAN = _NoSpan()


def _ctx(span) -> trace.SpanContext | None:
    return span.get_span_context() if span is not None else None


def _resource_key(info: EngineInfo) -> tuple:
    return (
        info.model,
        info.engine_type,
        info.tp_rank,
        info.pp_rank,
        info.dp_rank,
        info.hostname,
        info.pid,
        info.version,
    )


def engine_label_values(engine_id: str, info: EngineInfo | None) -> tuple[str, ...]:
    """model_name, engine_type, tp_rank, pp_rank, dp_rank, engine_id (metrics_table.ENGINE_LABELS)."""
    if info is None:
        return ("", "", "", "", "", engine_id)
    dp = "" if info.dp_rank is None else str(info.dp_rank)
    return (info.model, info.engine_type, str(info.tp_rank), str(info.pp_rank), dp, engine_id)


__all__ = ["AssemblerConfig", "EngineAssembler", "Link", "engine_label_values"]
