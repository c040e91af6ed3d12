"""`imagen-eval`: prompt adherence of a bundle on `shapes` captions."""

import json
import sys
from pathlib import Path

import click

from imagen._cli import command, run_command
from imagen._io import atomic_save
from imagen.runtime.backends import BACKENDS, PRECISION_HELP, PRECISIONS
from imagen.runtime.contract import SAMPLER_NAMES

from .scenes import SPLITS

PREFIX = ""  # imagen-eval's lines are `error: ...`

precision_option = click.option(  # as imagen-run's
    "--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True, help=PRECISION_HELP
)


@command("imagen-eval", PREFIX)
@click.option(
    "--bundle", type=click.Path(path_type=Path), default=None, help="Bundle folder (default: the built-in demo bundle)."
)
@click.option(
    "--prompts",
    "split",
    type=click.Choice(SPLITS),
    default="train",
    show_default=True,
    help="Captions from the training distribution, or only the held-out (colour, shape) pairs.",
)
@click.option("--n", type=click.IntRange(min=1), default=100, show_default=True, help="Number of captions.")
@click.option(
    "--sampler", type=click.Choice(list(SAMPLER_NAMES)), default=None, help="Sampler (default: the bundle's)."
)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps per Unet (default: the bundle's).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale.")
@click.option(
    "--sr-strength",
    type=float,
    default=None,
    help="Share of steps a super-resolution Unet runs from its noised upsampled input (default: the bundle's).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the first image.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@precision_option
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads per session (default: the CPUs this process may run on).",
)
@click.option(
    "--grid",
    type=click.Path(path_type=Path),
    default=None,
    help="Save a labelled grid of the first 16 images here (PNG).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing --grid file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug, **options):
    """Generate images for N `shapes` captions and report accuracy per attribute
    (colour, shape, size, position), the exact-match rate and images per second."""
    run_command(lambda: _run(**options), debug=debug, prefix=PREFIX)


def _run(
    bundle,
    split,
    n,
    sampler,
    steps,
    guidance,
    sr_strength,
    seed,
    batch_size,
    backend,
    precision,
    threads,
    grid,
    as_json,
    force,
    quiet,
):
    from imagen.runtime import Pipeline

    from .evaluate import evaluate, format_report, make_grid

    if grid is not None and grid.exists() and not force:
        raise FileExistsError(f"{grid} exists; pass --force to overwrite it or choose another --grid path")
    pipeline = Pipeline.load(bundle, backend=backend, threads=threads, precision=precision)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"eval {split}", unit="image", file=sys.stderr)
    try:
        report = evaluate(
            pipeline,
            split,
            n,
            batch_size=batch_size,
            seed=seed,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance,
            sr_strength=sr_strength,
            progress=bar.update if bar else None,
        )
    finally:
        if bar:
            bar.close()
    if grid is not None:
        image = make_grid(report["images"][:16], [r["caption"] for r in report["rows"][:16]])
        atomic_save(grid, lambda tmp: image.save(tmp, format="PNG"))
    report["engine"] = {"backend": pipeline.backend_name, "precision": pipeline.precision}
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "images"}, indent=1))
    else:
        click.echo(f"{format_report(report)}  [{pipeline.backend_name} {pipeline.precision}]")


if __name__ == "__main__":
    main()
