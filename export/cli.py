"""`imagen-export`: a thin click command over `imagen.export.bundle.export_bundle`. Its options are
`ExportOptions`' fields, with `ExportOptions`' defaults and ranges."""

import click

from imagen._cli import command, run_command
from imagen.runtime.contract import SAMPLER_NAMES

from .bundle import export_bundle
from .errors import ExportError
from .options import MAX_BATCH_LIMIT, OPSETS, WEIGHT_KINDS, ExportOptions

PREFIX = "imagen-export: "
DEFAULTS = ExportOptions()


@command("imagen-export", PREFIX)
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(),
    help="A run directory of imagen-train, a MinImagen training directory, a DeepFloyd IF stage I "
    "folder (IFPipeline.save_pretrained), or an imagen-pytorch checkpoint (ImagenTrainer.save).",
)
@click.option(
    "--stage2",
    type=click.Path(),
    default=None,
    help="DeepFloyd IF: the stage II folder (IFSuperResolutionPipeline.save_pretrained) that upscales stage I.",
)
@click.option(
    "--config",
    type=click.Path(),
    default=None,
    help='imagen-pytorch: a JSON file of the cascade\'s parameters ({"type": "original" or "elucidated", '
    '"imagen": {...}}), for a checkpoint saved without them (a cascade not built from ImagenConfig).',
)
@click.option("--ema", is_flag=True, help="imagen-pytorch: export the EMA weights (what ImagenTrainer.sample uses).")
@click.option("--out", default="bundle", show_default=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--fp16", is_flag=True, help="FP16 Unets (FP32 inputs and outputs); the T5 encoder stays FP32.")
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines for this machine's GPU.")
@click.option(
    "--version-compatible",
    "tensorrt_version_compatible",
    is_flag=True,
    help="Build version-compatible TensorRT engines (implies "
    "--tensorrt): they also run on the lean runtime of the same TensorRT version "
    "(imagen-cascade[tensorrt-lean-cu13] or [tensorrt-lean-cu12]), possibly slower.",
)
@click.option("--weights", type=click.Choice(WEIGHT_KINDS), default=DEFAULTS.weights, show_default=True)
@click.option(
    "--max-batch",
    type=click.IntRange(1, MAX_BATCH_LIMIT),
    default=DEFAULTS.max_batch,
    show_default=True,
    help="Largest number of images per call (Unets see twice this: cond + uncond).",
)
@click.option("--opset", type=click.IntRange(*OPSETS), default=DEFAULTS.opset, show_default=True)
@click.option(
    "--text-encoder",
    type=click.Path(),
    default=None,
    help="Local T5 folder (needed for MinImagen directories and imagen-pytorch checkpoints; for IF, when "
    "stage I's folder has no text_encoder/).",
)
@click.option(
    "--sampler",
    type=click.Choice(list(SAMPLER_NAMES)),
    default=DEFAULTS.sampler,
    show_default=True,
    help="The bundle's default sampler.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=DEFAULTS.steps,
    help="The bundle's default steps per Unet (default: every trained timestep; IF: 100 and 50, its pipelines').",
)
@click.option(
    "--sr-strength",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=DEFAULTS.sr_strength,
    show_default=True,
    help="The bundle's default share of steps a super-resolution Unet runs from its noised "
    "upsampled input (1: from pure noise).",
)
@click.option(
    "--external-data-threshold",
    type=click.IntRange(min=0),
    default=DEFAULTS.external_data_threshold,
    show_default=True,
    metavar="BYTES",
    help="A stage with more weight bytes than this keeps them in <stage>.onnx.data files (ONNX files "
    "stop at 2 GB); 0 writes every stage so.",
)
@click.option(
    "--record-source-path",
    is_flag=True,
    help="Also record the run's absolute path in the manifest (by default only its folder name and config hash).",
)
@click.option(
    "--unets",
    type=click.IntRange(min=1),
    default=DEFAULTS.unets,
    metavar="K",
    help="MinImagen directories: export only the first K Unets (when the later ones are not trained yet).",
)
@click.option("--force", is_flag=True, help="Replace an existing bundle; also write one that fails parity.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, out, quiet, debug, **fields):
    """Export a trained cascade to an ONNX bundle (and TensorRT engines)."""

    def report(message):
        if not quiet:
            click.echo(message, err=True)

    # A failed export of the user's checkpoint (ExportError: parity, an ONNX check, a mismatched
    # text encoder) is theirs to act on, like a bad path; so are options ExportOptions refuses.
    run_command(
        lambda: export_bundle(ckpt, out, ExportOptions(**fields), report=report),
        debug=debug,
        prefix=PREFIX,
        user_errors=(ExportError,),
        interrupted="interrupted; nothing was written",
    )


if __name__ == "__main__":
    main()
