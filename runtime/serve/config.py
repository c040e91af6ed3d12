"""The servers' configuration, declared once: `ServeConfig`, what imagen-serve and the Ray app take.

Each field that a user sets carries an `Option` in its metadata (`option(...)`): its help, its type
and range, and the front ends that take it. imagen-serve derives its click options from it
(`serve/cli.py`); the Ray app parses `serve run ... key=value` strings and a Serve config file's
typed `args:` with `parse_options` (`serve/ray.py`, whose Ray-only deployment fields are declared
the same way). A bad value raises `ArgumentError`, one line that names the argument and the fix.
Fields without an `Option` (`api_key` from IMAGEN_API_KEY, the body limit, the warm-up) are set in
code. No web framework and no Ray are imported here.
"""

import dataclasses
import math
from collections.abc import Callable

from imagen.runtime.backends import BACKENDS, PRECISION_HELP, PRECISIONS, PROVIDER_SETS

API_KEY_VARIABLE = "IMAGEN_API_KEY"
CLI, RAY = "imagen-serve", "ray"  # the front ends


class ArgumentError(ValueError):
    """An argument that cannot be used: names it, what is wrong and the fix."""

    def __init__(self, name: str, problem: str):
        self.name = name
        super().__init__(f"{name}: {problem}")


@dataclasses.dataclass(frozen=True)
class Option:
    """How a field is set from outside: `kind` is int, float or str; `minimum`/`maximum` bound a
    number (`above`: the minimum itself is refused); `choices` lists the allowed strings; `words`
    are values allowed besides the range, with how a message names them; `parse(name, value)`
    replaces all of that; `front_ends` take the field (imagen-serve, the Ray app or both)."""

    help: str
    kind: type = str
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    words: tuple[tuple[object, str], ...] = ()
    parse: Callable | None = None
    front_ends: tuple[str, ...] = (CLI, RAY)


def option(default, help: str, **spec):
    """A dataclass field with this default and an `Option` (help, type, range, front ends)."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **spec)})


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How a server loads the bundle, batches and what it accepts. `max_queue_images` None: 4 full batches."""

    bundle: str | None = option(None, "Bundle folder (default: the built-in demo).")
    backend: str = option("auto", "Inference backend (as for imagen-run).", choices=tuple(BACKENDS))
    precision: str = option("fp32", PRECISION_HELP, choices=tuple(PRECISIONS))
    providers: str = option(
        "cpu",
        "ONNX Runtime's execution providers: cuda and tensorrt need onnxruntime-gpu; auto takes the best installed.",
        choices=tuple(PROVIDER_SETS),
    )
    threads: int | None = option(
        None, "CPU threads per session (default: the CPUs this process may run on).", kind=int, minimum=1
    )
    host: str = option("127.0.0.1", "Address to listen on.", front_ends=(CLI,))
    port: int = option(8000, "Port (0: any free one).", kind=int, minimum=0, maximum=65535, front_ends=(CLI,))
    max_wait_ms: float = option(
        10.0,
        "How long the oldest queued request waits for others to share its batch.",
        kind=float,
        minimum=0,
        maximum=10_000,
    )
    max_queue_images: int | None = option(
        None,
        "Images the queue holds before it answers 429 (default: 4 full batches).",
        kind=int,
        minimum=1,
        front_ends=(CLI,),
    )
    timeout_s: float = option(
        120.0, "Time limit of one request, queue included (504 after it).", kind=float, minimum=0, above=True
    )
    max_prompt_chars: int = option(4000, "Longest prompt accepted (400 beyond).", kind=int, minimum=1)
    log_level: str = option(
        "info", "uvicorn's log level.", choices=("debug", "info", "warning", "error"), front_ends=(CLI,)
    )
    max_body_bytes: int = 64 * 1024
    api_key: str | None = None
    warmup: bool = True

    def queue_images(self, max_batch: int) -> int:
        """Images the queue holds: `max_queue_images`, or 4 full batches."""
        return self.max_queue_images or 4 * max_batch


def option_fields(cls, front_end: str) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that `front_end` takes, in declaration order."""
    return [
        field
        for field in dataclasses.fields(cls)
        if "option" in field.metadata and front_end in field.metadata["option"].front_ends
    ]


def parse_options(classes: tuple, args: dict, front_end: str) -> list[dict]:
    """`args` (strings from a command line, or typed values from a config file) checked and typed for
    the fields of each dataclass in `classes` that `front_end` takes: one dict of values per class.
    ArgumentError names an unknown or bad argument."""
    fields = [{field.name: field for field in option_fields(cls, front_end)} for cls in classes]
    known = [name for names in fields for name in names]
    for name in args:
        if name not in known:
            raise ArgumentError(name, f"is not an argument of this app; the known ones are {', '.join(known)}")
    return [
        {name: parse_value(names[name], value) for name, value in args.items() if name in names} for names in fields
    ]


def parse_value(field: dataclasses.Field, value):
    """One argument's value, typed and checked against its field's `Option`."""
    spec, name = field.metadata["option"], field.name
    if spec.parse is not None:
        return spec.parse(name, value)
    if field.default is None and value in (None, "", "none"):
        return None
    for word, _ in spec.words:
        if value == word or (isinstance(value, str) and value == str(word)):
            return word
    if spec.choices:
        if value not in spec.choices:
            raise ArgumentError(name, f"must be one of {', '.join(spec.choices)}, got {value!r}")
        return value
    if spec.kind is int:
        return _whole_number(name, spec, value, field.default)
    if spec.kind is float:
        return _number(name, spec, value, field.default)
    if not isinstance(value, str):
        raise ArgumentError(name, f"must be text, got {value!r}")
    return value


def range_text(spec: Option) -> str:
    """'>= 1', '> 0' or 'in [0, 65535]'."""
    if spec.maximum is not None:
        return f"in [{spec.minimum:g}, {spec.maximum:g}]"
    return f"{'>' if spec.above else '>='} {spec.minimum:g}"


def _in_range(spec: Option, value) -> bool:
    low = spec.minimum is None or value > spec.minimum or (value == spec.minimum and not spec.above)
    return low and (spec.maximum is None or value <= spec.maximum)


def _out_of_range(name: str, spec: Option, what: str, value, default) -> ArgumentError:
    others = "".join(f" or {text}" for _, text in spec.words)
    example = default if default is not None else spec.minimum if spec.minimum is not None else 1
    return ArgumentError(name, f"must be {what} {range_text(spec)}{others}, got {value!r}; e.g. {name}={example:g}")


def _whole_number(name: str, spec: Option, value, default) -> int:
    if isinstance(value, str) and value.strip().removeprefix("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not _in_range(spec, value):
        raise _out_of_range(name, spec, "a whole number", value, default)
    return value


def _number(name: str, spec: Option, value, default) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not _in_range(spec, value):
        raise _out_of_range(name, spec, "a number", value, default)
    return float(value)
