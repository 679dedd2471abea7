"""`schedscope sidecar`: receive an engine's raw events and turn them into telemetry."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("sidecar")(sidecar)


def sidecar(
    endpoint: str = typer.Option(
        None,
        "--endpoint",
        envvar="SCHEDSCOPE_ENDPOINT",
        help="Raw-event endpoint (ipc:// or tcp://).",
    ),
) -> None:
    """Run the sidecar (placeholder until the foundation issue lands)."""
    raise typer.Exit(0)
