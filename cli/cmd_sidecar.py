"""`schedscope sidecar`: the live sidecar, as an operator runs it next to its engines.

Options resolve through the settings layer (flags > env > config file); the whole sidecar is
built by ``sidecar_app.build_sidecar_app``. While it runs it prints a per-second summary of
what it receives (``--no-summary`` to keep quiet); SIGINT/SIGTERM stop it cleanly: everything
received is processed, open spans end, every file is flushed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from schedscope.cli.common import load_settings, on_stop_signals
from schedscope.cli.options import config_flag, flag, with_defaults
from schedscope.telemetry.sidecar import Sidecar, Summary


def register(app: typer.Typer) -> None:
    app.command("sidecar")(with_defaults("sidecar", sidecar))


def sidecar(
    endpoint: Optional[str] = flag("endpoint"),
    bind: Optional[bool] = typer.Option(
        None,
        "--bind/--connect",
        help="Bind the endpoint (engines connect to it) or connect to an engine that binds. "
        "(env: $SCHEDSCOPE_CONNECT)",
        show_default=False,
        metavar="",
    ),
    queue_size: Optional[int] = flag("queue_size"),
    max_message_bytes: Optional[str] = flag("max_message_bytes"),
    prometheus_host: Optional[str] = flag("prometheus_host"),
    prometheus_port: Optional[str] = flag("prometheus_port"),
    otlp_endpoint: Optional[str] = flag("otlp_endpoint"),
    otlp_protocol: Optional[str] = flag("otlp_protocol"),
    service_name: Optional[str] = flag("service_name"),
    out_dir: Optional[Path] = flag("out_dir"),
    otlp_json: Optional[bool] = flag("otlp_json"),
    perfetto: Optional[bool] = flag("perfetto"),
    snapshot: Optional[bool] = flag("snapshot"),
    record: Optional[bool] = flag("record"),
    record_max_bytes: Optional[str] = flag("record_max_bytes"),
    kv_relay_endpoint: Optional[str] = flag("kv_relay_endpoint"),
    kv_relay_replay_endpoint: Optional[str] = flag("kv_relay_replay_endpoint"),
    kv_relay_topic: Optional[str] = flag("kv_relay_topic"),
    kv_relay_buffer_steps: Optional[int] = flag("kv_relay_buffer_steps"),
    kv_relay_hash_style: Optional[str] = flag("kv_relay_hash_style"),
    kv_relay_config: Optional[str] = flag("kv_relay_config"),
    kv_ingest_endpoint: Optional[str] = flag("kv_ingest_endpoint"),
    kv_ingest_replay_endpoint: Optional[str] = flag("kv_ingest_replay_endpoint"),
    kv_ingest_topic: Optional[str] = flag("kv_ingest_topic"),
    kv_ingest_config: Optional[str] = flag("kv_ingest_config"),
    duration: Optional[float] = flag("duration"),
    log_level: Optional[str] = flag("log_level"),
    summary: bool = typer.Option(
        True,
        "--summary/--no-summary",
        help="Print a live per-second event summary. (default: on)",
        metavar="",
    ),
    config: Optional[Path] = config_flag(),
) -> None:
    """Receive engines' raw scheduler events; export traces, metrics, KV events and files."""
    flags = dict(locals())
    flags["connect"] = None if bind is None else not bind
    s = load_settings("sidecar", flags, config)

    from schedscope.cli.sidecar_app import build_sidecar_app

    app = build_sidecar_app(s).start()
    restore = on_stop_signals(app.stop)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    ingest = app.sidecar.ingest
    verb = "listening on" if ingest.bind else "connected to"
    err.print(f"schedscope sidecar {verb} {ingest.bound_endpoint}", markup=False)
    if app.metrics_url:
        err.print(f"/metrics on {app.metrics_url}", markup=False)
    for line in _otlp_lines(s):
        err.print(line, markup=False)
    for name, path in app.files.items():
        err.print(f"writing {name} to {path}", markup=False)
    if app.kv_ingest is not None:
        err.print(f"KV events from {app.kv_ingest.endpoint}", markup=False)
    if app.kv_relay is not None:
        err.print(f"relaying KV events on {app.kv_relay.endpoints()[0]}", markup=False)

    reporter = _Reporter(app.sidecar)
    try:
        if not summary:
            app.run(duration_s=s.duration)
        elif out.is_terminal:
            with Live(reporter.table(), console=out, auto_refresh=False) as live:
                app.run(
                    duration_s=s.duration,
                    on_tick=lambda: reporter.tick(lambda t: live.update(t, refresh=True)),
                )
        else:
            app.run(
                duration_s=s.duration,
                on_tick=lambda: reporter.tick(lambda _: out.print(reporter.line(), markup=False)),
            )
    finally:
        app.close()
        restore()
    final = _Reporter(app.sidecar)
    final.tick(lambda _: None, force=True)
    err.print(f"schedscope sidecar stopped: {final.totals_line()}", markup=False)


def _otlp_lines(s) -> list[str]:
    """Where OTLP goes (the banner said nothing about it): per signal, endpoint and protocol."""
    from schedscope.cli.sidecar_app import _export_config

    config = _export_config(s)
    try:
        targets = {
            "traces": config.traces_endpoint_resolved(),
            "metrics": config.metrics_endpoint_resolved(),
        }
    except ValueError:  # already reported by build_sidecar_app; never fail the banner
        return []
    if not any(targets.values()):
        return ["OTLP export off (set --otlp-endpoint or $OTEL_EXPORTER_OTLP_ENDPOINT)"]
    return [
        f"OTLP {signal} to {ep} ({config.protocol_for(signal)})"
        for signal, ep in targets.items()
        if ep
    ]


class _Reporter:
    """Turns successive Summaries into per-second rates and totals."""

    def __init__(self, sc: Sidecar, interval_s: float = 1.0) -> None:
        self.sc = sc
        self.interval_s = interval_s
        self.prev: Summary = sc.summary()
        self.cur: Summary = self.prev
        self._next = time.monotonic() + interval_s

    def tick(self, render: Callable[[Table], object], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.interval_s
        self.prev, self.cur = self.cur, self.sc.summary()
        render(self.table())

    def _rates(self) -> dict[str, int]:
        prev = self.prev.events_by_type
        return {k: v - prev.get(k, 0) for k, v in sorted(self.cur.events_by_type.items())}

    def totals_line(self) -> str:
        s = self.cur
        return (
            f"frames {s.frames} events {s.events} engines {s.engines} lost {s.lost_messages} "
            f"engine-dropped {s.engine_dropped_messages} queue-dropped {s.queue_dropped_frames} "
            f"bad-frames {s.bad_frames_total} rejected-events {s.rejected_events} "
            f"disconnects {s.peer_disconnects} (unexpected {s.unexpected_disconnects})"
        )

    def line(self) -> str:
        per_type = " ".join(f"{k}={v}" for k, v in self._rates().items() if v) or "-"
        return f"events/s {self.cur.events - self.prev.events}: {per_type} | {self.totals_line()}"

    def table(self) -> Table:
        s = self.cur
        t = Table(title="schedscope sidecar", caption=self.totals_line(), expand=False)
        t.add_column("event")
        t.add_column("per second", justify="right")
        t.add_column("total", justify="right")
        rates = self._rates()
        for name, total in sorted(s.events_by_type.items()):
            t.add_row(name, str(rates.get(name, 0)), str(total))
        t.add_section()
        t.add_row("all events", str(s.events - self.prev.events), str(s.events))
        return t
