"""The error policy of the four command lines: imagen-train, imagen-export, imagen-run, imagen-eval.

A failure prints one line on stderr, `<prefix>error: <message>` (the prefix is the command's own:
`imagen-train: `, `imagen-export: `, or empty), and exits with a status that names its class:

- 2, a user error: a usage error (an unknown option, a value click cannot convert or that is out
  of range), a typed error of the runtime (`imagen.runtime.errors.ImagenError`), a `ValueError`
  (bad values, unreadable run directories, checkpoints or data: `CheckpointError`, `DataError`,
  `ParameterError`, ...), an `OSError` (a missing file, an existing one without `--force`), or
  a type the command adds (`ExportError` for imagen-export).
- 1, anything else, which is a bug or a failure the code did not foresee:
  `unexpected <Type>: <message> (rerun with --debug for the traceback)`.
- 130, interrupted (Ctrl-C): `<prefix>interrupted`, or what the command says it kept
  (imagen-train saves a checkpoint and names it).

`--debug` prints the traceback before that line and keeps the status; for a usage error it shows
click's full usage message instead. This module imports no torch: `imagen/` ships with the runtime.
"""

import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import click

EXIT_UNEXPECTED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

T = TypeVar("T")


def run_command(
    fn: Callable[[], T], *, debug: bool, prefix: str, user_errors: tuple = (), interrupted: str = "interrupted"
) -> T:
    """Returns `fn()`; turns what it raises into one line on stderr and the exit status above.
    `user_errors` adds exception types that count as user errors; `interrupted` is the line after
    Ctrl-C when the interrupt carries no message of its own."""
    try:
        return fn()
    except (click.exceptions.Exit, click.Abort):
        raise  # click's own ways to stop (--help, ctx.exit)
    except click.UsageError as error:
        if debug:
            raise
        _fail(prefix, _usage_line(error), EXIT_USER_ERROR)
    except KeyboardInterrupt as interrupt:  # also imagen-train's TrainingInterrupted, which says where it saved
        _fail(prefix, str(interrupt) or interrupted, EXIT_INTERRUPTED, debug)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line; the status tells them apart
        if is_user_error(error, user_errors):
            _fail(prefix, "error: " + (str(error) or type(error).__name__), EXIT_USER_ERROR, debug)
        _fail(
            prefix,
            f"error: unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)",
            EXIT_UNEXPECTED,
            debug,
        )


def is_user_error(error: BaseException, extra: tuple = ()) -> bool:
    """Whether `error` is the user's to fix (exit 2) rather than a bug (exit 1)."""
    if isinstance(error, (ValueError, OSError, click.ClickException, *extra)):
        return True
    errors = sys.modules.get("imagen.runtime.errors")  # not imported: nothing raised an ImagenError
    return errors is not None and isinstance(error, errors.ImagenError)


def _fail(prefix: str, line: str, status: int, debug: bool = False) -> None:
    if debug:
        traceback.print_exc()
    click.echo(prefix + line.replace("\n", " "), err=True)
    sys.exit(status)


def _usage_line(error: click.UsageError) -> str:
    ctx = error.ctx or click.get_current_context(silent=True)  # BadParameter raised by a command has no ctx
    name = ctx.command_path if ctx is not None else None
    return f"error: {error.format_message()}" + (f" (see {name} --help)" if name else "")


class OneLineCommand(click.Command):
    """A click command whose usage errors are one line, `<prefix>error: <message> (see <command> --help)`,
    with exit status 2; `--debug` on the command line keeps click's full message."""

    prefix = ""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, list(args), parent=parent, **extra)
        except click.UsageError as error:
            if "--debug" in args:
                raise
            _fail(self.prefix, _usage_line(error), EXIT_USER_ERROR)


def command(name: str, prefix: str) -> Callable:
    """`click.command` named `name`, with one-line usage errors under `prefix` and `-h` as well as `--help`."""
    cls = type("OneLineCommand", (OneLineCommand,), {"prefix": prefix})
    return click.command(name, cls=cls, context_settings=HELP_OPTIONS)
