"""TensorRT engines from the bundle's ONNX files, with the TensorRT Python API (10.x and 11.x).

One engine per stage: ONNX parser, one optimization profile (`engine_profile`: batch 1 to the
stage's largest, tuned for the largest, the batch a busy server runs), and a timing cache kept
beside the engines. Networks are strongly typed:
an FP16 Unet's ONNX already holds FP16 weights and math with FP32 inputs and outputs
(`convert_fp16`), and the engine keeps exactly those types, so no precision flag is set
(TensorRT 11 removed them; on 10.x they conflict with strong typing). The T5 encoder's ONNX is
FP32 and so is its engine (TensorRT's default TF32 applies to its matrix products on Ampere and
later). Every engine is run on the stage's sample inputs and compared with ONNX Runtime (CPU) on
the same inputs, on the host, before it is written. Engines are built on and for one GPU kind and
one TensorRT version: they go into `tensorrt/sm<cc>-<version>/`. Version-compatible ones also run on
the lean runtime of that same version; they leave the lean runtime out of the plan
(EXCLUDE_LEAN_RUNTIME), so they do not run on later releases (see `check_engines_match`).

Imports from the runtime: its public `imagen.runtime.backends`, the contract and the errors only.
"""

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from imagen.runtime.backends import TENSORRT_NAMES as RUNTIME_NAMES
from imagen.runtime.backends import engine_profile
from imagen.runtime.contract import FileEntry, StageSignature, TensorRTEntry, sha256_file
from imagen.runtime.errors import BackendError

from .errors import ExportError
from .parity import relative_error

# Every TensorRT name the engine build uses ("Class.member" for members); with the runtime's, the
# names this project needs. Tests check them against the TensorRT 10.x and 11.x bindings and check
# that the code uses no other.
BUILDER_NAMES = (
    "Logger",
    "Logger.WARNING",
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "NetworkDefinitionCreationFlag",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "OnnxParser",
    "OnnxParser.parse_from_file",
    "OnnxParser.num_errors",
    "OnnxParser.get_error",
    "MemoryPoolType",
    "MemoryPoolType.WORKSPACE",
    "BuilderFlag",
    "BuilderFlag.VERSION_COMPATIBLE",
    "BuilderFlag.EXCLUDE_LEAN_RUNTIME",
    "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.set_flag",
    "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache",
    "IBuilderConfig.get_timing_cache",
    "IBuilderConfig.add_optimization_profile",
    "IOptimizationProfile.set_shape",
    "ITimingCache.serialize",
)
TENSORRT_NAMES = tuple(dict.fromkeys(BUILDER_NAMES + RUNTIME_NAMES))
log = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing here; the ONNX bundle is still complete."""


class EngineError(ExportError):
    """TensorRT could not parse a stage's ONNX file or build its engine."""


class EngineCheckError(EngineError):
    """An engine's outputs differ from ONNX Runtime's on the same inputs; it was not written."""

    def __init__(self, stage: str, rel_error: float, tolerance: float, batch: int):
        self.stage, self.rel_error, self.tolerance, self.batch = stage, rel_error, tolerance, batch
        super().__init__(
            f"{stage}: the TensorRT engine differs from ONNX Runtime (CPU) on the same inputs: relative "
            f"error {rel_error:.3e} > tolerance {tolerance:.0e} at batch {batch}; the engine was not "
            "written. Rebuild with another TensorRT version, or drop --tensorrt"
        )


class Target(NamedTuple):
    """The machine engines are built on and for."""

    trt: object
    compute_capability: str
    version: str
    gpu_name: str


def tensorrt_target() -> Target:
    """This machine's TensorRT (the full package: the lean runtime cannot build) and GPU, from the
    runtime's own probe, or TensorRTUnavailable saying what is missing."""
    from imagen.runtime.backends import gpu_name, tensorrt_environment

    try:
        trt, cudart, capability, version = tensorrt_environment()
        name = gpu_name(cudart)
    except BackendError as error:
        raise TensorRTUnavailable(str(error)) from error
    if getattr(trt, "Builder", None) is None:
        raise TensorRTUnavailable(
            f"only the lean TensorRT runtime {version} is installed here, which runs engines "
            "but cannot build them; install tensorrt to build"
        )
    return Target(trt, capability, version, name)


def engine_dir_name(compute_capability: str, version: str) -> str:
    return f"sm{compute_capability.replace('.', '')}-{version}"


def network_flags(trt) -> int:
    """Strongly typed where the flag exists (TensorRT 10.x: opt in; 11.x: always on, flag accepted)."""
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def build_engine(
    onnx_path: Path,
    signature: StageSignature,
    plan_path: Path,
    timing_cache: Path,
    *,
    version_compatible: bool = False,
    workspace_gb: float = 4.0,
) -> None:
    """Parses `onnx_path` (external data beside it) into a strongly typed network and writes its engine.
    version_compatible: the engine also runs on the lean runtime of this TensorRT version; the lean
    runtime is left out of the plan (the loader allows the plan's host code)."""
    trt = tensorrt_target().trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{signature.name}: TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    use_timing_cache(config, timing_cache, signature.name)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in engine_profile(signature).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"{signature.name}: TensorRT failed to build an engine from {onnx_path.name} (its log above says why)"
        )
    plan_path.write_bytes(bytes(serialized))
    cache = config.get_timing_cache()
    timing_cache.write_bytes(bytes(cache.serialize()))


def use_timing_cache(config, timing_cache: Path, stage: str) -> None:
    """Gives the build the timing cache file's measurements. TensorRT refuses (False) a cache from
    another GPU or TensorRT version: that one is replaced by a fresh cache, which the build fills
    and `build_engine` writes back; EngineError if TensorRT refuses even an empty one."""
    blob = timing_cache.read_bytes() if timing_cache.exists() else b""
    if config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False):
        return
    if blob and config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        log.warning("%s: TensorRT refused the timing cache %s (another GPU or version); made anew", stage, timing_cache)
        return
    raise EngineError(f"{stage}: TensorRT refused a timing cache (set_timing_cache); delete {timing_cache} and rebuild")


def check_engine(
    plan_path: Path,
    onnx_path: Path,
    signature: StageSignature,
    tolerance: float,
    *,
    version_compatible: bool = False,
    input_kwargs: dict | None = None,
    seed: int = 0,
) -> float:
    """The largest relative error of the engine against ONNX Runtime (CPU) on the same sample inputs,
    at the profile's smallest and largest batch; EngineCheckError above `tolerance` (or non-finite).
    Both sides are NumPy arrays on the host: the engine's outputs are copied there (array_namespace),
    even where CuPy would be the backend's default."""
    import onnxruntime as ort

    from imagen.runtime.backends import TensorRTBackend

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rng, worst = np.random.default_rng(seed), 0.0
    opened = TensorRTBackend(
        plan_path, signature, cuda_graphs=False, version_compatible=version_compatible, array_namespace=np
    )
    with opened as backend:
        for batch in sorted({signature.batch_min, signature.batch_max}):
            feeds = signature.sample_inputs(batch, rng, **(input_kwargs or {}))
            expected = dict(zip(signature.output_names, session.run(signature.output_names, feeds)))
            got = backend.run(feeds)
            error = max(relative_error(got[name], want) for name, want in expected.items())
            if not error <= tolerance:
                raise EngineCheckError(signature.name, error, tolerance, batch)
            worst = max(worst, error)
    return worst


def build_engines(
    stages, entries: dict, staging: Path, say, *, tolerance: float, version_compatible: bool = False
) -> TensorRTEntry | None:
    """Builds and checks one engine per stage (objects with `name`, `signature`, `input_kwargs`) from
    the ONNX files that `entries` (StageEntry per stage) name inside `staging`; the manifest's entry,
    or None (said) when TensorRT or a GPU is missing. An engine that fails its check is not written."""
    try:
        target = tensorrt_target()
    except TensorRTUnavailable as reason:
        say(f"tensorrt: skipped: {reason}; the ONNX bundle is complete")
        return None
    folder = staging / "tensorrt" / engine_dir_name(target.compute_capability, target.version)
    folder.mkdir(parents=True)
    engines, errors = {}, {}
    for stage in stages:
        onnx_path, plan = staging / entries[stage.name].file.file, folder / f"{stage.name}.plan"
        partial = folder / f".{stage.name}.plan.partial"
        say(
            f"{stage.name}: building TensorRT engine ({entries[stage.name].precision}"
            f"{', version-compatible' if version_compatible else ''})"
        )
        try:
            build_engine(
                onnx_path, stage.signature, partial, folder / "timing.cache", version_compatible=version_compatible
            )
            errors[stage.name] = check_engine(
                partial,
                onnx_path,
                stage.signature,
                tolerance,
                version_compatible=version_compatible,
                input_kwargs=stage.input_kwargs,
            )
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, plan)
        say(
            f"{stage.name}: engine rel. error {errors[stage.name]:.2e} against ONNX Runtime (tolerance "
            f"{tolerance:.0e}) ok"
        )
        engines[stage.name] = FileEntry(plan.relative_to(staging).as_posix(), plan.stat().st_size, sha256_file(plan))
    return TensorRTEntry(
        folder.relative_to(staging).as_posix(),
        target.compute_capability,
        target.version,
        engines,
        gpu_name=target.gpu_name,
        version_compatible=version_compatible,
        max_rel_error=errors,
        tolerance=tolerance,
    )
