"""The rows of a batch job: a prompts file read into records, each record checked into a `Row`, and
the rows planned into shards and engine batches (docs/batch.md).

A record is a line of a text or JSONL file, or a row of a Parquet file (a dict). Every problem of a
row (bad JSON, no prompt, an unknown field, a bad id, a setting out of range, an empty prompt)
makes it an error row carrying the typed error's name and message; the job goes on without it. A
duplicate id is the one problem of the whole file: `check_unique_ids` refuses it before any work.

Rows are checked against the bundle (`load_bundle`: its default settings and max batch) without
opening an engine, so the driver of a Ray job never loads one. The plan depends on nothing but the
rows and the two sizes: shard k holds rows [k * shard_size, (k + 1) * shard_size), and each shard's
good rows form engine batches by imagen-serve's rule (the oldest row, then each later row with its
settings whose images still fit). A run in-process and a run on Ray feed the engines the same
batches, so they write the same bytes.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

from ..contract.settings import Settings, is_int
from ..errors import ImagenError, ParameterError, PromptError
from ..tokenizer import validate_prompt

FORMATS = ("text", "jsonl", "parquet")
SETTING_FIELDS = ("steps", "sampler", "guidance_scale", "eta", "sr_strength")
FIELDS = ("id", "prompt", "seed", "n", *SETTING_FIELDS, "negative_prompt")
MAX_ID_CHARS = 128
PYARROW_HINT = "pip install 'imagen-cascade[batch]' (or pip install pyarrow)"


class RowError(ImagenError, ValueError):
    """A row that cannot be generated as written: not JSON, no prompt, an unknown field, a bad id."""


class BatchError(ImagenError, ValueError):
    """A batch job that cannot run or did not finish cleanly: the message says what and what to do."""


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The command line's values for rows that give none (None: the bundle's default)."""

    n: int = 1
    steps: int | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    eta: float = 0.0
    sr_strength: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: where it is (`position` from 0, `line` from 1), what it asks for, or why it cannot run
    (`error`: the typed error's name and its message). `settings` carry no seed; `seed` is the row's."""

    position: int
    line: int
    id: str | None = None
    prompt: str | None = None
    seed: int | None = None
    n: int = 1
    settings: Settings | None = None
    negative_prompt: str | None = None
    error: tuple[str, str] | None = None

    @property
    def keys(self) -> list[str]:
        """The WebDataset keys of its images: `{id}_{i}` (the last `_` splits the id from the index)."""
        return [f"{self.id}_{index}" for index in range(self.n)]

    def to_json(self) -> dict:
        """What travels to a Ray worker (JSON, no pickles); `from_json` makes the same Row."""
        values = dataclasses.asdict(self)
        values["settings"] = None if self.settings is None else self.settings.to_info()
        return values

    @classmethod
    def from_json(cls, values: dict) -> "Row":
        values = dict(values)
        settings = values.pop("settings")
        if settings is not None:
            guidance = settings["guidance_scale"]
            settings = Settings(
                sampler=settings["sampler"],
                steps=tuple(settings["steps"]),
                guidance_scale=tuple(guidance) if isinstance(guidance, list) else guidance,
                eta=settings["eta"],
                sr_strength=settings["sr_strength"],
            )
        error = values.pop("error")
        return cls(**values, settings=settings, error=None if error is None else tuple(error))


def seed_from_id(row_id: str) -> int:
    """A row's seed when it gives none: the first 8 bytes of sha256(id as UTF-8), big-endian, top bit
    cleared (in [0, 2**63)). Stable across runs, machines and Python versions, unlike `hash`."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") >> 1


def detect_format(path: str, fmt: str = "auto") -> str:
    """`fmt`, or from the name: .jsonl / .ndjson are JSONL, .parquet Parquet, anything else text."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise BatchError(f"unknown prompts format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
        return fmt
    suffix = Path(str(path)).suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def split_lines(data: bytes, path) -> list[str]:
    """The lines of a UTF-8 file as Ray's `read_text` splits them (`str.splitlines`); a final newline
    makes no empty last line."""
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BatchError(
            f"{path} is not UTF-8 text (byte {error.start} cannot be decoded); re-encode it as UTF-8"
        ) from None


def read_records(path, fmt: str) -> list:
    """The records of a local prompts file: lines (text, JSONL) or dicts (Parquet, via pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file; pass the prompts file")
    if fmt != "parquet":
        return split_lines(path.read_bytes(), path)
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise BatchError(f"reading Parquet prompts needs pyarrow: {PYARROW_HINT}") from None
    return parquet.read_table(path).to_pylist()


def records_sha256(records: list) -> str:
    """The identity of the records (the same whether a local reader or Ray's read them)."""
    text = json.dumps(records, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_id(value, where: str) -> str:
    """An id as a str: a non-empty string or an integer, at most 128 characters, with no '.', '/' or
    '\\', whitespace or control characters (it names tar members, and WebDataset ends a key at '.')."""
    if is_int(value):
        value = str(int(value))
    if not isinstance(value, str) or not value:
        raise RowError(f"{where}: 'id' must be a non-empty string or an integer, got {value!r}")
    if len(value) > MAX_ID_CHARS:
        raise RowError(f"{where}: 'id' has {len(value)} characters; use at most {MAX_ID_CHARS}")
    bad = next((char for char in value if char in "./\\" or char.isspace() or not char.isprintable()), None)
    if bad is not None:
        raise RowError(f"{where}: 'id' {value!r} contains {bad!r}; ids may not contain '.', '/', '\\' or spaces")
    return value


def _fields(record, fmt: str, line: int, where: str) -> dict:
    """The record as fields: a text line is the prompt with its line number as id."""
    if fmt == "text":
        return {"id": str(line), "prompt": record}
    if fmt == "jsonl":
        try:
            record = json.loads(record)
        except json.JSONDecodeError as error:
            raise RowError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno}); write one object a line"
            ) from None
    if not isinstance(record, dict):
        raise RowError(f"{where}: a row must be a JSON object with 'id' and 'prompt', got {type(record).__name__}")
    fields = {name: value for name, value in record.items() if value is not None}  # null: not given
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RowError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    return fields


def _plain(value):
    """JSON-like values as plain Python (Ray's readers may hand NumPy scalars and arrays)."""
    return value.tolist() if hasattr(value, "tolist") else value


def parse_row(record, position: int, fmt: str, bundle, defaults: Defaults, max_images: int) -> Row:
    """The Row of one record, or an error row with the typed error's name and message."""
    line = position + 1
    where = f"line {line}"  # in a Parquet file, the row's number
    fields: dict = {}
    try:
        fields = {name: _plain(value) for name, value in _fields(record, fmt, line, where).items()}
        if "id" not in fields:
            raise RowError(f"{where}: no 'id'; each {fmt} row needs a unique id")
        row_id = fields["id"] = check_id(fields["id"], where)
        if "prompt" not in fields:
            raise RowError(f"{where}: no 'prompt'; each row needs one")
        try:
            prompt = validate_prompt(fields["prompt"], line)
        except PromptError as error:
            raise PromptError(f"{where}: " + str(error).replace(f"prompt {line} ", "the prompt ", 1)) from None
        n = fields.get("n", defaults.n)
        if not is_int(n) or not 1 <= n <= max_images:
            raise ParameterError("n", f"an integer in [1, {max_images}] (images of a row fit one engine batch)", n)
        values = {name: fields.get(name, getattr(defaults, name)) for name in SETTING_FIELDS}
        settings = bundle.default_settings.replace(bundle.timesteps, **values, seed=fields.get("seed"))
        negative = fields.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise ParameterError("negative_prompt", "a str or null", negative)
        if negative is not None and bundle.unets[0].how_sampled.unconditional != "negative_prompt":
            raise ParameterError("negative_prompt", "null for this bundle: it takes a learned null text", negative)
        seed = seed_from_id(row_id) if settings.seed is None else settings.seed
        settings = dataclasses.replace(settings, seed=None)
        return Row(position, line, row_id, prompt, seed, int(n), settings, negative)
    except (RowError, PromptError, ParameterError) as error:
        message = str(error) if str(error).startswith(where) else f"{where}: {error}"
        row_id = fields.get("id") if isinstance(fields.get("id"), str) else None
        prompt = fields.get("prompt") if isinstance(fields.get("prompt"), str) else None
        return Row(position, line, row_id, prompt, error=(type(error).__name__, message))


def check_unique_ids(rows: list[Row], path) -> None:
    """BatchError naming every duplicate id and its lines, before any work."""
    lines: dict[str, list[int]] = {}
    for row in rows:
        if row.id is not None:
            lines.setdefault(row.id, []).append(row.line)
    duplicates = [(row_id, found) for row_id, found in lines.items() if len(found) > 1]
    if duplicates:
        shown = "; ".join(f"{row_id!r} on lines {', '.join(map(str, found))}" for row_id, found in duplicates[:5])
        more = f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""
        raise BatchError(
            f"{path} has duplicate ids: {shown}{more}; ids name the images, so each must be unique: "
            "fix them and run again (nothing was generated)"
        )


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard `index`: its file name, its rows (good and bad) and its good rows as engine batches."""

    index: int
    rows: tuple[Row, ...]
    batches: tuple[tuple[Row, ...], ...]

    @property
    def name(self) -> str:
        return f"{self.index:05d}.tar"


def engine_batches(rows: list[Row], batch_images: int) -> list[tuple[Row, ...]]:
    """imagen-serve's rule (serve/batching.py): the oldest row, then each later row with equal settings
    whose images still fit in `batch_images`; again with the rows left."""
    left, batches = list(rows), []
    while left:
        head, batch, images = left[0], [left[0]], left[0].n
        for row in left[1:]:
            if row.settings == head.settings and images + row.n <= batch_images:
                batch.append(row)
                images += row.n
        batches.append(tuple(batch))
        taken = {row.position for row in batch}
        left = [row for row in left if row.position not in taken]
    return batches


def plan_shards(rows: list[Row], shard_size: int, batch_images: int) -> list[Shard]:
    """Shards of `shard_size` rows in file order, each with its engine batches."""
    shards = []
    for index, start in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[start : start + shard_size]
        good = [row for row in chunk if row.error is None]
        shards.append(Shard(index, tuple(chunk), tuple(engine_batches(good, batch_images))))
    return shards
