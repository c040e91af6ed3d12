"""DeepFloyd IF folders -> bundle (docs/bundle.md, Model families): the same bundle the runtime,
imagen-serve and the Ray app run for this project's own cascades, with the sampling IF's pipelines
do written per stage (`SamplingEntry`).

The cascade is exported one model at a time (T5, stage I's Unet, stage II's Unet): each is loaded,
written, checked against PyTorch and freed before the next, so the peak memory is one model in
FP32 plus its ONNX copy, never the whole cascade. As `export_bundle`, the bundle is staged beside
`out` and renamed into place when complete.
"""

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from imagen.runtime.contract import (
    LOWRES,
    Defaults,
    Manifest,
    SamplingEntry,
    ScheduleEntry,
    Source,
    TokenizerEntry,
    text_encoder_signature,
    unet_name,
)

from .deepfloyd import MAX_LENGTH, IFSchedule, IFStage, check_if_cascade, read_if_folder
from .deepfloyd_onnx import load_if_text_encoder, load_if_unet
from .errors import ExportError
from .onnx_export import TextEncoderStage
from .options import ExportOptions
from .staging import (
    Stage,
    build_stage_engines,
    check_parity,
    file_entry,
    parity_failure,
    versions,
    write_stage,
    write_staged,
)


def is_if_folder(path: str | Path) -> bool:
    """A folder written by a diffusers pipeline's save_pretrained (IF's stages are)."""
    return (Path(path) / "model_index.json").is_file()


def export_if_bundle(
    stage_1: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    report: Callable[[str], None] | None = None,
    **fields,
) -> Manifest:
    """Exports the IF stage I folder `stage_1` (with `options.stage2`, the stage II folder, when
    given; without it a 64x64 cascade of stage I alone) into the bundle folder `out`. The T5 encoder
    and tokenizer come from `options.text_encoder`, else from stage I's folder. `options.steps`
    replaces IF's steps per stage (100 and 50) for every Unet; `options.sampler` and
    `options.sr_strength` are the bundle's defaults as for any bundle."""
    options = ExportOptions(**fields) if options is None else replace(options, **fields)
    say = report or (lambda message: None)
    _check_options(options)
    stages = [read_if_folder(stage_1)]
    if options.stage2 is not None:
        stages.append(read_if_folder(options.stage2))
        check_if_cascade(*stages)
    _check_steps(stages, options.steps)
    encoder_path = _text_encoder_path(stages[0], options.text_encoder)

    def write(staging: Path) -> Manifest:
        tokenizer, entries, written = _write_models(stages, encoder_path, staging, options, say)
        engines = build_stage_engines(written, entries, staging, options, say) if options.builds_engines else None
        return _manifest(stages, encoder_path, tokenizer, entries, engines, options)

    manifest = write_staged(Path(out), options.force, write)
    say(f"bundle written to {out}")
    return manifest


def _check_options(options: ExportOptions) -> None:
    if options.unets is not None:
        raise ExportError("--unets applies to MinImagen training directories; for IF, leave out --stage2 instead")
    if options.weights != "latest":
        raise ExportError(f"an IF folder holds one set of weights; drop --weights {options.weights}")


def _check_steps(stages: list[IFStage], steps: int | None) -> None:
    """`--steps` replaces every stage's steps, so it must fit the stage with the fewest trained timesteps."""
    for stage in stages:
        trained = stage.schedule.num_train_timesteps
        if steps is not None and steps > trained:
            raise ExportError(
                f"--steps {steps} is more than the {trained} timesteps {stage.folder} was trained with; "
                f"pass --steps {trained} or fewer"
            )


def _text_encoder_path(stage_1: IFStage, text_encoder) -> Path:
    if text_encoder is not None:
        return Path(text_encoder)
    if not stage_1.has_text_encoder:
        raise ExportError(
            f"{stage_1.folder} has no text_encoder/ and tokenizer/; pass --text-encoder with the T5 folder "
            "(an IF stage I folder that has them, or a T5-XXL folder saved with save_pretrained)"
        )
    return stage_1.folder


def _write_models(stages: list[IFStage], encoder_path: Path, staging: Path, options: ExportOptions, say):
    """Writes the tokenizer and every stage, one model in memory at a time; returns the tokenizer
    entry, the stage entries and the stages without their modules (for the engine builds)."""
    entries, written, failures = {}, [], []

    def write(stage: Stage) -> None:
        entry = write_stage(stage, staging, options, say)
        entries[stage.name] = entry
        written.append(replace(stage, module=None))
        failures.extend(f for f in [parity_failure(entry)] if f)

    say("text_encoder: loading T5")
    encoder = load_if_text_encoder(encoder_path, MAX_LENGTH)
    if encoder.embed_dim != stages[0].embed_dim:
        raise ExportError(
            f"the T5 encoder of {encoder_path} has width {encoder.embed_dim}, the IF Unets read text of width "
            f"{stages[0].embed_dim}: pass the T5 encoder the Unets were trained with"
        )
    tokenizer = _write_tokenizer(encoder.tokenizer, staging, stages[0].clean_caption)
    signature = text_encoder_signature(MAX_LENGTH, encoder.embed_dim, options.max_batch)
    write(Stage(signature, TextEncoderStage(encoder), {"vocab_size": encoder.tokenizer.vocab_size}))
    del encoder
    for stage in stages:
        say(f"{unet_name(stage.index)}: loading the Unet of {stage.folder}")
        module = load_if_unet(stage)
        kwargs = {"timesteps": stage.schedule.num_train_timesteps}
        write(Stage(stage.signature(options.max_batch), module, kwargs, stage.image_size, stage.lowres_cond))
        del module
        name = unet_name(stage.index)
        entries[name] = replace(entries[name], sampling=sampling_entry(stage))
    check_parity(failures, options)
    return tokenizer, entries, written


def _write_tokenizer(tokenizer, staging: Path, clean_caption: bool) -> TokenizerEntry:
    (staging / "tokenizer").mkdir()
    target = staging / "tokenizer" / "spiece.model"
    shutil.copyfile(tokenizer.model_file, target)
    return TokenizerEntry(
        tokenizer.kind,
        tokenizer.pad_id,
        tokenizer.eos_id,
        tokenizer.offset,
        MAX_LENGTH,
        {"spiece.model": file_entry(staging, target)},
        extra_ids=tokenizer.extra_ids,
        preprocess="clean_caption" if clean_caption else "lower_strip",
    )


def sampling_entry(stage: IFStage) -> SamplingEntry:
    """How diffusers' pipeline samples the stage: its scheduler's spacing, variance and thresholding,
    unconditional rows from a negative prompt (T5 of "" by default) and, for stage II, the
    align-corners upscale drawn after the stage's initial noise."""
    schedule = stage.schedule
    if schedule.thresholding:
        threshold = "dynamic"
    elif schedule.clip_sample:
        if schedule.clip_sample_range != 1.0:
            raise ExportError(
                f"{stage.folder}/scheduler: clip_sample_range is {schedule.clip_sample_range}; this project clips "
                "to [-1, 1] only (set clip_sample_range 1.0, or thresholding true)"
            )
        threshold = "clip"
    else:
        threshold = "none"
    if schedule.thresholding and schedule.sample_max_value < 1:
        raise ExportError(
            f"{stage.folder}/scheduler: sample_max_value is {schedule.sample_max_value}; dynamic thresholding "
            "clamps its scale to [1, sample_max_value], so it must be at least 1"
        )
    return SamplingEntry(
        spacing=schedule.timestep_spacing,
        steps_offset=schedule.steps_offset,
        variance="learned_range" if stage.learned_variance else "fixed",
        threshold=threshold,
        threshold_percentile=schedule.dynamic_thresholding_ratio if schedule.thresholding else None,
        threshold_max=schedule.sample_max_value if schedule.thresholding else None,
        unconditional="negative_prompt",
        resize="bilinear_align_corners" if stage.lowres_cond else "bilinear",
        draw_order="image_first" if stage.lowres_cond else "lowres_first",
    )


def schedule_entry(schedule: IFSchedule) -> ScheduleEntry:
    """The betas and the float32 cumulative product exactly as DDPMScheduler holds them."""
    import torch
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        beta_schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
    )
    kind = "cosine" if schedule.beta_schedule == "squaredcos_cap_v2" else "linear"
    return ScheduleEntry(
        tuple(scheduler.betas.to(torch.float32).tolist()),
        kind,
        schedule.num_train_timesteps,
        tuple(scheduler.alphas_cumprod.to(torch.float32).tolist()),
    )


def _manifest(stages: list[IFStage], encoder_path: Path, tokenizer, entries, engines, options) -> Manifest:
    schedules = {unet_name(stage.index): schedule_entry(stage.schedule) for stage in stages}
    level = None
    if len(stages) > 1:
        noising = stages[1].noising_schedule
        schedules[LOWRES] = schedule_entry(noising)
        level = stages[1].noise_level / noising.num_train_timesteps
        if int(level * noising.num_train_timesteps) != stages[1].noise_level:  # the runtime's int(level * T)
            raise ExportError(f"noise level {stages[1].noise_level} of {noising.num_train_timesteps} is not exact")
    if options.steps is None:
        steps = {unet_name(stage.index): stage.steps for stage in stages}
    else:
        steps = options.steps
    first = stages[0].schedule
    return Manifest(
        channels=stages[0].channels,
        image_sizes=tuple(stage.image_size for stage in stages),
        max_length=MAX_LENGTH,
        embed_dim=stages[0].embed_dim,
        tokenizer=tokenizer,
        schedules=schedules,
        defaults=Defaults(
            {unet_name(stage.index): stage.guidance_scale for stage in stages},
            first.dynamic_thresholding_ratio,
            0.0 if level is None else level,
            sampler=options.sampler,
            steps=steps,
            sr_strength=float(options.sr_strength),
        ),
        stages=entries,
        tensorrt=engines,
        producer=versions(),
        source=_source(stages, encoder_path, options.record_source_path),
    )


def if_config_sha256(folders) -> str:
    """sha256 of the folders' model_index.json and component configs, in a fixed order: equal hashes,
    the same IF release and settings (not necessarily the same weights)."""
    digest = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        files = [
            folder / "model_index.json",
            *sorted(folder.glob("*/config.json")),
            *sorted(folder.glob("*/*_config.json")),
        ]
        for file in files:
            if file.is_file():
                digest.update(file.relative_to(folder).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def _source(stages: list[IFStage], encoder_path: Path, record_path: bool) -> Source:
    folders = [stage.folder.resolve() for stage in stages]
    if encoder_path.resolve() not in folders:
        folders.append(encoder_path.resolve())
    return Source(
        name=" + ".join(folder.name for folder in folders),
        config_sha256=if_config_sha256(folders),
        checkpoint=" + ".join(str(folder) for folder in folders) if record_path else None,
        weights=None,
    )
