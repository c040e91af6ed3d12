"""imagen-batch: a file of prompts -> WebDataset shards and an index (docs/batch.md).

imagen-batch prompts.txt --out shards/ --steps 20
imagen-batch prompts.jsonl --out shards/ --bundle bundle/ --shard-size 500
imagen-batch prompts.parquet --out shards/ --ray --replicas 4 --gpus-per-replica 1 --providers cuda

Exit status: 0 when every row made its images; 2 when some rows failed (they are error rows in the
index, and the last line counts them) or on a user error; 130 when interrupted (a rerun resumes).
"""

import sys

import click

from imagen._cli import command, run_command

from ..backends import BACKENDS, PROVIDER_SETS
from ..cli import providers_option
from ..contract import SAMPLER_NAMES
from .rows import FORMATS, BatchError, Defaults
from .shards import INDEX_FORMATS

PREFIX = "imagen-batch: "
SHOWN_ERRORS = 10


@command("imagen-batch", PREFIX)
@click.argument("prompts", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder for shards and index.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", *FORMATS]),
    default="auto",
    show_default=True,
    help="Prompts format (auto: .jsonl/.ndjson JSONL, .parquet Parquet, else one prompt a line).",
)
@click.option("--bundle", type=click.Path(), default=None, help="Bundle folder (default: built-in demo).")
@click.option("--steps", type=int, default=None, help="Steps per Unet for rows without their own.")
@click.option("--sampler", type=click.Choice(list(SAMPLER_NAMES)), default=None, help="Sampler for rows without one.")
@click.option("--guidance", type=float, default=None, help="Guidance scale for rows without one.")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta for rows without one.")
@click.option("--sr-strength", type=float, default=None, help="sr_strength for rows without one, in (0, 1].")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images of rows without their own n.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Rows per shard.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per engine batch (default: max).")
@click.option(
    "--index", "index", type=click.Choice(INDEX_FORMATS), default="parquet", show_default=True, help="Index format."
)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@providers_option
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per session (per replica).")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Data (the ray extra): RAY_ADDRESS, or a local Ray.")
@click.option(
    "--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Ray actors, one pipeline each."
)
@click.option("--cpus-per-replica", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar and no summary line.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug, **options):
    """Generate the images of a PROMPTS file into WebDataset shards under --out, with an index."""
    run_command(lambda: _run(**options), debug=debug, prefix=PREFIX)


def _run(prompts, out, fmt, steps, sampler, guidance, eta, sr_strength, num_images, quiet, providers, **options):
    from .job import run_job

    defaults = Defaults(num_images, steps, sampler, guidance, eta, sr_strength)
    summary = run_job(
        prompts,
        out,
        fmt=fmt,
        defaults=defaults,
        providers=PROVIDER_SETS[providers],
        progress=not quiet and sys.stderr.isatty(),
        **options,
    )
    for row in summary.errors[:SHOWN_ERRORS]:
        click.echo(f"{PREFIX}{row['error']}: {row['message']}", err=True)
    if len(summary.errors) > SHOWN_ERRORS:
        click.echo(f"{PREFIX}... and {len(summary.errors) - SHOWN_ERRORS} more error rows", err=True)
    if not quiet:
        click.echo(PREFIX + summary.line(), err=True)
    if summary.errors:
        raise BatchError(
            f"{len(summary.errors)} of {summary.rows} rows failed and made no image (status error in {summary.index}); "
            f"the other rows' {summary.images} images are written; put the fixed rows in a new prompts file "
            "and run it with another --out"
        )


if __name__ == "__main__":
    main()
