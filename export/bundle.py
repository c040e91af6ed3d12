"""Run directory -> bundle (docs/bundle.md): the only thing the runtime reads.

The bundle is written into a temporary folder beside `out` and renamed into place when
complete, so a failed or killed export leaves the previous bundle as it was and no half
bundle under the final name.
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

import imagen
from imagen.reference.checkpoint import Run, load_run
from imagen.reference.minimagen import load_minimagen_run
from imagen.reference.text_encoder import SentencePieceTokenizer, TextEncoder
from imagen.runtime.contract import (
    LOWRES,
    MANIFEST,
    Defaults,
    FileEntry,
    Manifest,
    Parity,
    ScheduleEntry,
    Source,
    StageEntry,
    StageSignature,
    TensorRTEntry,
    TokenizerEntry,
    run_config_sha256,
    sha256_file,
    text_encoder_signature,
    unet_name,
    unet_signature,
)

from .errors import ExportError
from .fp16 import convert_fp16
from .onnx_export import TextEncoderStage, UnetStage, check_model, export_stage
from .options import ExportOptions
from .parity import count_flops, measure_parity
from .tensorrt import build_engines

# ONNX Runtime and PyTorch sum in different orders, and FP32 differences grow with depth: about
# 5e-7 for the demo's Unets, 1e-6 for T5-base, 3e-6 for MinImagen's Base preset and 1.2e-5 for its
# Super preset (docs/benchmarks.md). A wrong graph is off by O(1).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
PARITY_BATCH_SIZES = (1, 3)


@dataclass
class Stage:
    """One stage to export: its signature, the module that computes it, the ranges of its sample
    inputs (vocabulary size, timesteps) and, for a Unet, its image size and low-res conditioning."""

    signature: StageSignature
    module: nn.Module
    input_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None
    lowres_cond: bool | None = None

    @property
    def name(self) -> str:
        return self.signature.name


def file_entry(bundle: Path, path: Path) -> FileEntry:
    return FileEntry(path.relative_to(bundle).as_posix(), path.stat().st_size, sha256_file(path))


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    return {
        "imagen": imagen.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": trt_version,
    }


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


def _recover(out: Path) -> None:
    """Cleans what an earlier killed export left: a staging folder, or a bundle moved aside."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, aside)
        os.replace(staging, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, out)


def export_bundle(
    ckpt: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    report: Callable[[str], None] | None = None,
    **fields,
) -> Manifest:
    """Exports every stage of the run or MinImagen directory `ckpt` (or DeepFloyd IF stage I folder,
    `deepfloyd_bundle`) into the bundle folder `out`, measures parity, optionally builds TensorRT
    engines; returns the manifest.

    `options` says how (`ExportOptions`, whose fields may also be given as keywords: `fp16=True`
    alone, or over `options`); `report` receives one line per step."""
    options = ExportOptions(**fields) if options is None else replace(options, **fields)
    from .deepfloyd_bundle import export_if_bundle, is_if_folder

    if is_if_folder(ckpt):
        return export_if_bundle(ckpt, out, options, report=report)
    if options.stage2 is not None:
        raise ExportError(
            f"--stage2 names a DeepFloyd IF stage II folder; {ckpt} is not an IF stage I folder (no "
            "model_index.json): drop --stage2, or pass the IF stage I folder as --ckpt"
        )
    say = report or (lambda message: None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    if out.exists() and not options.force:
        raise ExportError(
            f"{out} already exists; pass --force to replace it (the old bundle stays until the new one is complete)"
        )
    run = load_checkpoint(ckpt, options.weights, options.text_encoder, options.unets)
    timesteps = min(s.num_timesteps for s in run.imagen.noise_schedulers)
    if options.steps is not None and options.steps > timesteps:
        raise ValueError(f"steps must be at most the trained timesteps ({timesteps}), got {options.steps}")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        tokenizer = _write_tokenizer(run, staging)
        stages = _stages(run, options.max_batch)
        entries = _write_stages(stages, staging, options, say)
        engines = _build_engines(stages, entries, staging, options, say) if options.builds_engines else None
        manifest = _manifest(run, tokenizer, entries, engines, options)
        (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2))
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
        producer=_versions(),
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
    entries, failures = {}, []
    for stage in stages:
        entries[stage.name] = entry = _write_stage(stage, staging, options, say)
        if not entry.parity.passed:
            failures.append(
                f"{stage.name} ({entry.precision}): relative error {max(entry.parity.rel_error):.3e} > "
                f"{entry.parity.tolerance:.0e}"
            )
    if failures and not options.force:
        raise ExportError(
            "parity check failed: " + "; ".join(failures) + ". The export was not written; "
            "pass --force to write it anyway (marked in the manifest)"
        )
    return entries


def _write_stage(stage: Stage, staging: Path, options: ExportOptions, say) -> StageEntry:
    """Exports one stage (FP16 Unets go through an FP32 file), checks it and measures its parity.
    Its external data entries are the files the written model references, whatever their names."""
    name, signature, kwargs = stage.name, stage.signature, stage.input_kwargs
    opset, threshold = options.opset, options.external_data_threshold
    precision = "fp16" if options.fp16 and stage.image_size is not None else "fp32"
    path = staging / f"{name}.onnx"
    say(f"{name}: exporting to ONNX")
    if precision == "fp16":
        fp32_dir = staging / ".fp32"
        fp32_dir.mkdir(exist_ok=True)
        export_stage(stage.module, signature, fp32_dir / path.name, opset, external_data_threshold=threshold, **kwargs)
        say(f"{name}: converting to FP16")
        files = convert_fp16(fp32_dir / path.name, path, threshold)
        shutil.rmtree(fp32_dir)
        check_model(path, signature)
    else:
        files = export_stage(stage.module, signature, path, opset, external_data_threshold=threshold, **kwargs)
    errors = measure_parity(stage.module, signature, path, PARITY_BATCH_SIZES, **kwargs)
    tolerance = TOLERANCE[precision]
    passed = all(e <= tolerance for e in errors)
    say(
        f"{name}: parity {precision} rel. error {max(errors):.2e} (tolerance {tolerance:.0e}) "
        f"{'ok' if passed else 'FAILED'}"
    )
    return StageEntry(
        name=name,
        file=file_entry(staging, path),
        precision=precision,
        signature=signature,
        parity=Parity(list(PARITY_BATCH_SIZES), errors, tolerance, passed, bool(options.force and not passed)),
        flops=count_flops(stage.module, signature, **kwargs),
        external_data=tuple(file_entry(staging, file) for file in files[1:]),
        image_size=stage.image_size,
        lowres_cond=stage.lowres_cond,
    )


def _build_engines(
    stages: list[Stage], entries: dict[str, StageEntry], staging: Path, options: ExportOptions, say
) -> TensorRTEntry | None:
    """Engines take their precision from the ONNX files (`--fp16` chose those); each is checked
    against ONNX Runtime at the FP16 tolerance before it is written."""
    version_compatible = options.tensorrt_version_compatible
    return build_engines(
        stages, entries, staging, say, tolerance=TOLERANCE["fp16"], version_compatible=version_compatible
    )
