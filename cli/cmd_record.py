"""`schedscope record`: save an engine's raw event stream to a file, to replay it later.

It is a sidecar without telemetry: the same ingest (so the file holds exactly what a live
sidecar would have received, bad frames included) and the same per-engine seq accounting, so the
final line says how many messages were lost on the way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from schedscope.cli.common import console, load_settings, on_stop_signals
from schedscope.cli.options import config_flag, flag, with_defaults
from schedscope.cli.settings import CliError


def register(app: typer.Typer) -> None:
    app.command("record")(with_defaults("record", record))


def record(
    endpoint: Optional[str] = flag("endpoint"),
    out: Optional[Path] = flag("out", short="-o"),
    duration: Optional[float] = flag("duration"),
    connect: Optional[bool] = flag("connect"),
    record_max_bytes: Optional[str] = flag("record_max_bytes"),
    queue_size: Optional[int] = flag("queue_size"),
    max_message_bytes: Optional[str] = flag("max_message_bytes"),
    log_level: Optional[str] = flag("log_level"),
    config: Optional[Path] = config_flag(),
) -> None:
    """Record the raw event stream of the engines sending to --endpoint into --out."""
    s = load_settings("record", locals(), config)
    # Imported here: `schedscope --help` should not pay for zmq and the telemetry package.
    from schedscope.telemetry.recording import RecordingIngest, RecordingWriter
    from schedscope.telemetry.sidecar import Sidecar

    s.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = RecordingWriter(
            s.out, max_bytes=s.record_max_bytes, meta={"endpoint": s.endpoint, "tool": "record"}
        )
    except OSError as exc:
        raise CliError(f"cannot write --out {str(s.out)!r}: {exc}") from None
    ingest = RecordingIngest(
        s.endpoint,
        writer,
        bind=not s.connect,
        queue_size=s.queue_size,
        max_message_bytes=s.max_message_bytes,
    )
    sidecar = Sidecar(ingest)
    try:
        sidecar.start()
    except OSError as exc:
        writer.close()
        raise CliError(f"--endpoint: {exc}") from None
    restore = on_stop_signals(sidecar.stop)
    deadline = time.monotonic() + s.duration if s.duration else None
    console.print(f"recording {s.endpoint} -> {s.out} (Ctrl-C to stop)")
    try:
        while not sidecar.stopping and (deadline is None or time.monotonic() < deadline):
            sidecar.process(timeout=0.1)
    finally:
        ingest.stop()
        sidecar.process(timeout=0)  # what was queued before the socket closed
        writer.close()
        restore()
    summary = sidecar.summary()
    w = writer.stats()
    console.print(
        f"recorded {w['frames']} frames ({w['bytes']} bytes) from {summary.engines} engine(s) "
        f"to {s.out}; lost messages {summary.lost_messages}, bad frames "
        f"{summary.bad_frames_total}, over --record-max-bytes {w['dropped_frames']}"
    )
