"""What every bundle export shares, whatever the model family: one stage written to ONNX (FP16
through an FP32 file), checked and measured against its PyTorch module (`write_stage`), TensorRT
engines for the written stages, and the staging folder that makes a bundle appear whole or not at
all (`write_staged`: written beside `out`, renamed into place when complete, so a failed or killed
export leaves the previous bundle as it was)."""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

import imagen
from imagen.runtime.contract import (
    MANIFEST,
    FileEntry,
    Manifest,
    Parity,
    StageEntry,
    StageSignature,
    TensorRTEntry,
    sha256_file,
)

from .errors import ExportError
from .fp16 import convert_fp16
from .onnx_export import check_model, export_stage
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


def versions() -> dict:
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


def recover(out: Path) -> None:
    """Cleans what an earlier killed export left: a staging folder, or a bundle moved aside."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, aside)
        os.replace(staging, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, out)


def write_staged(out: Path, force: bool, write: Callable[[Path], Manifest]) -> Manifest:
    """Cleans what a killed export left, refuses an existing `out` unless `force`, then runs
    `write(staging)` (it fills the folder and returns the manifest), writes manifest.json and renames
    the folder into place. On any failure the staging folder is removed and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    if out.exists() and not force:
        raise ExportError(
            f"{out} already exists; pass --force to replace it (the old bundle stays until the new one is complete)"
        )
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        manifest = write(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2))
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def parity_failure(entry: StageEntry) -> str | None:
    """One line for a stage that failed parity, None when it passed."""
    if entry.parity.passed:
        return None
    error, tolerance = max(entry.parity.rel_error), entry.parity.tolerance
    return f"{entry.name} ({entry.precision}): relative error {error:.3e} > {tolerance:.0e}"


def check_parity(failures: list[str], options: ExportOptions) -> None:
    if failures and not options.force:
        raise ExportError(
            "parity check failed: " + "; ".join(failures) + ". The export was not written; "
            "pass --force to write it anyway (marked in the manifest)"
        )


def write_stage(stage: Stage, staging: Path, options: ExportOptions, say) -> StageEntry:
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


def build_stage_engines(
    stages: list[Stage], entries: dict[str, StageEntry], staging: Path, options: ExportOptions, say
) -> TensorRTEntry | None:
    """Engines take their precision from the ONNX files (`--fp16` chose those); each is checked
    against ONNX Runtime at the FP16 tolerance before it is written."""
    version_compatible = options.tensorrt_version_compatible
    return build_engines(
        stages, entries, staging, say, tolerance=TOLERANCE["fp16"], version_compatible=version_compatible
    )
