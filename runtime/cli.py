"""imagen-run: prompts -> PNG files, over a bundle.

imagen-run "a red circle" -o circle.png --bundle bundle/ --steps 20 --seed 0
imagen-run "a red circle" "a blue square" --num-images 2 --out-dir out/ --json
imagen-run "a red panda" --bundle bundles/if --negative-prompt "blurry" -o panda.png   # DeepFloyd IF bundles
imagen-run "a red circle" --precision fp32 --verbose -o exact.png   # ONNX Runtime FP32; says what ran and why
"""

import json
import re
import sys
from pathlib import Path

import click

from imagen._cli import command, run_command
from imagen._io import atomic_save

from .backends import BACKENDS, PRECISION_HELP, PRECISIONS, PROVIDER_SETS
from .contract import SAMPLER_NAMES
from .errors import ParameterError
from .png import encode_png

PREFIX = ""  # imagen-run's lines are `error: ...`


def slug(prompt: str, limit: int = 40) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "image"


def output_paths(count: int, prompts: list[str], per_prompt: int, out: str | None, out_dir: str | None) -> list[Path]:
    if out is not None and out_dir is not None:
        raise ValueError("pass either -o/--out (one image) or --out-dir (several), not both")
    if out is not None:
        if count != 1:
            raise ValueError(f"-o/--out names one file but {count} images are requested; use --out-dir DIR")
        return [Path(out)]
    folder = Path(out_dir if out_dir is not None else "imagen-out")
    return [folder / f"{i:03d}-{slug(prompts[i // per_prompt])}.png" for i in range(count)]


def write_png(image, path: Path, info: dict, force: bool) -> None:
    """Writes the PNG with its settings as text chunks (`encode_png`, as imagen-serve answers it),
    atomically (never a half-written PNG); an existing file only with `force`."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    png = encode_png(image, info)
    atomic_save(path, lambda tmp: tmp.write_bytes(png))


class _Progress:
    """A tqdm bar per stage on stderr, driven by the pipeline callback."""

    def __init__(self, steps: list[int], names: list[str]):
        from tqdm import tqdm

        self._tqdm, self.steps, self.names, self.bar, self.stage = tqdm, steps, names, None, None

    def __call__(self, stage, step, t, x):
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = self._tqdm(total=self.steps[stage], desc=self.names[stage], file=sys.stderr, leave=True)
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def check_negative_prompt(pipe, negative_prompt: str | None) -> None:
    """ParameterError naming --negative-prompt when it is given for a bundle that takes none."""
    if negative_prompt is not None and not pipe.negative_prompts:
        raise ParameterError(
            "--negative-prompt",
            "left out for this bundle: it uses a learned null text for guidance's unconditional rows, "
            "not a negative prompt (bundles exported from DeepFloyd IF take one)",
            negative_prompt,
        )


# ONNX Runtime's execution providers by short name (imagen-serve takes the same option)
providers_option = click.option(
    "--providers",
    type=click.Choice(list(PROVIDER_SETS)),
    default="cpu",
    show_default=True,
    help="ONNX Runtime's execution providers: cuda and tensorrt need onnxruntime-gpu; auto takes the best installed.",
)

# the Unets' precision (imagen-eval takes the same option; imagen-serve and the Ray app a `precision` field)
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True, help=PRECISION_HELP
)


@command("imagen-run", PREFIX)
@click.argument("prompts", nargs=-1, required=True)
@click.option("--bundle", "bundle", type=click.Path(), default=None, help="Bundle folder (default: built-in demo).")
@click.option("-o", "--out", default=None, help="Output PNG for a single image.")
@click.option("--out-dir", default=None, help="Folder for several images (default imagen-out/).")
@click.option("--seed", type=int, default=None, help="Random seed (default: random, reported).")
@click.option("--steps", type=int, default=None, help="Sampler steps per Unet (default: the bundle's).")
@click.option(
    "--sampler", type=click.Choice(list(SAMPLER_NAMES)), default=None, help="Sampler (default: the bundle's)."
)
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale.")
@click.option(
    "--negative-prompt",
    default=None,
    help="What the images should not show: guidance's unconditional rows come from this text (bundles "
    "exported from DeepFloyd IF; default: the empty prompt). Other bundles use a learned null text and refuse it.",
)
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta.")
@click.option(
    "--sr-strength",
    type=float,
    default=None,
    help="Share of steps a super-resolution Unet runs from its noised upsampled input, in (0, 1] "
    "(1: from pure noise; default: the bundle's).",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="Engine: auto takes TensorRT on a GPU with the bundle's engines, else the fastest CPU engine for --precision.",
)
@precision_option
@providers_option
@click.option(
    "--threads", type=int, default=None, help="CPU threads per session (default: the CPUs this process may run on)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--verbose", is_flag=True, help="Say on stderr which engine and precision run, and why.")
@click.option("--json", "as_json", is_flag=True, help="Print per-image info as JSON on stdout.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug, **options):
    """Generate images for PROMPT(s) with an exported bundle."""
    run_command(lambda: _run(**options), debug=debug, prefix=PREFIX)


def _run(
    prompts,
    bundle,
    out,
    out_dir,
    seed,
    steps,
    sampler,
    guidance,
    negative_prompt,
    num_images,
    eta,
    sr_strength,
    backend,
    precision,
    providers,
    threads,
    quiet,
    verbose,
    as_json,
    force,
):
    prompts = list(prompts)
    from .pipeline import Pipeline

    count = len(prompts) * max(num_images, 1)
    paths = output_paths(count, prompts, max(num_images, 1), out, out_dir)
    if not force:
        for path in paths:
            if path.exists():
                raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    providers = PROVIDER_SETS[providers]
    with Pipeline.load(bundle, backend=backend, providers=providers, threads=threads, precision=precision) as pipe:
        if verbose:
            click.echo(f"engine: {pipe.choice.reason}", err=True)
        check_negative_prompt(pipe, negative_prompt)
        progress = None
        if not quiet and sys.stderr.isatty():
            calls = pipe.model_calls(pipe.settings(steps=steps, sr_strength=sr_strength))
            progress = _Progress(calls, [unet.name for unet in pipe.bundle.unets])
        try:
            result = pipe(
                prompts,
                steps=steps,
                sampler=sampler,
                guidance_scale=guidance,
                seed=seed,
                num_images_per_prompt=num_images,
                eta=eta,
                sr_strength=sr_strength,
                callback=progress,
                negative_prompt=negative_prompt,
            )
        finally:
            if progress is not None:
                progress.close()
    for image, info, path in zip(result.array, result.info, paths, strict=False):
        write_png(image, path, info, force)
        info["file"] = str(path)
        if not quiet and not as_json:
            click.echo(f"wrote {path}", err=True)
    if as_json:
        click.echo(json.dumps(result.info, indent=2))


if __name__ == "__main__":
    main()
