"""`schedscope replay FILE`: run a recorded raw event stream through the sidecar again.

Same path as live frames (decode, validation, per-engine seq accounting, telemetry, every
exporter), built by the same composition root as `schedscope sidecar`; only the socket is
replaced by the file. As fast as possible by default, or at the recorded pace (--realtime).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from schedscope.cli.common import console, load_settings, on_stop_signals
from schedscope.cli.options import config_flag, flag, with_defaults
from schedscope.cli.settings import CliError, parse_readable_file


def register(app: typer.Typer) -> None:
    app.command("replay")(with_defaults("replay", replay))


def replay(
    file: str = typer.Argument(..., help="Recording written by `schedscope record` or --record."),
    realtime: Optional[bool] = flag("realtime"),
    speed: Optional[float] = flag("speed"),
    out_dir: Optional[Path] = flag("out_dir"),
    otlp_json: Optional[bool] = flag("otlp_json"),
    perfetto: Optional[bool] = flag("perfetto"),
    snapshot: Optional[bool] = flag("snapshot"),
    prometheus_host: Optional[str] = flag("prometheus_host"),
    prometheus_port: Optional[str] = flag("prometheus_port"),
    otlp_endpoint: Optional[str] = flag("otlp_endpoint"),
    otlp_protocol: Optional[str] = flag("otlp_protocol"),
    service_name: Optional[str] = flag("service_name"),
    kv_relay_endpoint: Optional[str] = flag("kv_relay_endpoint"),
    kv_relay_replay_endpoint: Optional[str] = flag("kv_relay_replay_endpoint"),
    kv_relay_topic: Optional[str] = flag("kv_relay_topic"),
    kv_relay_buffer_steps: Optional[int] = flag("kv_relay_buffer_steps"),
    kv_relay_hash_style: Optional[str] = flag("kv_relay_hash_style"),
    kv_relay_config: Optional[str] = flag("kv_relay_config"),
    log_level: Optional[str] = flag("log_level"),
    config: Optional[Path] = config_flag(),
) -> None:
    """Replay a raw-event recording through the telemetry and exporters."""
    flags = dict(locals())
    try:
        path = parse_readable_file(file)
    except ValueError as exc:
        raise CliError(f"cannot replay {file!r}: {exc}") from None
    s = load_settings("replay", flags, config)

    from schedscope.cli.sidecar_app import TICK_S, build_sidecar_app
    from schedscope.telemetry.recording import RecordingError, RecordingReader, replay_into

    try:
        reader = RecordingReader(path)
    except RecordingError as exc:
        raise CliError(str(exc)) from None
    app = build_sidecar_app(s, live=False)
    if app.metrics_url:
        console.print(f"/metrics: {app.metrics_url}")
    restore = on_stop_signals(app.stop)
    started = time.monotonic()
    # The telemetry ticks on the recorded clock, as often as a live sidecar does (every
    # TICK_S of recorded time): timeouts and KV windows then behave as they did live.
    clock = {"now": 0, "last_tick": 0}
    app.clock = lambda: clock["now"]

    def on_frame(_n: int, recv_wall_ns: int) -> None:
        clock["now"] = recv_wall_ns
        if recv_wall_ns - clock["last_tick"] >= TICK_S * 1e9:
            clock["last_tick"] = recv_wall_ns
            app.tick()

    try:
        stats = replay_into(
            reader,
            app.sidecar,
            realtime=s.realtime,
            speed=s.speed,
            should_stop=lambda: app.stopping,
            on_frame=on_frame,
        )
    except RecordingError as exc:  # --speed / far-future times: one line (app closes below)
        raise CliError(f"cannot replay {file!r}: {exc}", code=1) from None
    finally:
        state = app.close()
        restore()
    elapsed = time.monotonic() - started
    tail = " (truncated tail: the recorder was killed)" if stats.truncated_tail else ""
    console.print(
        f"replayed {stats.frames} frames, {state['events']} events from {state['engines']} "
        f"engine(s) in {elapsed:.2f}s{tail}; lost messages {state['lost_messages']}, "
        f"bad frames {state['bad_frames']}"
    )
    for name, p in app.files.items():
        console.print(f"  {name:<10} {p}")
    if reader.damage:  # issue 18: a damaged recording is never a silent success
        more = f" (+{len(reader.damage) - 3} more)" if len(reader.damage) > 3 else ""
        raise CliError(f"damaged recording {file!r}: {'; '.join(reader.damage[:3])}{more}", code=1)
