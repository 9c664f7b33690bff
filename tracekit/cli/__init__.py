"""The `tracekit` command: a thin Typer layer over the library.

Each command group lives in its own module and registers itself on ``app``; ``main`` turns every
:class:`~tracekit.errors.TracekitError` and every usage error (raised by typer's vendored copy of click, or by
click itself) into one ``error: ...`` line on stderr and exit code 2, with no traceback.
"""
from __future__ import annotations

import re
import sys

import typer

from ..errors import TracekitError


def _plain_flags_in_help() -> None:
    """Typer's rich help prints ``<bool>`` in the type column of every flag (``--sample/--greedy``, ``--force``,
    even ``--help``), as if it took a value. A flag takes none: show nothing there."""
    try:
        from typer.core import TyperOption
    except ImportError:  # another typer layout: keep its help as it is
        return
    original = TyperOption.display_type_rich
    if getattr(original, "_tracekit_plain_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._tracekit_plain_flags = True
    TyperOption.display_type_rich = display_type_rich


_plain_flags_in_help()

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
from . import diff_cmd  # noqa: E402,F401
from . import watch_cmd  # noqa: E402,F401


def _usage_exception_types() -> tuple[type[BaseException], ...]:
    """Click's exception classes as the installed typer raises them: typer >= 0.29 vendors its own copy of click
    (``typer._click``), older releases raise click's own; we catch both."""
    types: list[type[BaseException]] = []
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        types.append(TyperClickException)
    except ImportError:  # typer < 0.29
        pass
    try:
        from click.exceptions import ClickException

        types.append(ClickException)
    except ImportError:  # typer >= 0.29 does not need click installed
        pass
    return tuple(types)


USAGE_ERRORS = _usage_exception_types()
INTERRUPTED = "interrupted: finished chunks are kept; run the same command again to resume"


def one_line(text: str) -> str:
    """Collapse a message to one line (click's messages may hold newlines, user text may too)."""
    return " ".join(str(text).split())


def usage_message(exc: BaseException) -> str:
    """One line for a click/typer usage error: the command, what is wrong, and a fix hint where one is known."""
    msg = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "tracekit"
    option = getattr(exc, "option_name", None)
    hint = f" (see {command} --help)"
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed; name what is missing
        return f"{command}: give a command (listed by {command} --help)"
    if type(exc).__name__ == "NoSuchOption" and option and (any(c.isspace() for c in option)
                                                            or command.split()[-1] in ("query", "sql")):
        hint = (" (text that starts with '-' is read as an option: to pass SQL that starts with a comment, put -- "
                f"before the arguments, e.g. {command} -- RUN '-- note\\nSELECT ...')")
        msg = f"No such option: {one_line(option)[:40]}"
    msg = msg.replace("Value error, ", "")  # pydantic's prefix on typer's choice errors
    choice = re.fullmatch(r"Invalid value for '(--[\w-]+)'[^:]*: '(.*)' is not one of (.*?)\.?", one_line(msg))
    if choice:  # "unknown strategy 'magic' (--strategy); choose one of linear, round-robin, ..."
        opt, value, choices = choice.groups()
        msg = f"unknown {opt[2:].replace('-', ' ')} {value!r} ({opt}); choose one of {choices.replace(chr(39), '')}"
    return one_line(f"{command}: {msg}{hint}")


def _fail(message: str, code: int) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _interrupted() -> None:
    """Ctrl-C: one line (its own prefix, which scripts and tests match) and exit 130."""
    print(INTERRUPTED, file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: every user mistake (TracekitError, a usage error, an OS refusal such as a full disk or a
    permission) ends as one ``error: ...`` line on stderr and exit 2; Ctrl-C as one line and exit 130."""
    try:
        code = app(args=argv, prog_name="tracekit", standalone_mode=False)
    except TracekitError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        code = 130
    except USAGE_ERRORS as exc:
        _fail(usage_message(exc), 2 if getattr(exc, "exit_code", 2) in (1, 2) else exc.exit_code)
    except OSError as exc:  # the environment refused: permission, full disk, read-only file system
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        _fail(f"{exc.strerror or exc}{where}", 2)
    if code == 130:  # Ctrl-C: typer turns KeyboardInterrupt into this exit code
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
