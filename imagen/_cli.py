"""What the four command lines share: a usage error (an unknown option, a value click cannot
convert or that is out of range) is one line on stderr and exit status 2, like every other
failure; `--debug` keeps click's full usage message."""

import sys

import click


class OneLineCommand(click.Command):
    """A click command whose usage errors print `<prefix><message> (see <command> --help)`."""

    error_prefix = "error: "

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, list(args), parent=parent, **extra)
        except click.UsageError as error:
            if "--debug" in args:
                raise
            name = info_name or self.name
            message = f"{self.error_prefix}{error.format_message()} (see {name} --help)"
            click.echo(message.replace("\n", " "), err=True)
            sys.exit(2)


def one_line_command(prefix: str) -> type:
    """OneLineCommand with the command's own error prefix (`imagen-train: error: `, `error: `)."""
    return type("OneLineCommand", (OneLineCommand,), {"error_prefix": prefix})
