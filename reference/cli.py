"""`imagen-train`: a thin click command over `imagen.reference.train.train`.

Under `torchrun --nproc-per-node N imagen-train ...` every process runs this command with the same
options and they train together (docs/training.md); rank 0 alone prints the summary.
"""

import json
import os

import click

from imagen._cli import command, run_command

from .samplers import SAMPLERS
from .train import TrainConfig, train

PREFIX = "imagen-train: "


def _int_list(value: str | None) -> tuple | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@command("imagen-train", PREFIX)
@click.option(
    "--dataset",
    default="shapes",
    show_default=True,
    help="'shapes' (built in) or a folder of images with manifest.jsonl / .csv (file, caption).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option(
    "--unet",
    "unets",
    multiple=True,
    help="Unet preset (Base, Super, BaseTest, SuperTest) or a JSON "
    "file of Unet parameters, once per stage. Default: BaseTest, then SuperTest for every further image size.",
)
@click.option("--dim", type=int, default=None, help="Override every Unet's dim.")
@click.option("--image-sizes", default="32,64", show_default=True, help="Image size per Unet.")
@click.option("--timesteps", type=int, default=1000, show_default=True)
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Images per step in all: split evenly over the torchrun processes and the --grad-accum micro-batches.",
)
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--epochs", type=float, default=None, help="Train for this many passes instead of --steps.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--cond-drop-prob", type=float, default=0.1, show_default=True)
@click.option("--guidance", type=float, default=5.0, show_default=True, help="Default guidance scale for sampling.")
@click.option(
    "--text-encoder",
    default="tiny",
    show_default=True,
    help="'tiny' (offline byte-level T5, random) or a local T5 folder.",
)
@click.option("--max-length", type=int, default=64, show_default=True, help="Text tokens per prompt.")
@click.option("--train-unets", default=None, help="Comma-separated Unet indices to train (default: all).")
@click.option(
    "--lowres-max-noise",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Super-resolution training: low-res noise augmentation times drawn below this fraction of T.",
)
@click.option("--ema-decay", type=float, default=0.999, show_default=True)
@click.option(
    "--grad-accum",
    type=int,
    default=1,
    show_default=True,
    help="Micro-batches per step (each process takes batch-size / (processes x grad-accum) images at a time).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Autocast precision of the Unets' forward pass (fp16 adds a gradient scaler); weights and EMA stay FP32.",
)
@click.option("--val-every", type=int, default=200, show_default=True)
@click.option("--checkpoint-every", type=int, default=200, show_default=True)
@click.option("--sample-every", type=int, default=None, help="Sample grid interval (0: none).")
@click.option(
    "--preview-sampler",
    type=click.Choice(list(SAMPLERS)),
    default=TrainConfig.preview_sampler,
    show_default=True,
    help="Sampler of the sample grids.",
)
@click.option(
    "--preview-steps",
    type=click.IntRange(min=1),
    default=TrainConfig.preview_steps,
    show_default=True,
    help="Sample grid steps per Unet (capped at its timesteps).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--force", is_flag=True, help="Delete an existing --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(
    dataset,
    out,
    unets,
    dim,
    image_sizes,
    timesteps,
    schedule,
    batch_size,
    steps,
    epochs,
    lr,
    cond_drop_prob,
    guidance,
    text_encoder,
    max_length,
    train_unets,
    lowres_max_noise,
    ema_decay,
    grad_accum,
    precision,
    val_every,
    checkpoint_every,
    sample_every,
    preview_sampler,
    preview_steps,
    seed,
    threads,
    resume,
    force,
    quiet,
    debug,
):
    """Train an Imagen cascade (PyTorch reference) into a run directory."""

    def run():
        sizes = _int_list(image_sizes)
        config = TrainConfig(
            out=out,
            dataset=dataset,
            unets=tuple(unets) or ("BaseTest",) + ("SuperTest",) * (len(sizes) - 1),
            unet_overrides={"dim": dim} if dim else {},
            image_sizes=sizes,
            timesteps=timesteps,
            schedule=schedule,
            batch_size=batch_size,
            steps=steps,
            epochs=epochs,
            lr=lr,
            cond_drop_prob=cond_drop_prob,
            guidance_scale=guidance,
            text_encoder=text_encoder,
            max_length=max_length,
            train_unets=_int_list(train_unets),
            lowres_max_noise_level=lowres_max_noise,
            ema_decay=ema_decay,
            grad_accum=grad_accum,
            precision=precision,
            val_every=val_every,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
            preview_sampler=preview_sampler,
            preview_steps=preview_steps,
            seed=seed,
            threads=threads,
            resume=resume,
            force=force,
            progress=False if quiet else None,
        )
        return train(config)

    summary = run_command(run, debug=debug, prefix=PREFIX)  # Ctrl-C: TrainingInterrupted says where it saved
    if not quiet and os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
