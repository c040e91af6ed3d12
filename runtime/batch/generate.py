"""The per-batch function of imagen-batch, and the in-process runner that calls it.

`generate_batch(pipe, rows, batch)` is the one piece of work, the same in-process and in each Ray
replica: one engine batch of rows that share their settings, as one `Pipeline.generate` call (each
row a `Request` with its own prompt, image count and seed), each image encoded as a PNG with its
settings (`encode_png`, as imagen-run writes them). It returns records: one per image, or, when the
runtime refuses or fails the batch with one of its typed errors (a non-finite result, a backend
failure), one error record per row, so the job goes on and the index says what happened. Anything
else is a bug and stops the job; the shards written so far stay, and a rerun resumes.

An image's `{key}.json` is its info (`Result.info`) without the batch's timings, which change from
run to run, and with the row's id, key and line: what it holds is fixed by the row, its batch and
the bundle, so a rerun, a resumed run and a run on Ray write the same bytes.
"""

from ..errors import ImagenError
from ..png import encode_png
from ..requests import Request
from .rows import Row
from .shards import OK, error_record, image_record


def image_info(row: Row, index: int, info: dict) -> dict:
    """What `{key}.json` holds: the runtime's info of the image less its timings, with the row's id, key and line."""
    kept = {name: value for name, value in info.items() if name != "timings"}
    return {**kept, "id": row.id, "key": row.keys[index], "line": row.line}


def generate_batch(pipe, rows: list[Row], batch: int) -> list[dict]:
    """The records of one engine batch (`rows` share their settings; `batch` numbers it in its shard).
    Each record also says its batch and how many records the batch made, so a collector knows when
    the batch is whole however the records travel."""
    requests = [Request(row.prompt, row.n, row.seed, negative_prompt=row.negative_prompt) for row in rows]
    try:
        results = pipe.generate(requests, rows[0].settings)
        records = []
        for row, result in zip(rows, results, strict=True):
            for index, (image, raw) in enumerate(zip(result.array, result.info, strict=True)):
                info = image_info(row, index, raw)
                records.append(image_record(row, index, encode_png(image, info), info))
    except ImagenError as error:  # the batch's rows are recorded as errors; the job goes on
        records = [error_record(row, type(error).__name__, f"line {row.line}: {error}") for row in rows]
    for record in records:
        record.update(batch=batch, batch_records=len(records))
    return records


def run_local(pipe, shards: list, collector, progress=None) -> None:
    """Every engine batch of `shards` in this process, in order; `progress(images made)` after each."""
    for shard in shards:
        for number, rows in enumerate(shard.batches):
            records = generate_batch(pipe, list(rows), number)
            collector.add(shard.index, records)
            if progress is not None:
                progress(sum(record["status"] == OK for record in records))
