"""`schedscope sidecar`: receive engines' raw events; print a live per-second summary.

The processing loop lives in ``schedscope.telemetry.sidecar`` (torch-free); this module only
parses options, wires signals and renders the summary.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from schedscope.telemetry.ingest import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_QUEUE_SIZE, Ingest
from schedscope.telemetry.schema import ENV_ENDPOINT, resolve_endpoint
from schedscope.telemetry.sidecar import HandlerLike, Sidecar, Summary


def register(app: typer.Typer) -> None:
    app.command("sidecar")(sidecar)


def sidecar(
    endpoint: str = typer.Option(
        None,
        "--endpoint",
        envvar=ENV_ENDPOINT,
        help="Raw-event endpoint: ipc://PATH or tcp://HOST:PORT (default ipc:///tmp/schedscope-events.sock).",
    ),
    bind: bool = typer.Option(
        True,
        "--bind/--connect",
        help="Bind the endpoint (engines connect to it) or connect to an engine that binds.",
    ),
    queue_size: int = typer.Option(
        DEFAULT_QUEUE_SIZE, "--queue-size", min=1, help="Frames buffered before dropping."
    ),
    max_message_bytes: int = typer.Option(
        DEFAULT_MAX_MESSAGE_BYTES,
        "--max-message-bytes",
        min=1024,
        help="Frames larger than this are refused (ZMQ MAXMSGSIZE) and counted.",
    ),
    summary: bool = typer.Option(
        True, "--summary/--no-summary", help="Print a live per-second event summary."
    ),
) -> None:
    """Receive engines' raw scheduler events and account for every one of them."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        resolved = resolve_endpoint(endpoint)
    except ValueError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from None
    ingest = Ingest(resolved, bind=bind, queue_size=queue_size, max_message_bytes=max_message_bytes)
    raise typer.Exit(run_sidecar(Sidecar(ingest), summary=summary))


def run_sidecar(sc: Sidecar, *, summary: bool = True, handler: HandlerLike | None = None) -> int:
    """Start ``sc``, process until SIGINT/SIGTERM, close it. Returns the exit code.

    Public so the commands that add the telemetry layer (a handler) reuse the same loop.
    """
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if handler is not None:
        sc.set_handler(handler)
    try:
        sc.start()
    except OSError as exc:
        err.print(f"error: {exc}", markup=False)
        return 1

    def _stop(signum: int, _frame: FrameType | None) -> None:
        sc.stop()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    verb = "listening on" if sc.ingest.bind else "connected to"
    err.print(f"schedscope sidecar {verb} {sc.ingest.bound_endpoint}", markup=False)
    try:
        if not summary:
            sc.run()
        elif out.is_terminal:
            reporter = _Reporter(sc)
            with Live(reporter.table(), console=out, auto_refresh=False) as live:
                sc.run(on_idle=lambda: reporter.tick(lambda s: live.update(s, refresh=True)))
        else:
            reporter = _Reporter(sc)
            sc.run(on_idle=lambda: reporter.tick(lambda _: out.print(reporter.line())))
    finally:
        sc.close()
        for s, h in previous.items():
            signal.signal(s, h)
    final = _Reporter(sc)
    final.tick(lambda _: None, force=True)
    err.print(f"schedscope sidecar stopped: {final.totals_line()}", markup=False)
    return 0


class _Reporter:
    """Turns successive Summaries into per-second rates and totals."""

    def __init__(self, sc: Sidecar, interval_s: float = 1.0) -> None:
        self.sc = sc
        self.interval_s = interval_s
        self.prev: Summary = sc.summary()
        self.cur: Summary = self.prev
        self._next = time.monotonic() + interval_s

    def tick(self, render: object, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.interval_s
        self.prev, self.cur = self.cur, self.sc.summary()
        render(self.table())  # type: ignore[operator]

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
