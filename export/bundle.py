"""Run directory -> bundle (docs/bundle.md): the only thing the runtime reads.

The bundle is written into a temporary folder beside `out` and renamed into place when
complete (`staging.write_staged`), so a failed or killed export leaves the previous bundle as
it was and no half bundle under the final name. DeepFloyd IF folders go to `deepfloyd_bundle`.
"""

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from imagen.reference.checkpoint import Run, load_run
from imagen.reference.minimagen import load_minimagen_run
from imagen.reference.text_encoder import SentencePieceTokenizer, TextEncoder
from imagen.runtime.contract import (
    LOWRES,
    Defaults,
    Manifest,
    ScheduleEntry,
    Source,
    StageEntry,
    TokenizerEntry,
    run_config_sha256,
    text_encoder_signature,
    unet_name,
    unet_signature,
)

from .errors import ExportError
from .onnx_export import TextEncoderStage, UnetStage
from .options import ExportOptions
from .staging import (
    PARITY_BATCH_SIZES,
    TOLERANCE,
    Stage,
    build_stage_engines,
    check_parity,
    file_entry,
    parity_failure,
    versions,
    write_stage,
    write_staged,
)

__all__ = ["PARITY_BATCH_SIZES", "TOLERANCE", "export_bundle", "file_entry", "load_checkpoint", "run_source"]


def load_checkpoint(
    ckpt: str | Path, weights: str = "latest", text_encoder: str | Path | None = None, unets: int | None = None
) -> Run:
    """A run directory of this project, or a MinImagen training directory (needs `text_encoder`;
    `unets=K` takes only its first K Unets, for a cascade whose later Unets are not trained yet)."""
    ckpt = Path(ckpt)
    if (ckpt / "parameters").is_dir() and not (ckpt / "config.json").exists():
        return load_minimagen_run(ckpt, text_encoder, unets)
    if unets is not None:
        raise ExportError(
            f"--unets applies to MinImagen training directories; {ckpt} is a run of imagen-train, "
            "whose whole cascade is exported: drop --unets"
        )
    run = load_run(ckpt, weights)
    if text_encoder is not None:
        encoder = TextEncoder.from_folder(text_encoder, max_length=run.text_encoder.max_length)
        if encoder.embed_dim != run.text_encoder.embed_dim:
            raise ExportError(
                f"--text-encoder {text_encoder} has width {encoder.embed_dim}, the Unets were "
                f"trained on {run.text_encoder.embed_dim}; drop --text-encoder to use the run's own"
            )
        run.text_encoder = encoder
    return run


def export_bundle(
    ckpt: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    report: Callable[[str], None] | None = None,
    **fields,
) -> Manifest:
    """Exports every stage of the run or MinImagen directory `ckpt` (or DeepFloyd IF stage I folder,
    `deepfloyd_bundle`; or imagen-pytorch checkpoint, `imagen_pytorch_bundle`) into the bundle folder
    `out`, measures parity, optionally builds TensorRT engines; returns the manifest.

    `options` says how (`ExportOptions`, whose fields may also be given as keywords: `fp16=True`
    alone, or over `options`); `report` receives one line per step."""
    options = ExportOptions(**fields) if options is None else replace(options, **fields)
    from .deepfloyd_bundle import export_if_bundle, is_if_folder
    from .imagen_pytorch_bundle import export_imagen_pytorch_bundle, is_imagen_pytorch_checkpoint

    if is_imagen_pytorch_checkpoint(ckpt):
        return export_imagen_pytorch_bundle(ckpt, out, options, report=report)
    if options.config is not None or options.ema:
        raise ExportError(
            f"--config and --ema apply to imagen-pytorch checkpoints (a file ImagenTrainer.save wrote); {ckpt} is "
            "not one: drop them"
        )
    if is_if_folder(ckpt):
        return export_if_bundle(ckpt, out, options, report=report)
    if options.stage2 is not None:
        raise ExportError(
            f"--stage2 names a DeepFloyd IF stage II folder; {ckpt} is not an IF stage I folder (no "
            "model_index.json): drop --stage2, or pass the IF stage I folder as --ckpt"
        )
    say = report or (lambda message: None)
    out = Path(out)

    def write(staging: Path) -> Manifest:
        run = load_checkpoint(ckpt, options.weights, options.text_encoder, options.unets)
        timesteps = min(s.num_timesteps for s in run.imagen.noise_schedulers)
        if options.steps is not None and options.steps > timesteps:
            raise ValueError(f"steps must be at most the trained timesteps ({timesteps}), got {options.steps}")
        tokenizer = _write_tokenizer(run, staging)
        stages = _stages(run, options.max_batch)
        entries = _write_stages(stages, staging, options, say)
        engines = build_stage_engines(stages, entries, staging, options, say) if options.builds_engines else None
        return _manifest(run, tokenizer, entries, engines, options)

    manifest = write_staged(out, options.force, write)
    say(f"bundle written to {out}")
    return manifest


def _manifest(run: Run, tokenizer, entries: dict, engines, options: ExportOptions) -> Manifest:
    """The typed manifest of an exported run: its sizes, tokenizer, schedules, the sampling defaults
    (the run's guidance, thresholding and augmentation, and the options' sampler, steps and
    sr_strength), stages, engines and provenance."""
    config = run.imagen.config
    return Manifest(
        channels=config.channels,
        image_sizes=tuple(run.imagen.image_sizes),
        max_length=run.text_encoder.max_length,
        embed_dim=run.text_encoder.embed_dim,
        tokenizer=tokenizer,
        schedules=_schedules(run),
        defaults=Defaults(
            config.guidance_scale,
            config.dynamic_thresholding_percentile,
            config.lowres_sample_noise_level,
            sampler=options.sampler,
            steps=options.steps,
            sr_strength=float(options.sr_strength),
        ),
        stages=entries,
        tensorrt=engines,
        producer=versions(),
        source=run_source(run.path, run.weights, options.record_source_path),
    )


def run_source(run_dir: Path, weights: str, record_path: bool = False) -> Source:
    """The manifest's `source`: the run's folder name, config hash and weights; its absolute path
    (which names the exporting machine's folders) only when asked."""
    run_dir = Path(run_dir).resolve()
    return Source(
        name=run_dir.name,
        config_sha256=run_config_sha256(run_dir),
        checkpoint=str(run_dir) if record_path else None,
        weights=weights,
    )


def _stages(run: Run, max_batch: int) -> list[Stage]:
    encoder, cascade = run.text_encoder, run.imagen
    if encoder.max_length > cascade.unets[0].max_text_len:
        raise ExportError(
            f"the text encoder's max_length {encoder.max_length} exceeds the Unets' max_text_len "
            f"{cascade.unets[0].max_text_len}"
        )
    length, width = encoder.max_length, encoder.embed_dim
    stages = [
        Stage(
            text_encoder_signature(length, width, max_batch),
            TextEncoderStage(encoder),
            {"vocab_size": encoder.tokenizer.vocab_size},
        )
    ]
    for index, (unet, schedule) in enumerate(zip(cascade.unets, cascade.noise_schedulers)):
        size, lowres = cascade.image_sizes[index], bool(unet.lowres_cond)
        signature = unet_signature(index, size, length, width, lowres, max_batch, cascade.config.channels)
        stages.append(Stage(signature, UnetStage(unet), {"timesteps": schedule.num_timesteps}, size, lowres))
    return stages


def _write_tokenizer(run: Run, staging: Path) -> TokenizerEntry:
    tokenizer = run.text_encoder.tokenizer
    files = {}
    if isinstance(tokenizer, SentencePieceTokenizer):
        (staging / "tokenizer").mkdir()
        shutil.copyfile(tokenizer.model_file, staging / "tokenizer" / "spiece.model")
        files["spiece.model"] = file_entry(staging, staging / "tokenizer" / "spiece.model")
    return TokenizerEntry(
        tokenizer.kind,
        tokenizer.pad_id,
        tokenizer.eos_id,
        tokenizer.offset,
        tokenizer.max_length,
        files,
        extra_ids=tokenizer.extra_ids,
    )


def _schedules(run: Run) -> dict[str, ScheduleEntry]:
    schedules = {
        **{unet_name(i): s for i, s in enumerate(run.imagen.noise_schedulers)},
        LOWRES: run.imagen.lowres_noise_schedule,
    }
    return {
        name: ScheduleEntry(tuple(s.betas_array.tolist()), s.schedule, s.num_timesteps) for name, s in schedules.items()
    }


def _write_stages(stages: list[Stage], staging: Path, options: ExportOptions, say) -> dict[str, StageEntry]:
    entries = {stage.name: write_stage(stage, staging, options, say) for stage in stages}
    check_parity([f for f in map(parity_failure, entries.values()) if f], options)
    return entries
