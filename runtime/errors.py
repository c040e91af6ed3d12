"""Typed errors of the runtime. Every message says what was found and what to do.

All checks in `imagen.runtime` raise these with `if ...: raise`, never `assert`, so they
hold under `python -O`.
"""


class ImagenError(Exception):
    """Base class of every error the runtime raises on purpose."""


class BundleError(ImagenError):
    """A bundle that cannot be used: the message names the file, what differs and the fix."""


class PromptError(ImagenError, ValueError):
    """A prompt that cannot be tokenized (not a str, empty, invalid UTF-8, control characters, too long)."""


class ParameterError(ImagenError, ValueError):
    """A sampling parameter outside its range: the message names the parameter, its limit and the value."""

    def __init__(self, parameter: str, limit: str, value):
        self.parameter, self.limit, self.value = parameter, limit, value
        super().__init__(f"{parameter} must be {limit}, got {value!r}")


class SignatureError(ImagenError, ValueError):
    """Arrays that do not match a stage's signature (names, dtypes, ranks, dimensions, batch)."""


class NonFiniteError(ImagenError, FloatingPointError):
    """A stage produced NaN or infinity; names the stage and the sampler step."""

    def __init__(self, stage: str, step: int | None = None, t: int | None = None):
        self.stage, self.step, self.t = stage, step, t
        where = stage if step is None else f"{stage} at step {step} (t={t})"
        super().__init__(
            f"{where} produced non-finite values (NaN or inf); the bundle's weights or the "
            "requested guidance scale may be broken, try another bundle or a lower --guidance"
        )


class BackendError(ImagenError, RuntimeError):
    """An inference backend that is not available here or failed to run."""
