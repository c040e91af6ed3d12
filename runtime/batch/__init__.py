"""imagen-batch: images for a file of prompts, written as WebDataset shards with an index (docs/batch.md).

    imagen-batch prompts.jsonl --out shards/ --steps 20          # in this process, with a progress bar
    imagen-batch prompts.jsonl --out shards/ --ray --replicas 4  # on Ray Data, one pipeline per replica

    from imagen.runtime.batch import run_job
    summary = run_job("prompts.jsonl", "shards/", shard_size=500)

Modules: `rows` (reading a prompts file, checking each row, seeds from ids, the plan of shards and
engine batches; no engines), `shards` (the output folder: shards, rows files, index, job file, and
the collector that writes a shard once its batches are in), `generate` (the per-batch function,
`generate_batch`, and the in-process runner), `ray` (Ray's readers and an actor pool running the
same function; Ray is imported there only), `job` (`run_job`: one job from start to end) and `cli`.
"""

__all__ = ["run_job", "Summary", "Defaults", "BatchError", "RowError", "seed_from_id"]


def __getattr__(name):
    # lazy, so that `imagen.runtime.batch.rows` and the command's --help load nothing heavy
    if name in ("run_job", "Summary"):
        from . import job

        return getattr(job, name)
    if name in ("Defaults", "BatchError", "RowError", "seed_from_id"):
        from . import rows

        return getattr(rows, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
