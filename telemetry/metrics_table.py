"""The one table of schedscope's metrics: each row gives a metric's Prometheus name, OTLP name,
type, unit, labels, buckets and meaning. Both the prometheus_client view and the OTel metrics
view are built from it (``metric_store.py``), and the README's "Metrics reference" is generated
from it (``metrics_reference_markdown``).

Names: ``sglang:...`` where the meaning is SGLang's (so SGLang's dashboards work unchanged),
``schedscope:...`` for the rest. The OTel SDK refuses ``:`` in instrument names, so the OTLP
name is separate: GenAI semantic-convention names where one exists (``gen_ai.server.*``),
otherwise the Prometheus name with ``:`` → ``.`` and no ``_total``/``_seconds`` suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

GAUGE = "gauge"
COUNTER = "counter"
HISTOGRAM = "histogram"

# DESIGN §7: SGLang's scheduler labels plus engine_id. dp_rank is "" without DP (an empty label
# value is an absent label to Prometheus, which is how SGLang exports it).
ENGINE_LABELS: tuple[str, ...] = (
    "model_name",
    "engine_type",
    "tp_rank",
    "pp_rank",
    "dp_rank",
    "engine_id",
)

# SGLang's default buckets (0.5.23), so its dashboards' histogram_quantile() panels line up.
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040,
    0.060, 0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400,
    600, 1200, 1800, 2400,
)  # fmt: skip
QUEUE_BUCKETS = (
    0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60,
    70, 80, 90, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800,
    2000, 2500, 3000,
)  # fmt: skip


@dataclass(frozen=True)
class MetricDef:
    key: str  # the attribute name code uses (EngineMetrics.<key>)
    prom_name: str  # exposed name; counters include their `_total`
    otlp_name: str | None  # None: Prometheus only (see `note`)
    kind: str  # gauge / counter / histogram
    unit: str  # UCUM, for OTLP
    help: str
    labels: tuple[str, ...] = ()  # extra labels after the base ones
    buckets: tuple[float, ...] | None = None
    sglang: str = ""  # SGLang equivalent, for the README
    per_engine: bool = True  # False: sidecar-wide (ingest health), no engine labels
    note: str = ""

    @property
    def label_names(self) -> tuple[str, ...]:
        return (ENGINE_LABELS + self.labels) if self.per_engine else self.labels


def _d(*args, **kwargs) -> MetricDef:
    return MetricDef(*args, **kwargs)


S = "same"  # `sglang` column shorthand: the Prometheus name is SGLang's own

METRICS: tuple[MetricDef, ...] = (
    # --- scheduler state (from BatchDone stats) -------------------------------------------
    _d("gen_throughput", "sglang:gen_throughput", "sglang.gen_throughput", GAUGE, "{token}/s",
       "Generation throughput (token/s) from the latest decode batch; 0 from the moment a "
       "pause span opens until the first decode batch after it, and 0 while idle.", sglang=S),
    _d("num_running_reqs", "sglang:num_running_reqs", "sglang.num_running_reqs", GAUGE,
       "{request}", "Running requests (latest batch).", sglang=S),
    _d("num_queue_reqs", "sglang:num_queue_reqs", "sglang.num_queue_reqs", GAUGE, "{request}",
       "Requests in the waiting queue (latest batch).", sglang=S),
    _d("token_usage", "sglang:token_usage", "sglang.token_usage", GAUGE, "1",
       "KV pool usage 0-1 (latest batch).", sglang=S),
    _d("num_used_tokens", "sglang:num_used_tokens", "sglang.num_used_tokens", GAUGE, "{token}",
       "Tokens held in KV by the running requests (latest decode batch).", sglang=S),
    _d("cache_hit_rate", "sglang:cache_hit_rate", "sglang.cache_hit_rate", GAUGE, "1",
       "Prefix-cache hit rate of the latest prefill batch: cached / (cached + new) tokens.",
       sglang=S),
    _d("spec_accept_length", "sglang:spec_accept_length", "sglang.spec_accept_length", GAUGE,
       "{token}", "Speculative decoding: mean accepted length per verify step (latest decode "
       "batch).", sglang=S),
    _d("is_cuda_graph", "sglang:is_cuda_graph", "sglang.is_cuda_graph", GAUGE, "1",
       "1 if the latest decode batch ran a CUDA graph.", sglang=S),
    _d("realtime_tokens", "sglang:realtime_tokens_total", "sglang.realtime_tokens", COUNTER,
       "{token}", "Tokens processed by batches: prefill_compute (new), prefill_cache (cached), "
       "decode (generated).", labels=("mode",), sglang=S),
    _d("forward_iterations", "schedscope_forward_iterations_total",
       "schedscope.forward_iterations", COUNTER, "{batch}",
       "Completed batches (forward passes) by mode; duplicates are not counted.",
       labels=("mode",), sglang="(none; cf. cuda_graph_passes_total)"),
    _d("batch_seconds", "schedscope_batch_seconds_total", "schedscope.batch_time", COUNTER, "s",
       "Launch-to-done time of completed batches, by mode (busy time).", labels=("mode",),
       sglang="≈ sglang:forward_execution_seconds_total"),
    # --- pause / idle ---------------------------------------------------------------------
    _d("paused", "schedscope_paused", "schedscope.paused", GAUGE, "1",
       "1 while a pause span is open (pause_generation .. continue_generation).",
       sglang="(none)"),
    _d("pauses", "schedscope_pauses_total", "schedscope.pauses", COUNTER, "{pause}",
       "Pause spans opened, by pause mode (abort / retract / in_place).", labels=("mode",),
       sglang="(none)"),
    _d("idle", "schedscope_idle", "schedscope.idle", GAUGE, "1",
       "1 while an idle span is open (engine fully idle).", sglang="(none)"),
    _d("idle_seconds", "sglang:scheduler_idle_seconds_total", "sglang.scheduler_idle_time",
       COUNTER, "s", "Wall time spent fully idle (closed idle spans, plus the open one up to "
       "the last tick).", sglang=S),
    # --- requests (latency histograms, token and request counters) -------------------------
    _d("ttft", "sglang:time_to_first_token_seconds", "gen_ai.server.time_to_first_token",
       HISTOGRAM, "s", "Time to first token: ReqQueued -> ReqFirstToken.",
       buckets=TTFT_BUCKETS, sglang=S + " (no is_streaming label)"),
    _d("itl", "sglang:inter_token_latency_seconds", "sglang.inter_token_latency", HISTOGRAM, "s",
       "Inter-token latency: per request and decode batch, time since the request's previous "
       "token (divided by tokens per step under speculative decoding).",
       buckets=ITL_BUCKETS, sglang=S,
       note="OTLP histograms are built from the store at collection time, so per-token "
       "observations cost no OTel SDK call; gen_ai.server.time_per_output_token is the "
       "per-request view."),
    _d("tpot", "sglang:request_time_per_output_token_seconds",
       "gen_ai.server.time_per_output_token", HISTOGRAM, "s",
       "Per-request time per output token: (finish - first token) / (output tokens - 1).",
       buckets=ITL_BUCKETS, sglang=S + " (no is_streaming label)"),
    _d("e2e", "sglang:e2e_request_latency_seconds", "gen_ai.server.request.duration",
       HISTOGRAM, "s", "End-to-end request latency: ReqQueued -> ReqFinished/ReqAborted.",
       buckets=E2E_BUCKETS, sglang=S + " (no is_streaming label)"),
    _d("queue_time", "sglang:queue_time_seconds", "sglang.queue_time", HISTOGRAM, "s",
       "Time a request waited before its first batch launch.", buckets=QUEUE_BUCKETS,
       sglang=S),
    _d("prompt_tokens", "sglang:prompt_tokens_total", "sglang.prompt_tokens", COUNTER,
       "{token}", "Prompt tokens (cached included) of finished requests.",
       sglang=S + " (no is_streaming label)"),
    _d("generation_tokens", "sglang:generation_tokens_total", "sglang.generation_tokens",
       COUNTER, "{token}", "Generated tokens of finished and aborted requests.",
       sglang=S + " (no is_streaming label)"),
    _d("num_requests", "sglang:num_requests_total", "sglang.num_requests", COUNTER,
       "{request}", "Finished requests (any finish reason, aborts included).",
       sglang=S + " (no is_streaming label)"),
    _d("requests_by_reason", "schedscope_requests_finished_total",
       "schedscope.requests_finished", COUNTER, "{request}",
       "Finished requests by finish reason (length / stop / abort / ...).",
       labels=("finish_reason",), sglang="≈ vllm:request_success_total{finished_reason}"),
    _d("aborted_requests", "sglang:num_aborted_requests_total", "sglang.num_aborted_requests",
       COUNTER, "{request}", "Aborted requests.", sglang=S),
    _d("retracted_requests", "sglang:num_retracted_requests_total",
       "sglang.num_retracted_requests", COUNTER, "{request}",
       "Requests moved back to the queue (KV exhausted or pause retract).", sglang=S),
    # --- KV cache ------------------------------------------------------------------------
    _d("kv_blocks_stored", "schedscope_kv_blocks_stored_total", "schedscope.kv_blocks_stored",
       COUNTER, "{block}", "KV blocks stored (BlockStored hashes), all media.", sglang="(none)"),
    _d("kv_blocks_removed", "schedscope_kv_blocks_removed_total",
       "schedscope.kv_blocks_removed", COUNTER, "{block}",
       "KV blocks removed (BlockRemoved hashes), all media.", sglang="(none)"),
    _d("kv_cache_cleared", "schedscope_kv_cache_cleared_total", "schedscope.kv_cache_cleared",
       COUNTER, "{event}", "AllBlocksCleared events.", sglang="(none)"),
    _d("kv_cached_blocks", "schedscope_kv_cached_blocks", "schedscope.kv_cached_blocks", GAUGE,
       "{block}", "Blocks the engine's device (GPU) cache holds per its KV events (stored - "
       "removed since the last clear); CPU-tier blocks are not counted.", sglang="(none)"),
    _d("kv_batches", "schedscope_kv_batches_total", "schedscope.kv_batches", COUNTER,
       "{batch}", "KV batches delivered to sinks, by flush trigger (count / window / idle / "
       "pause / shutdown).", labels=("trigger",), sglang="(none)"),
    _d("kv_active_blocks", "schedscope_kv_active_blocks", "schedscope.kv_active_blocks", GAUGE,
       "{block}", "Active KV blocks (KvLoad, SGLang's KvMetrics).", sglang="(none)"),
    _d("kv_total_blocks", "schedscope_kv_total_blocks", "schedscope.kv_total_blocks", GAUGE,
       "{block}", "Total KV blocks (KvLoad).", sglang="(none; cf. max_total_num_tokens)"),
    # --- admin actions -------------------------------------------------------------------
    _d("memory_checks", "schedscope_memory_checks_total", "schedscope.memory_checks", COUNTER,
       "{check}", "Idle memory checks by result (ok / leak).", labels=("result",),
       sglang="(none)"),
    _d("memory_leaked_slots", "schedscope_memory_leaked_slots",
       "schedscope.memory_leaked_slots", GAUGE, "{slot}",
       "Latest memory check: pool - free - cached - in_use KV slots (0 when consistent).",
       sglang="(none)"),
    _d("memory_req_table_used", "schedscope_memory_req_table_used",
       "schedscope.memory_req_table_used", GAUGE, "{entry}",
       "Latest memory check: request->token table entries in use while idle (should be 0).",
       sglang="(none)"),
    _d("cache_flushes", "schedscope_cache_flushes_total", "schedscope.cache_flushes", COUNTER,
       "{flush}", "flush_cache calls by result (ok / refused).", labels=("result",),
       sglang="(none)"),
    _d("weight_updates", "schedscope_weight_updates_total", "schedscope.weight_updates",
       COUNTER, "{update}", "Weight updates by result (ok / error).", labels=("result",),
       sglang="(none)"),
    _d("weight_load_duration", "sglang:weight_load_duration_seconds",
       "sglang.weight_load_duration", GAUGE, "s", "Wall time of the latest weight update.",
       labels=("source",), sglang=S),
    # --- the telemetry's own health --------------------------------------------------------
    _d("events", "schedscope_events_total", "schedscope.events", COUNTER, "{event}",
       "Raw events processed.", sglang="(none)"),
    _d("lost_messages", "schedscope_lost_messages_total", "schedscope.lost_messages", COUNTER,
       "{message}", "Messages lost on the way (seq gaps).", sglang="(none)"),
    _d("duplicate_messages", "schedscope_duplicate_messages_total",
       "schedscope.duplicate_messages", COUNTER, "{message}",
       "Messages skipped because their seq was already seen.", sglang="(none)"),
    _d("engine_dropped_messages", "schedscope_engine_dropped_messages_total",
       "schedscope.engine_dropped_messages", COUNTER, "{message}",
       "Messages the engine's emitter dropped (socket would block), as it reports.",
       sglang="(none)"),
    _d("engine_dropped_events", "schedscope_engine_dropped_events_total",
       "schedscope.engine_dropped_events", COUNTER, "{event}",
       "Events in messages the engine's emitter dropped, as it reports.", sglang="(none)"),
    _d("engine_restarts", "schedscope_engine_restarts_total", "schedscope.engine_restarts",
       COUNTER, "{restart}", "Restarts detected (counted on the new instance).",
       sglang="(none)"),
    _d("forward_iter_anomalies", "schedscope_forward_iter_anomalies_total",
       "schedscope.forward_iter_anomalies", COUNTER, "{batch}",
       "forward_iter anomalies: duplicate (launch or done seen twice), backwards, gap (not "
       "explained by lost messages), done_without_launch.", labels=("kind",), sglang="(none)"),
    _d("spans_force_ended", "schedscope_spans_force_ended_total",
       "schedscope.spans_force_ended", COUNTER, "{span}",
       "Open spans ended by the sidecar: batch/request/pause/idle/admin x timeout / evicted / "
       "shutdown / restart.", labels=("span", "reason"), sglang="(none)"),
    _d("requests_evicted", "schedscope_requests_evicted_total",
       "schedscope.requests_evicted", COUNTER, "{request}",
       "In-flight requests dropped because the per-engine bound was reached (oldest first).",
       sglang="(none)"),
    _d("kv_sink_errors", "schedscope_kv_sink_errors_total", "schedscope.kv_sink_errors",
       COUNTER, "{batch}", "KV batches a sink raised on.", labels=("sink",), sglang="(none)"),
    # sidecar-wide, derived from the ingest counters at scrape/collection time
    _d("ingest_frames", "schedscope_ingest_frames_total", "schedscope.ingest.frames", COUNTER,
       "{frame}", "Frames received by ingest.", per_engine=False, sglang="(none)"),
    _d("ingest_bad_frames", "schedscope_ingest_bad_frames_total", "schedscope.ingest.bad_frames",
       COUNTER, "{frame}", "Frames rejected by ingest, by kind (malformed / schema_version / "
       "oversized).", labels=("kind",), per_engine=False, sglang="(none)"),
    _d("ingest_rejected_events", "schedscope_ingest_rejected_events_total",
       "schedscope.ingest.rejected_events", COUNTER, "{event}",
       "Unknown or invalid events dropped from otherwise good frames.", per_engine=False,
       sglang="(none)"),
    _d("sidecar_queue_dropped_frames", "schedscope_sidecar_queue_dropped_frames_total",
       "schedscope.sidecar_queue.dropped_frames", COUNTER, "{frame}",
       "Frames dropped because the sidecar's queue was full.", per_engine=False,
       sglang="(none)"),
    _d("sidecar_queue_dropped_events", "schedscope_sidecar_queue_dropped_events_total",
       "schedscope.sidecar_queue.dropped_events", COUNTER, "{event}",
       "Events in frames dropped because the sidecar's queue was full.", per_engine=False,
       sglang="(none)"),
    # issue 18: what the engine registry refused or forgot, and a receiving thread that died
    _d("engines_evicted", "schedscope_engines_evicted_total", "schedscope.engines_evicted",
       COUNTER, "{engine}", "Engines forgotten because more than max_engines were seen.",
       per_engine=False, sglang="(none)"),
    _d("implausible_seq", "schedscope_implausible_seq_total", "schedscope.implausible_seq",
       COUNTER, "{message}", "Frames whose seq jumped implausibly far (refused or followed).",
       per_engine=False, sglang="(none)"),
    _d("ingest_thread_dead", "schedscope_ingest_thread_dead", "schedscope.ingest.thread_dead",
       GAUGE, "1", "1 if the raw-event receiving thread died (see the log).", per_engine=False,
       sglang="(none)"),
)  # fmt: skip

METRICS_BY_KEY: dict[str, MetricDef] = {m.key: m for m in METRICS}
INGEST_METRIC_KEYS = tuple(m.key for m in METRICS if not m.per_engine)


def metric_names(key: str) -> tuple[str, str | None]:
    """(Prometheus name, OTLP name) of a metric, by its key or by either of its names."""
    m = METRICS_BY_KEY.get(key) or _BY_ANY_NAME.get(key)
    if m is None:
        raise KeyError(f"unknown metric {key!r}")
    return m.prom_name, m.otlp_name


_BY_ANY_NAME: dict[str, MetricDef] = {
    **{m.prom_name: m for m in METRICS},
    **{m.otlp_name: m for m in METRICS if m.otlp_name},
}


def metrics_reference_markdown() -> str:
    """The README's metrics table, generated from METRICS."""
    rows = [
        "| Prometheus name | OTLP name | type | labels (beyond engine labels) | meaning | "
        "SGLang equivalent |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        labels = ", ".join(m.labels) or "—"
        if not m.per_engine:
            labels = (", ".join(m.labels) + " " if m.labels else "") + "(no engine labels)"
        sglang = "same name" if m.sglang.startswith(S) else m.sglang
        sglang = sglang.replace(S, "same name", 1)
        meaning = m.help + (f" {m.note}" if m.note else "")
        otlp = f"`{m.otlp_name}`" if m.otlp_name else "— (Prometheus only)"
        rows.append(f"| `{m.prom_name}` | {otlp} | {m.kind} | {labels} | {meaning} | {sglang} |")
    return "\n".join(rows) + "\n"
