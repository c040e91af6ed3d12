"""TensorRT engines from the bundle's ONNX files, with the TensorRT Python API.

One engine per stage: ONNX parser, one optimization profile from the stage signature's
min/opt/max shapes, FP16 when asked, and a timing cache kept beside the engines. Engines
are built on and for one GPU kind: they go into `tensorrt/sm<cc>-<version>/`.
"""

from pathlib import Path

from imagen.runtime.contract import StageSignature


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing here; the ONNX bundle is still complete."""


def tensorrt_target() -> tuple[object, str, str]:
    """(tensorrt module, compute capability 'major.minor', TensorRT version) or TensorRTUnavailable,
    from the runtime's own probe of this machine."""
    from imagen.runtime.backends import tensorrt_environment
    from imagen.runtime.errors import BackendError

    try:
        trt, _, capability, version = tensorrt_environment()
    except BackendError as error:
        raise TensorRTUnavailable(str(error)) from error
    return trt, capability, version


def engine_dir_name(compute_capability: str, version: str) -> str:
    return f"sm{compute_capability.replace('.', '')}-{version}"


def build_engine(onnx_path: Path, signature: StageSignature, plan_path: Path, fp16: bool,
                 timing_cache: Path, workspace_gb: float = 4.0) -> None:
    trt, _, _ = tensorrt_target()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{signature.name}: TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in signature.profile().items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{signature.name}: TensorRT failed to build an engine from {onnx_path.name}")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
