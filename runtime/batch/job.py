"""One batch job from start to end: read, check, plan, skip what is done, generate, write the index.

`run_job` is what imagen-batch calls and what a program or a test calls directly. Every check that
can fail before any work does: the index's pyarrow, the prompts file, duplicate ids, and an output
folder that holds another job. Then the shards that are not complete are generated, in-process or
on Ray, and written as they complete; an interrupt (Ctrl-C) or a failure keeps every complete shard
and the index of them, and the same call again resumes. Rows that failed do not stop the job:
`Summary.errors` counts them (imagen-batch then exits with status 2).
"""

import contextlib
import dataclasses
import sys
from pathlib import Path

from ..bundle import load_bundle
from ..errors import ParameterError
from .generate import run_local
from .rows import BatchError, Defaults, check_unique_ids, detect_format, parse_row, plan_shards, read_records
from .rows import records_sha256 as sha256_of
from .shards import ERROR, OK, JobFolder, ShardCollector, require_pyarrow

JOB_FORMAT, JOB_VERSION = "imagen-batch", 1


@dataclasses.dataclass
class Summary:
    """What the folder holds after a run: rows, images, error rows (with their messages), shards, and
    what this run did (shards and images it wrote)."""

    out: Path
    index: Path
    rows: int
    images: int
    errors: list[dict]
    shards: int
    shards_written: int
    images_written: int

    def line(self) -> str:
        earlier = self.shards - self.shards_written
        done = f" ({earlier} {'was' if earlier == 1 else 'were'} complete already)" if earlier else ""
        failed = f"; {count(len(self.errors), 'row')} failed (status error in {self.index.name})" if self.errors else ""
        made = f"{count(self.images, 'image')} of {count(self.rows, 'row')} in {count(self.shards, 'shard')}"
        return f"{made} in {self.out}{done}{failed}"


def count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="imagen-batch", unit="image", file=sys.stderr)


def run_job(
    prompts,
    out,
    *,
    bundle=None,
    fmt: str = "auto",
    defaults: Defaults = Defaults(),
    shard_size: int = 1000,
    batch_size: int | None = None,
    index: str = "parquet",
    backend: str = "auto",
    providers=None,
    threads: int | None = None,
    use_ray: bool = False,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    pipe=None,
    progress: bool = False,
    on_shard=None,
) -> Summary:
    """Generates the images of the prompts file `prompts` into the folder `out` (docs/batch.md).
    `pipe`: an open Pipeline to use in-process (default: `bundle` loaded when there is work);
    `on_shard(name)`: called after each shard is written; `progress`: a tqdm bar on stderr."""
    if index == "parquet":
        require_pyarrow("the Parquet index")
    loaded = pipe.bundle if pipe is not None else load_bundle(bundle if bundle is not None else _demo())
    rows, shards, job = plan_job(prompts, loaded, fmt, defaults, shard_size, batch_size, use_ray)
    job["index"] = index
    engines = {"bundle": bundle, "backend": backend, "providers": providers, "threads": threads}
    with JobFolder(out, job, index) as folder:
        done_rows, todo = [], []
        for shard in shards:
            complete = folder.complete(shard.name)
            if complete is None:
                todo.append(shard)
            else:
                done_rows += complete
        collector = ShardCollector(folder, todo, done_rows, on_shard)
        total = sum(row.n for shard in todo for batch in shard.batches for row in batch)
        bar = _progress_bar(total, progress)
        update = bar.update if bar is not None else None
        try:
            collector.start()
            if use_ray and total:
                from .ray import run_ray

                resources = {"cpus_per_replica": cpus_per_replica, "gpus_per_replica": gpus_per_replica}
                run_ray(todo, collector, **engines, replicas=replicas, **resources, progress=update)
            elif total:
                _run_here(pipe, todo, collector, engines, update)
        except KeyboardInterrupt:
            folder.write_index(collector.rows)
            complete = len(shards) - len(todo) + collector.written
            raise KeyboardInterrupt(
                f"interrupted: {complete} of {len(shards)} shards are complete in {out}; "
                "run the same command again to resume"
            ) from None
        except BaseException:
            with contextlib.suppress(Exception):  # the first failure is the one to report
                folder.write_index(collector.rows)
            raise
        finally:
            if bar is not None:
                bar.close()
        folder.write_index(collector.rows)
        missing = collector.missing()
        if missing:
            raise BatchError(
                f"the engine batches of {len(missing)} shards did not all come back ({', '.join(missing[:3])}, ...); "
                "run the same command again to generate them"
            )
    made = sum(row["status"] == OK for row in collector.rows)
    return Summary(
        out=Path(out),
        index=folder.index_path,
        rows=len(rows),
        images=made,
        errors=[row for row in collector.rows if row["status"] == ERROR],
        shards=len(shards),
        shards_written=collector.written,
        images_written=made - sum(row["status"] == OK for row in done_rows),
    )


def plan_job(prompts, bundle, fmt, defaults: Defaults, shard_size, batch_size, use_ray: bool) -> tuple:
    """(rows, shards, the job's identity) of a prompts file: read (by Ray's readers with `use_ray`),
    every row checked, duplicate ids refused, the shards and engine batches planned."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ParameterError("shard_size", "an integer >= 1 (rows per shard)", shard_size)
    limit = bundle.max_batch
    if batch_size is not None and (not isinstance(batch_size, int) or not 1 <= batch_size <= limit):
        raise ParameterError("batch_size", f"an integer in [1, {limit}] (the bundle's max batch)", batch_size)
    batch_images = batch_size or limit
    fmt = detect_format(prompts, fmt)
    if use_ray:
        from .ray import read_records_ray

        records = read_records_ray(prompts, fmt)
    else:
        records = read_records(prompts, fmt)
    if records and isinstance(records[0], str):
        records[0] = records[0].removeprefix("\ufeff")  # a byte order mark is not part of the first line
    rows = [parse_row(record, position, fmt, bundle, defaults, batch_images) for position, record in enumerate(records)]
    check_unique_ids(rows, prompts)
    job = {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "records_sha256": sha256_of(records),
        "prompts_format": fmt,
        "rows": len(rows),
        "bundle_sha256": bundle.sha256,
        "defaults": dataclasses.asdict(defaults),
        "shard_size": shard_size,
        "batch_images": batch_images,
    }
    return rows, plan_shards(rows, shard_size, batch_images), job


def _demo():
    from ..pipeline import DEMO_BUNDLE

    return DEMO_BUNDLE


def _run_here(pipe, todo, collector, engines: dict, progress) -> None:
    """The batches in this process, with `pipe` or the bundle loaded for the run (and closed after)."""
    if pipe is not None:
        run_local(pipe, todo, collector, progress)
        return
    from ..pipeline import Pipeline

    bundle = engines["bundle"]
    with Pipeline.load(bundle, **{key: engines[key] for key in ("backend", "providers", "threads")}) as own:
        run_local(own, todo, collector, progress)
