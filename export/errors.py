"""The export's own error: a failed step of `imagen-export` that the user can act on."""


class ExportError(RuntimeError):
    """An export step failed; the message names the stage and what to do."""
