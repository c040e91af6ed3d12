"""imagen-pytorch checkpoints -> bundle (docs/bundle.md, Model families): `Imagen` and `ElucidatedImagen`
cascades saved by imagen-pytorch 2.1.0's `ImagenTrainer.save`, run by the same runtime, imagen-serve and
Ray app as every other bundle.

The checkpoint is read without importing imagen-pytorch (export/imagen_pytorch.py). Its Unets are written
by a child process that does import it (export/imagen_pytorch_onnx.py): imagen-pytorch is installed where
the cascade was trained, and importing it changes the process it runs in. Each stage's sampling entry
says how imagen-pytorch's `sample()` drives it, with the per-step table of float32 scalars computed here
with torch (export/imagen_pytorch_tables.py). The T5 encoder comes from a local folder (`--text-encoder`,
the model named by the cascade's `text_encoder_name`): imagen-pytorch encodes up to 256 tokens and zeroes
the embeddings at padding, and each Unet keeps its first `max_text_len` tokens.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from imagen.runtime.contract import Defaults, Manifest, SamplingEntry, Source, text_encoder_signature, unet_name

from .deepfloyd_bundle import _write_tokenizer
from .deepfloyd_onnx import load_if_text_encoder
from .errors import ExportError
from .imagen_pytorch import ContinuousSchedule, ImagenPytorchCheckpoint, ImagenPytorchStage, read_imagen_pytorch
from .imagen_pytorch_tables import continuous_table, karras_table, log_snr, lowres_scalars
from .onnx_export import TextEncoderStage
from .options import ExportOptions
from .staging import Stage, build_stage_engines, check_parity, parity_failure, versions, write_stage, write_staged

MAX_LENGTH = 256  # imagen-pytorch's T5 encoding (t5.py MAX_LENGTH): tokens read before the Unets cut theirs
DEFAULT_GUIDANCE = 3.0  # imagen-pytorch's own examples sample with cond_scale=3 (its sample() default is 1)
SAMPLERS = {"original": "ddpm_continuous", "elucidated": "heun_edm"}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def is_imagen_pytorch_checkpoint(path: str | Path) -> bool:
    """A single checkpoint file (ImagenTrainer.save writes one), not a folder."""
    path = Path(path)
    return path.is_file() and path.suffix in CHECKPOINT_SUFFIXES


def export_imagen_pytorch_bundle(
    checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    allow_untested_version: bool = False,
    report: Callable[[str], None] | None = None,
    **fields,
) -> Manifest:
    """Exports the cascade of an ImagenTrainer checkpoint into the bundle folder `out`. `options.config`
    (a JSON file) stands in for a checkpoint without `imagen_params` (`read_imagen_pytorch`);
    `options.ema` takes the EMA weights (what ImagenTrainer.sample uses). `options.text_encoder` is
    required (the T5 folder); `options.steps` replaces every Unet's steps (timesteps, or
    num_sample_steps)."""
    options = ExportOptions(**fields) if options is None else replace(options, **fields)
    say = report or (lambda message: None)
    config = None if options.config is None else _read_config(Path(options.config))
    read_kwargs = dict(config=config, use_ema=options.ema, allow_untested_version=allow_untested_version)
    cascade = read_imagen_pytorch(checkpoint, **read_kwargs)
    _check_options(cascade, options)
    _check_cascade(cascade)
    sampling = [sampling_entry(cascade, stage, options.steps) for stage in cascade.stages]

    def write(staging: Path) -> Manifest:
        tokenizer, entries, written = _write_models(cascade, read_kwargs, sampling, staging, options, say)
        engines = build_stage_engines(written, entries, staging, options, say) if options.builds_engines else None
        return _manifest(cascade, tokenizer, entries, engines, options)

    manifest = write_staged(Path(out), options.force, write)
    say(f"bundle written to {out}")
    return manifest


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"--config {path} is not a readable JSON file: {error}") from None
    if not isinstance(config, dict):
        raise ExportError(f'--config {path} holds {type(config).__name__}; expected {{"type": ..., "imagen": {{...}}}}')
    return config


def _check_options(cascade: ImagenPytorchCheckpoint, options: ExportOptions) -> None:
    if options.unets is not None:
        raise ExportError(
            "--unets applies to MinImagen training directories; an imagen-pytorch cascade is exported whole"
        )
    if options.weights != "latest":
        raise ExportError(
            f"--weights {options.weights} applies to this project's runs; for an imagen-pytorch checkpoint, EMA "
            "weights are taken by default and --no-ema takes the trained ones"
        )
    if options.stage2 is not None:
        raise ExportError(
            "--stage2 names a DeepFloyd IF stage II folder; an imagen-pytorch checkpoint holds every Unet"
        )
    if options.sampler not in ("ddpm", SAMPLERS[cascade.kind]):
        raise ExportError(
            f"an imagen-pytorch {cascade.kind} cascade samples with {SAMPLERS[cascade.kind]} (its own sampler); "
            f"drop --sampler {options.sampler}"
        )
    if options.sr_strength != 1:
        raise ExportError("--sr-strength applies to discrete-time bundles; imagen-pytorch's stages start from noise")
    if cascade.kind == "elucidated" and options.steps is not None and options.steps < 2:
        raise ExportError(f"--steps {options.steps}: Karras sigmas need at least 2 steps")
    if options.text_encoder is None:
        raise ExportError(
            f"an imagen-pytorch checkpoint holds no text encoder; pass --text-encoder with a local folder of "
            f"{cascade.text_encoder_name} (saved with T5EncoderModel.save_pretrained, with its spiece.model)"
        )


def _check_cascade(cascade: ImagenPytorchCheckpoint) -> None:
    """What the runtime reproduces of imagen-pytorch's sampling; anything else is refused by name."""
    where = cascade.path
    if not cascade.condition_on_text:
        raise ExportError(f"{where}: condition_on_text is False; this project exports text-to-image cascades")
    for stage in cascade.stages:
        if not stage.auto_normalize_img:
            raise ExportError(
                f"{where}: auto_normalize_img is False (images in [-1, 1] outside the cascade); this project "
                "exports cascades that take images in [0, 1], imagen-pytorch's default"
            )
        if stage.resize_mode != "nearest":
            raise ExportError(
                f"{where}: resize_mode is {stage.resize_mode!r}; the runtime reproduces imagen-pytorch's "
                "default 'nearest' between stages"
            )


def sampling_entry(cascade: ImagenPytorchCheckpoint, stage: ImagenPytorchStage, steps: int | None) -> SamplingEntry:
    """How imagen-pytorch's sample() drives the stage, with its per-step table."""
    schedule = stage.schedule
    if isinstance(schedule, ContinuousSchedule):
        time, prediction = "continuous", schedule.pred_objective
        table = continuous_table(schedule.noise_schedule, steps or schedule.timesteps)
    else:
        time, prediction = "karras", "edm"
        fields = {name: getattr(schedule, name) for name in ("sigma_min", "sigma_max", "sigma_data", "rho")}
        fields.update({name: getattr(schedule, name) for name in ("S_churn", "S_tmin", "S_tmax", "S_noise")})
        table = karras_table(steps or schedule.num_sample_steps, **fields)
    if stage.lowres_cond:
        feed_log_snr = cascade.kind == "original"  # ElucidatedImagen's sample() feeds the level itself
        table.update(lowres_scalars(stage.lowres_noise_schedule, stage.lowres_sample_noise_level, feed_log_snr))
    return SamplingEntry(
        time=time,
        prediction=prediction,
        threshold="dynamic" if stage.dynamic_thresholding else "clip",
        threshold_percentile=stage.dynamic_thresholding_percentile,
        guidance="remove_parallel",
        self_cond=stage.self_cond,
        resize="nearest",
        table={name: tuple(value) if isinstance(value, list) else value for name, value in table.items()},
    )


def unet_job(cascade: ImagenPytorchCheckpoint, stage: ImagenPytorchStage, entry: SamplingEntry, max_batch: int) -> dict:
    """What the child process needs to write one Unet stage: its signature's arguments and the range of
    the times its sample inputs take (the log-SNRs it is fed, or EDM's c_noise)."""
    if entry.time == "continuous":
        import torch

        ends = log_snr(stage.schedule.noise_schedule, torch.tensor([1.0, 0.0]))
        time_range = sorted(float(v) for v in ends)
    else:
        times = entry.columns["time"]
        time_range = [min(times), max(times)]
    return dict(
        stage=stage.index,
        signature=dict(
            index=stage.index,
            image_size=stage.image_size,
            max_length=MAX_LENGTH,
            embed_dim=cascade.params["text_embed_dim"],
            lowres_cond=stage.lowres_cond,
            max_batch=max_batch,
            channels=stage.channels,
            self_cond=stage.self_cond,
            prediction=entry.prediction,
        ),
        input_kwargs={"time_range": time_range},
    )


def _write_models(cascade, read_kwargs: dict, sampling: list[SamplingEntry], staging: Path, options, say):
    """Writes the tokenizer, the T5 encoder (in this process) and the Unets (in the child)."""
    from imagen.reference.text_encoder import TextEncoder

    from .imagen_pytorch_onnx import write_imagen_pytorch_unets

    say(f"text_encoder: loading T5 from {options.text_encoder}")
    loaded = load_if_text_encoder(options.text_encoder, MAX_LENGTH)
    encoder = TextEncoder(loaded.model, loaded.tokenizer, zero_padding=True)  # imagen-pytorch zeroes padding
    width = cascade.params["text_embed_dim"]
    if encoder.embed_dim != width:
        raise ExportError(
            f"the T5 encoder of {options.text_encoder} has width {encoder.embed_dim}, the Unets read text of width "
            f"{width}: pass the T5 the cascade was trained with ({cascade.text_encoder_name})"
        )
    tokenizer = replace(_write_tokenizer(encoder.tokenizer, staging, False), preprocess="none")
    signature = text_encoder_signature(MAX_LENGTH, width, options.max_batch)
    text_stage = Stage(signature, TextEncoderStage(encoder), {"vocab_size": encoder.tokenizer.vocab_size})
    entries = {signature.name: write_stage(text_stage, staging, options, say)}
    written = [replace(text_stage, module=None)]
    del encoder, loaded, text_stage
    jobs = [unet_job(cascade, stage, entry, options.max_batch) for stage, entry in zip(cascade.stages, sampling)]
    unet_entries = write_imagen_pytorch_unets(cascade.path, read_kwargs, jobs, staging, options, say)
    for stage, entry, unet_entry in zip(cascade.stages, sampling, unet_entries, strict=True):
        name = unet_name(stage.index)
        entries[name] = replace(unet_entry, sampling=entry)
        written.append(Stage(unet_entry.signature, None, {}, stage.image_size, stage.lowres_cond))
    check_parity([f for f in map(parity_failure, entries.values()) if f], options)
    return tokenizer, entries, written


def _manifest(cascade: ImagenPytorchCheckpoint, tokenizer, entries, engines, options) -> Manifest:
    stages = cascade.stages
    guidance = DEFAULT_GUIDANCE if stages[0].cond_drop_prob > 0 else 1.0
    steps = {unet_name(stage.index): entries[unet_name(stage.index)].how_sampled.steps for stage in stages}
    return Manifest(
        channels=stages[0].channels,
        image_sizes=tuple(stage.image_size for stage in stages),
        max_length=MAX_LENGTH,
        embed_dim=cascade.params["text_embed_dim"],
        tokenizer=tokenizer,
        schedules={},
        defaults=Defaults(
            guidance,
            stages[0].dynamic_thresholding_percentile,
            stages[-1].lowres_sample_noise_level if len(stages) > 1 else 0.0,
            sampler=SAMPLERS[cascade.kind],
            steps=steps,
            sr_strength=1.0,
        ),
        stages=entries,
        tensorrt=engines,
        producer=versions(),
        source=Source(
            name=cascade.path.name,
            config_sha256=hashlib.sha256(json.dumps(cascade.params, sort_keys=True, default=str).encode()).hexdigest(),
            checkpoint=str(cascade.path.resolve()) if options.record_source_path else None,
            weights=cascade.weights,
        ),
    )
