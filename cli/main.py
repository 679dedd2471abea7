"""The `schedscope` command line. Each subcommand lives in its own module (cmd_*.py)."""

from __future__ import annotations

import typer

from schedscope import __version__

app = typer.Typer(
    name="schedscope",
    help="Observability sidecar and exporter for LLM-serving GPU schedulers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"schedscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """schedscope: raw scheduler events in; OpenTelemetry, Prometheus and KV streams out."""


def _register() -> None:
    # Imported here so `schedscope --help` stays fast and torch is only imported by commands
    # that run the engine.
    from schedscope import cmd_sidecar

    cmd_sidecar.register(app)


def main() -> None:
    _register()
    app()


if __name__ == "__main__":
    main()
