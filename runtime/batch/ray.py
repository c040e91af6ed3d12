"""imagen-batch on Ray Data: the prompts read by Ray's readers, the engine batches run by a pool of
replicas (docs/batch.md, Ray).

The prompts file is read with `ray.data.read_text` (text and JSONL: one record a line, so one bad
JSON line is one error row, where `read_json` would fail the whole file) or `ray.data.read_parquet`,
so it may live wherever Ray reads files (a path every node sees, s3://, gs://, ...). The driver
checks and plans the rows as a local run does (ids, duplicates and shards need the whole file),
then sends each planned engine batch as one item through `map_batches` over an actor pool of
`replicas` `BatchWorker`s, each holding one loaded `Pipeline`; a worker calls `generate_batch`,
the function a local run calls, on exactly the batches a local run makes, so the shards are the
same bytes. A batch's errors come back as error records; Ray retries a replica that dies, and a
retried batch makes the same bytes. The driver writes each shard as its batches come back.

Ray (the `ray` extra with Ray Data: pyarrow, pandas) is imported here only.
"""

import contextlib
import json
import logging
from pathlib import Path

try:
    import ray
    import ray.data
except ImportError as error:
    raise ImportError(
        f"Ray Data is not installed ({error}); install it with pip install 'imagen-cascade[ray]' "
        "(ray[data]: pyarrow and pandas; tested with ray 2.60)"
    ) from None

from .generate import generate_batch
from .rows import BatchError, Row
from .shards import OK, TRANSIT_COLUMNS, arrow_schema


def _ray_path(path) -> str:
    """A local path made absolute (Ray's readers run in other processes); a URI as given."""
    text = str(path)
    return text if "://" in text else str(Path(text).resolve())


@contextlib.contextmanager
def _ordered_and_quiet():
    """Ray Data in order (records come back as they went in, so shards complete one after another and an
    interrupt leaves the first ones whole), without its progress bars and INFO lines; put back after."""
    context, logger = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    saved = context.execution_options.preserve_order, context.enable_progress_bars, logger.level
    logger.setLevel(logging.ERROR)
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars, level = saved
        logger.setLevel(level)


def read_records_ray(path, fmt: str) -> list:
    """The records of a prompts file through Ray's readers, in file order: lines, or dicts for Parquet."""
    if "://" not in str(path) and not Path(path).is_file():
        raise FileNotFoundError(f"{path} is not a file; pass the prompts file")
    with _ordered_and_quiet():
        return _read(path, fmt)


def _read(path, fmt: str) -> list:
    try:
        if fmt == "parquet":
            dataset = ray.data.read_parquet(_ray_path(path))
        else:
            dataset = ray.data.read_text(_ray_path(path), drop_empty_lines=False)
        records = []
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            records += table.to_pylist() if fmt == "parquet" else table.column("text").to_pylist()
    except UnicodeDecodeError as error:  # Ray's task error is also an instance of its cause
        raise BatchError(f"{path} is not UTF-8 text ({error.reason}); re-encode it as UTF-8") from None
    return records


class BatchWorker:
    """One replica: the bundle loaded once (`Pipeline.load`); each call runs its planned engine batches."""

    def __init__(self, bundle, backend: str, providers, threads: int | None):
        from imagen.runtime import Pipeline

        self.pipe = Pipeline.load(bundle, backend=backend, providers=providers, threads=threads)

    def __call__(self, batch: dict):
        import pyarrow

        records = []
        for item in batch["work"]:
            work = json.loads(str(item))
            rows = [Row.from_json(row) for row in work["rows"]]
            records += [
                {**record, "shard_index": work["shard"]} for record in generate_batch(self.pipe, rows, work["batch"])
            ]
        return pyarrow.Table.from_pylist(records, schema=arrow_schema(TRANSIT_COLUMNS))


def run_ray(
    shards: list,
    collector,
    *,
    bundle,
    backend: str = "auto",
    providers=None,
    threads: int | None = None,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    progress=None,
) -> None:
    """Every engine batch of `shards` on `replicas` Ray actors; records go to `collector` as they come.
    `threads` None: each replica's sessions take `cpus_per_replica` threads (at least 1). Joins the
    running Ray instance, or `ray.init()`s one (RAY_ADDRESS, or a new local one, shut down after)."""
    items = [
        {"work": json.dumps({"shard": shard.index, "batch": number, "rows": [row.to_json() for row in rows]})}
        for shard in shards
        for number, rows in enumerate(shard.batches)
    ]
    if not items:
        return
    if replicas < 1 or cpus_per_replica < 0 or gpus_per_replica < 0:
        raise BatchError("--replicas must be >= 1, and --cpus-per-replica and --gpus-per-replica >= 0")
    worker = {"bundle": None if bundle is None else _ray_path(bundle), "backend": backend, "providers": providers}
    worker["threads"] = max(1, int(cpus_per_replica)) if threads is None else threads  # as the Ray Serve app
    started = not ray.is_initialized()
    if started:
        ray.init(logging_level="ERROR", log_to_driver=False)
    try:
        with _ordered_and_quiet():
            blocks = min(len(items), 200 * replicas)  # enough for the pool to balance, few enough to track
            dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                BatchWorker,
                fn_constructor_kwargs=worker,
                batch_size=1,  # one planned engine batch per call, as a local run makes them
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(replicas, len(items))),  # none idle, loading a bundle
                num_cpus=cpus_per_replica,
                num_gpus=gpus_per_replica,
            )
            for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                records = table.to_pylist()
                for record in records:
                    collector.add(record["shard_index"], [record])
                if progress is not None:
                    progress(sum(record["status"] == OK for record in records))
    finally:
        if started:
            ray.shutdown()
