"""Run directory -> bundle (docs/bundle.md): the only thing the runtime reads.

The bundle is written into a temporary folder beside `out` and renamed into place when
complete, so a failed or killed export leaves the previous bundle as it was and no half
bundle under the final name.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from imagen.reference.checkpoint import Run, load_minimagen_run, load_run
from imagen.reference.samplers import SAMPLERS
from imagen.reference.text_encoder import SentencePieceTokenizer, TextEncoder

import imagen

from .onnx_export import (
    ExportError,
    TextEncoderStage,
    UnetStage,
    check_model,
    convert_fp16,
    count_flops,
    export_stage,
    measure_parity,
)
from .signatures import StageSignature, TensorSpec, text_encoder_signature, unet_signature
from .tensorrt import TensorRTUnavailable, build_engine, engine_dir_name, tensorrt_target

FORMAT, FORMAT_VERSION = "imagen-bundle", 1
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2}
PARITY_BATCH_SIZES = (1, 3)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(bundle: Path, path: Path) -> dict:
    return {"file": path.relative_to(bundle).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    return {"imagen": imagen.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tensorrt": trt_version}


def load_checkpoint(ckpt: str | Path, weights: str = "latest", text_encoder: str | Path | None = None) -> Run:
    """A run directory of this project, or a MinImagen training directory (needs `text_encoder`)."""
    ckpt = Path(ckpt)
    if (ckpt / "parameters").is_dir() and not (ckpt / "config.json").exists():
        return load_minimagen_run(ckpt, text_encoder)
    run = load_run(ckpt, weights)
    if text_encoder is not None:
        encoder = TextEncoder.from_folder(text_encoder, max_length=run.text_encoder.max_length)
        if encoder.embed_dim != run.text_encoder.embed_dim:
            raise ExportError(f"--text-encoder {text_encoder} has width {encoder.embed_dim}, the Unets were "
                              f"trained on {run.text_encoder.embed_dim}; drop --text-encoder to use the run's own")
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


def export_bundle(ckpt: str | Path, out: str | Path, *, fp16: bool = False, tensorrt: bool = False,
                  weights: str = "latest", max_batch: int = 8, opset: int = 18,
                  text_encoder: str | Path | None = None, force: bool = False, sampler: str = "ddpm",
                  steps: int | None = None, sr_strength: float = 1.0,
                  report: Callable[[str], None] | None = None) -> dict:
    """Exports every stage, measures parity, optionally builds TensorRT engines; returns the manifest.

    `sampler`, `steps` and `sr_strength` become the bundle's defaults (steps None: every trained
    timestep; sr_strength 1: super-resolution from pure noise)."""
    say = report or (lambda message: None)
    out = Path(out)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
    if isinstance(sr_strength, bool) or not isinstance(sr_strength, (int, float)) or not 0 < sr_strength <= 1:
        raise ValueError(f"sr_strength must be a number in (0, 1], got {sr_strength!r}")
    if not isinstance(max_batch, int) or not 1 <= max_batch <= 1024:
        raise ValueError(f"max_batch must be an integer in [1, 1024], got {max_batch!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it (the old bundle stays until the "
                          "new one is complete)")
    run = load_checkpoint(ckpt, weights, text_encoder)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        timesteps = min(s.num_timesteps for s in run.imagen.noise_schedulers)
        if steps is not None and steps > timesteps:
            raise ValueError(f"steps must be at most the trained timesteps ({timesteps}), got {steps}")
        manifest = _write_stages(run, staging, fp16, max_batch, opset, force, say)
        manifest["defaults"].update(sampler=sampler, steps=steps, sr_strength=float(sr_strength))
        if tensorrt:
            manifest["tensorrt"] = _build_engines(manifest, staging, fp16, say)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"bundle written to {out}")
    return manifest


def _stages(run: Run, max_batch: int) -> list[tuple[StageSignature, object, dict]]:
    encoder = run.text_encoder
    length, width = encoder.max_length, encoder.embed_dim
    stages = [(text_encoder_signature(length, width, max_batch), TextEncoderStage(encoder),
               {"vocab_size": encoder.tokenizer.vocab_size})]
    for index, (unet, schedule) in enumerate(zip(run.imagen.unets, run.imagen.noise_schedulers)):
        signature = unet_signature(index, run.imagen.image_sizes[index], length, width, unet.lowres_cond, max_batch)
        stages.append((signature, UnetStage(unet), {"timesteps": schedule.num_timesteps}))
    return stages


def _write_stages(run: Run, staging: Path, fp16: bool, max_batch: int, opset: int, force: bool, say) -> dict:
    imagen_model, encoder = run.imagen, run.text_encoder
    if encoder.max_length > imagen_model.unets[0].max_text_len:
        raise ExportError(f"the text encoder's max_length {encoder.max_length} exceeds the Unets' max_text_len "
                          f"{imagen_model.unets[0].max_text_len}")
    tokenizer = encoder.tokenizer.to_dict()
    if isinstance(encoder.tokenizer, SentencePieceTokenizer):
        (staging / "tokenizer").mkdir()
        shutil.copyfile(encoder.tokenizer.model_file, staging / "tokenizer" / "spiece.model")
        tokenizer["files"] = {"spiece.model": file_entry(staging, staging / "tokenizer" / "spiece.model")}
    config = imagen_model.config
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "producer": _versions(),
        "source": {"checkpoint": str(run.path), "weights": run.weights},
        "channels": config.channels, "image_sizes": list(imagen_model.image_sizes),
        "text": {"max_length": encoder.max_length, "embed_dim": encoder.embed_dim},
        "tokenizer": tokenizer,
        "schedules": {**{f"unet_{i}": s.to_manifest() for i, s in enumerate(imagen_model.noise_schedulers)},
                      "lowres": imagen_model.lowres_noise_schedule.to_manifest()},
        "defaults": {"guidance_scale": config.guidance_scale,
                     "dynamic_thresholding_percentile": config.dynamic_thresholding_percentile,
                     "lowres_sample_noise_level": config.lowres_sample_noise_level,
                     "sampler": "ddpm", "steps": None},
        "stages": {},
        "tensorrt": None,
    }
    failures = []
    for signature, module, input_kwargs in _stages(run, max_batch):
        name = signature.name
        precision = "fp16" if fp16 and name != "text_encoder" else "fp32"
        path = staging / f"{name}.onnx"
        say(f"{name}: exporting to ONNX")
        if precision == "fp16":
            fp32_dir = staging / ".fp32"
            fp32_dir.mkdir(exist_ok=True)
            export_stage(module, signature, fp32_dir / path.name, opset, **input_kwargs)
            say(f"{name}: converting to FP16")
            convert_fp16(fp32_dir / path.name, path)
            shutil.rmtree(fp32_dir)
            check_model(path, signature)
        else:
            export_stage(module, signature, path, opset, **input_kwargs)
        errors = measure_parity(module, signature, path, PARITY_BATCH_SIZES, **input_kwargs)
        tolerance = TOLERANCE[precision]
        passed = all(e <= tolerance for e in errors)
        say(f"{name}: parity {precision} rel. error {max(errors):.2e} (tolerance {tolerance:.0e}) "
            f"{'ok' if passed else 'FAILED'}")
        if not passed:
            failures.append(f"{name} ({precision}): relative error {max(errors):.3e} > {tolerance:.0e}")
        entry = {**file_entry(staging, path), "precision": precision, **signature.to_manifest(),
                 "parity": {"batch_sizes": list(PARITY_BATCH_SIZES), "rel_error": errors, "tolerance": tolerance,
                            "passed": passed, "forced": bool(force and not passed)},
                 "flops": count_flops(module, signature, **input_kwargs)}
        data = Path(f"{path}.data")
        if data.exists():
            entry["external_data"] = [file_entry(staging, data)]
        if name.startswith("unet_"):
            index = int(name.split("_")[1])
            entry.update(image_size=imagen_model.image_sizes[index],
                         lowres_cond=bool(imagen_model.unets[index].lowres_cond))
        manifest["stages"][name] = entry
    if failures and not force:
        raise ExportError("parity check failed: " + "; ".join(failures) + ". The export was not written; "
                          "pass --force to write it anyway (marked in the manifest)")
    return manifest


def _build_engines(manifest: dict, staging: Path, fp16: bool, say) -> dict | None:
    try:
        _, capability, version = tensorrt_target()
    except TensorRTUnavailable as reason:
        say(f"tensorrt: skipped: {reason}; the ONNX bundle is complete")
        return None
    folder = staging / "tensorrt" / engine_dir_name(capability, version)
    folder.mkdir(parents=True)
    engines = {}
    for name, stage in manifest["stages"].items():
        say(f"{name}: building TensorRT engine ({'fp16' if fp16 else 'fp32'})")
        signature = _signature_from_manifest(name, stage)
        plan = folder / f"{name}.plan"
        build_engine(staging / stage["file"], signature, plan, fp16 and stage["precision"] == "fp16",
                     folder / "timing.cache")
        engines[name] = file_entry(staging, plan)
    return {"dir": folder.relative_to(staging).as_posix(), "compute_capability": capability, "version": version,
            "engines": engines}


def _signature_from_manifest(name: str, stage: dict) -> StageSignature:
    def specs(entries):
        return tuple(TensorSpec(e["name"], e["dtype"], tuple(e["shape"])) for e in entries)

    batch = stage["batch"]
    return StageSignature(name, specs(stage["inputs"]), specs(stage["outputs"]), batch["min"], batch["opt"],
                          batch["max"])
