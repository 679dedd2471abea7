"""The `schedscope` command line. Each subcommand lives in its own module (cmd_*.py).

Errors a user can cause (unknown option, bad value, port in use, unwritable folder) print ONE
line on stderr and exit non-zero (2 for usage/value errors): no usage dump, no traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.22 vendors click as typer._click (its own exception classes)
    from typer._click import exceptions as cx
except ImportError:  # older typer: plain click
    from click import exceptions as cx

from schedscope import __version__
from schedscope.cli.settings import EXIT_USAGE, CliError

app = typer.Typer(
    name="schedscope",
    help="Observability sidecar and exporter for LLM-serving GPU schedulers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Imported lazily by _register so `schedscope --help` stays fast and only the commands that run
# the engine import torch. A module that is missing (not built yet) is skipped, never fatal.
COMMAND_MODULES = ("cmd_demo", "cmd_sidecar", "cmd_engine", "cmd_record", "cmd_replay")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"schedscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """schedscope: raw scheduler events in; OpenTelemetry, Prometheus and KV streams out."""


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"schedscope.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"schedscope.cli.{name}":
                raise  # a real missing dependency inside the module: say so
            continue
        module.register(app)


def _fail(message: str, code: int) -> int:
    # One line, always starting with "error:" so scripts and people can spot it.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return code


def run(argv: list[str] | None = None, application: typer.Typer | None = None) -> int:
    """Run the CLI (or ``application``) and return its exit status; errors are one line."""
    if application is None:
        _register()
        args = sys.argv[1:] if argv is None else argv
        # -V/--version anywhere (before `--`), on every subcommand too: no command runs then.
        head = args[: args.index("--")] if "--" in args else args
        if "-V" in head or "--version" in head:
            sys.stdout.write(f"schedscope {__version__}\n")
            return 0
    try:
        result = (application or app)(args=argv, prog_name="schedscope", standalone_mode=False)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except cx.NoArgsIsHelpError as exc:
        # Bare `schedscope` or a group without a subcommand: show the help, like --help.
        sys.stdout.write(exc.ctx.get_help() + "\n")
        return 0
    except cx.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "schedscope"
        return _fail(f"{cmd}: {exc.format_message()} (see '{cmd} --help')", EXIT_USAGE)
    except cx.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        return _fail("aborted", 130)
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
