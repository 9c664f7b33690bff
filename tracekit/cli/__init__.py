"""The `tracekit` command: a thin Typer layer over the library.

Each command group lives in its own module and registers itself on ``app``; ``main`` turns every
:class:`~tracekit.errors.TracekitError` into one line on stderr and exit code 2, with no traceback.
"""
from __future__ import annotations

import sys

import typer

from ..errors import TracekitError

app = typer.Typer(
    name="tracekit",
    help="Record MoE expert routing token by token, analyse it, and plan expert placement.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules register themselves on `app` when imported.
from . import collect_cmd  # noqa: E402,F401
from . import import_cmd  # noqa: E402,F401
from . import import_jsonl_cmd  # noqa: E402,F401
from . import import_engines_cmd  # noqa: E402,F401
from . import query_cmd  # noqa: E402,F401
from . import place_cmd  # noqa: E402,F401
from . import route_cmd  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except TracekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted: finished chunks are kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        code = 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        raise
    if code == 130:  # Ctrl-C: click turns KeyboardInterrupt into Abort, typer into this exit code
        print("interrupted: finished chunks are kept; run the same command again to resume", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
