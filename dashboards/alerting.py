"""schedscope's Prometheus recording and alerting rules, as data.

Alerts aggregate ``by (ENGINE)`` so one alert fires per engine instance, with the labels a
person needs to find it. The recording rules are what the alerts and ad-hoc queries reuse;
alerts are written against raw metrics so they work even where recording rules are not loaded.
"""

from __future__ import annotations

from schedscope.dashboards.names import M, optional
from schedscope.dashboards.rules import Alert, Group, Recording

ENGINE = "instance, model_name, engine_id"
BY = f"by ({ENGINE})"
ON = f"on ({ENGINE})"
SIDECAR = "by (instance)"


def grown(selector: str, window: str, by: str = BY) -> str:
    """How much a counter grew over ``window``, a series born inside the window counted from 0.

    ``increase()`` alone reads 0 for a counter whose first scrape is already non-zero, which
    is exactly how failures of a new engine look (its first message reports the seq gap or
    the leak). ``x unless x offset w`` is the series that did not exist ``w`` ago; ``or``
    matches without the metric name, so older series fall through to ``increase()``.
    """
    return f"sum {by} (({selector} unless {selector} offset {window}) or increase({selector}[{window}]))"


def recording_rules() -> Group:
    return Group(
        "schedscope.recording",
        [
            Recording(
                "engine:schedscope_generation_tokens:rate1m",
                f"sum {BY} (rate({M.generation_tokens}[1m]))",
            ),
            Recording(
                "engine:schedscope_forward_iterations:rate1m",
                f"sum {BY} (rate({M.forward_iterations}[1m]))",
            ),
            Recording(
                "engine:schedscope_idle_fraction:rate1m",
                f"sum {BY} (rate({M.idle_seconds}[1m]))",
            ),
            Recording(
                "engine:schedscope_lost_messages:rate5m",
                f"sum {BY} (rate({M.lost_messages}[5m]))"
                f" + sum {BY} (rate({M.engine_dropped_messages}[5m]))",
            ),
            Recording(
                "engine:schedscope_ttft_seconds:p99_5m",
                f"histogram_quantile(0.99, sum by ({ENGINE}, le) (rate({M.ttft}_bucket[5m])))",
            ),
            Recording(
                "engine:schedscope_itl_seconds:p99_5m",
                f"histogram_quantile(0.99, sum by ({ENGINE}, le) (rate({M.itl}_bucket[5m])))",
            ),
        ],
    )


def alerting_rules() -> Group:
    not_paused = f"unless {ON} (max {BY} ({M.paused}) > 0)"
    return Group(
        "schedscope.alerts",
        [
            Alert(
                "SchedscopeThroughputStalled",
                f"""(sum {BY} ({M.num_running_reqs}) + sum {BY} ({M.num_queue_reqs})) > 0
and {ON} sum {BY} (increase({M.forward_iterations}[2m])) == 0
{not_paused}""",
                for_="2m",
                severity="critical",
                summary="Engine {{ $labels.engine_id }} has work but runs no batches",
                description=(
                    "{{ $labels.engine_id }} ({{ $labels.model_name }} on {{ $labels.instance }}) "
                    "has running or queued requests but completed no forward iteration in 2 "
                    "minutes, and it is not paused."
                ),
                runbook="""Pauses are excluded: a paused engine reports gen_throughput 0 on purpose.
1. Check the engine process (stuck kernel, NCCL hang, deadlocked scheduler thread).
2. Look at the last batch spans of this engine in the trace backend.
3. If the engine is alive, restart it; open requests are aborted.""",
            ),
            Alert(
                "SchedscopeTelemetryLosingEvents",
                f"""{grown(M.lost_messages, "5m")} > 0
or {grown(M.engine_dropped_events, "5m")} > 0
or {grown(M.sidecar_queue_dropped_events, "5m", SIDECAR)} > 0""",
                for_="1m",
                severity="warning",
                summary="Telemetry on {{ $labels.instance }} is losing events",
                description=(
                    "{{ $value | humanize }} raw messages or events were lost or dropped in the "
                    "last 5 minutes (engine {{ $labels.engine_id }}; empty: the sidecar's own "
                    "queue): spans and metrics are incomplete."
                ),
                runbook="""The engine never waits for the sidecar, so a slow or absent sidecar loses events.
1. Lost messages (seq gaps) or emitter drops: the sidecar was down or too slow to drain.
2. Sidecar-queue drops: the sidecar's CPU is saturated (one core takes >= 200k events/s).
3. Run one sidecar per engine, or raise the queue bounds.""",
            ),
            Alert(
                "SchedscopeBadFrames",
                f"{grown(M.ingest_bad_frames, '5m', SIDECAR)} > 0",
                for_="0m",
                severity="warning",
                summary="The sidecar on {{ $labels.instance }} receives frames it cannot decode",
                description=(
                    "{{ $value | humanize }} bad frames in 5 minutes (malformed, oversized or a "
                    "schema version this sidecar does not speak)."
                ),
                runbook="""Usually an engine and a sidecar of different schedscope versions, or a foreign
process writing to the raw-event endpoint. Compare versions; check the endpoint is private.""",
            ),
            Alert(
                "SchedscopeMemoryLeakDetected",
                f"""{grown(M.memory_checks + '{result="leak"}', "10m")} > 0
or max {BY} ({M.memory_leaked_slots}) > 0""",
                for_="0m",
                severity="critical",
                summary="KV memory leak on {{ $labels.engine_id }}",
                description=(
                    "An idle-time memory check of {{ $labels.engine_id }} failed: free + cached + "
                    "in-use KV slots do not add up to the pool size, or the request table is not "
                    "empty while idle."
                ),
                runbook="""The memory-check span event in the trace backend carries the numbers.
1. Note the leaked slot count; a growing leak ends in refused requests.
2. Flush the cache when fully idle (POST /flush_cache) or restart the engine.
3. Report with the batch spans before the check (retract/abort paths leak most often).""",
            ),
            kv_relay_alert(),
            Alert(
                "SchedscopeEngineHeartbeatMissing",
                # The second clause keeps engines that said goodbye out: the sidecar zeroes
                # every gauge of an engine that shut down or restarted under a new id, while a
                # live engine is always idle, paused, or has requests.
                f"""sum {BY} (increase({M.events}[1m])) == 0
and {ON} (
  max {BY} ({M.idle}) > 0
  or max {BY} ({M.paused}) > 0
  or sum {BY} ({M.num_running_reqs}) + sum {BY} ({M.num_queue_reqs}) > 0
)""",
                for_="1m",
                severity="critical",
                summary="No heartbeat from engine {{ $labels.engine_id }}",
                description=(
                    "The sidecar has received no event from {{ $labels.engine_id }} for a "
                    "minute; engines send a heartbeat every second, even when idle or paused. "
                    "Engines that shut down cleanly are not reported."
                ),
                runbook="""1. Is the engine process alive? A crash without a Shutdown event looks like this.
2. Is the raw-event endpoint reachable (same host for ipc://, firewall for tcp://)?
3. The sidecar's lost-messages counter tells whether messages arrive with gaps.""",
            ),
            Alert(
                "SchedscopeQueueGrowingWhileIdleCapable",
                f"""sum {BY} ({M.num_queue_reqs}) > 0
and {ON} sum {BY} (delta({M.num_queue_reqs}[5m])) > 0
and {ON} max {BY} ({M.token_usage}) < 0.8
{not_paused}""",
                for_="5m",
                severity="warning",
                summary="Queue of {{ $labels.engine_id }} grows while KV capacity is free",
                description=(
                    "Requests keep queueing on {{ $labels.engine_id }} although its KV pool is "
                    "below 80% and it is not paused: the scheduler admits too little."
                ),
                runbook="""1. Check max_running_requests and chunked-prefill limits (the queue may be capped there).
2. Check the idle fraction: an engine that idles with a queue has an admission bug.
3. Check for requests stuck on grammar compilation or LoRA loading.""",
            ),
        ],
    )


def kv_relay_alert() -> Alert:
    """Lagging routers: the relay trails the engine by over a second, or it drops batches
    (what a relay that cannot keep up does: its queue is bounded)."""
    dropped = M.export_kv_batches + '{outcome="dropped"}'
    expr = f"{grown(dropped, '5m', 'by (instance, exporter)')} > 0"
    what = "dropping KV batches (its bounded queue overflows)"
    lag = optional("kv_relay_lag")
    if lag is not None:
        expr = f"(max by (instance, exporter) ({lag}) > 1) or ({expr})"
        what = "more than 1 s behind the engine, or dropping KV batches"
    for_ = "1m"
    return Alert(
        "SchedscopeKvRelayLagging",
        expr,
        for_=for_,
        severity="warning",
        summary="KV-event relay on {{ $labels.instance }} is falling behind",
        description=(
            f"The KV-event relay is {what}: routers make cache-aware decisions on a stale view "
            "of the engine's KV cache."
        ),
        runbook="""1. Check the relay's subscribers: a slow SUB fills the PUB high-water mark.
2. Check the sidecar's CPU; KV batches are coalesced, so lag should stay in milliseconds.
3. A router that missed batches can ask the replay endpoint for them (seq >= its last).""",
    )


def rule_groups() -> list[Group]:
    return [recording_rules(), alerting_rules()]
