"""Inference backends: one object per stage with `run(feeds) -> {output name: array}` and `close()`.

    feeds.py        the feed check every backend runs first, and the shapes engines are tuned for
    onnxruntime.py  `OnnxRuntimeBackend` (the default: CPU, or the CUDA/TensorRT execution providers)
    tensorrt.py     `TensorRTBackend`, serialized engines from `imagen-export --tensorrt`
    openvino.py     `OpenVINOBackend`, the bundle's ONNX on OpenVINO's CPU device, in FP32 or bf16
    split.py        `SplitBackend`, one Unet on two engines chosen per call by its timestep
    choice.py       the precision rules, bf16's quality gate, and auto's measured CPU engine choice
    machine.py      the CPU's flags, native bf16, the machine's key and the per-user cache folder
    cuda.py         TensorRT and cuda-python, the GPU and driver probe, which engines run here
    device.py       device arrays (the CUDA Array Interface) at the backends' edges

This module chooses and opens them (`open_engines`: the backends and the `Choice` that says which
engine and precision, and why). A backend's `array_namespace` is the array library its outputs
belong to (NumPy, or CuPy's on a GPU, so that the sampling loop stays there). TensorRT and
cuda-python are imported only when the TensorRT backend is used, and so are the modules for it:
`TensorRTBackend`, `tensorrt_environment`, ... are loaded from here on first use; OpenVINO only when
it is asked for or `auto` considers it (installed, a CPU with native bf16, precision auto).
"""

from ..bundle import Bundle
from ..contract import TEXT_ENCODER
from ..contract.settings import is_int
from ..errors import BackendError, BundleError, ParameterError
from .choice import GATE, PRECISION_HELP, PRECISIONS, Choice, check_precision, choose_cpu, switch_time
from .feeds import STEP_INPUTS, check_feeds, engine_profile
from .onnxruntime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    GPU_PROVIDERS,
    PROVIDER_SETS,
    TENSORRT_CACHE,
    TENSORRT_PROVIDER,
    OnnxRuntimeBackend,
    check_providers,
    onnxruntime_providers,
    provider_names,
    tensorrt_cache_dir,
    tensorrt_provider_options,
)
from .split import SplitBackend

BACKENDS = ("auto", "onnxruntime", "tensorrt", "openvino")
# What cuda.py gives, loaded on first use (module attribute lookup, PEP 562), and TensorRTBackend.
_CUDA = ("tensorrt_environment", "check_engines_match", "gpu_name", "import_tensorrt", "is_lean")
_CUDA += ("TENSORRT_NAMES", "CUDART_NAMES")

__all__ = [
    "BACKENDS",
    "GATE",
    "PRECISION_HELP",
    "PRECISIONS",
    "Choice",
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "GPU_PROVIDERS",
    "PROVIDER_SETS",
    "STEP_INPUTS",
    "TENSORRT_CACHE",
    "TENSORRT_PROVIDER",
    "OnnxRuntimeBackend",
    "check_backend_options",
    "check_feeds",
    "check_providers",
    "choose_backend",
    "close_backends",
    "engine_profile",
    "onnxruntime_providers",
    "open_backends",
    "open_engines",
    "OpenVINOBackend",
    "provider_names",
    "SplitBackend",
    "tensorrt_cache_dir",
    "tensorrt_provider_options",
    "TensorRTBackend",
    *_CUDA,
]


def __getattr__(name: str):
    if name == "OpenVINOBackend":
        from .openvino import OpenVINOBackend

        return OpenVINOBackend
    if name == "TensorRTBackend":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend
    if name in _CUDA:
        from . import cuda

        return getattr(cuda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_backend_options(backend: str, threads: int | None, precision: str = "fp32") -> None:
    if backend not in BACKENDS:
        raise ParameterError("backend", f"one of {', '.join(BACKENDS)}", backend)
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ParameterError("threads", "a positive integer or None", threads)
    check_precision(backend, precision)


def choose_backend(bundle: Bundle, backend: str = "auto") -> tuple[Bundle, str]:
    """(the bundle, with its engines verified when they will be used; "onnxruntime" or "tensorrt").

    "tensorrt" raises BackendError (no GPU or TensorRT here) or BundleError (engines built for another
    GPU or TensorRT version, or not version-compatible where only the lean runtime is installed); "auto"
    takes TensorRT only when the bundle's engines are usable here."""
    engines = bundle.manifest.tensorrt
    if backend == "onnxruntime" or (backend == "auto" and engines is None):
        return bundle, "onnxruntime"
    from .cuda import check_engines_match, is_lean, tensorrt_environment

    try:
        trt, _, capability, version = tensorrt_environment()
        check_engines_match(engines, capability, version, lean=trt is not None and is_lean(trt))
        return bundle.verify_engines(), "tensorrt"
    except (BackendError, BundleError):
        if backend == "tensorrt":
            raise
        return bundle, "onnxruntime"


def open_backends(
    bundle: Bundle, backend: str = "auto", providers=None, threads: int | None = None, precision: str = "fp32"
) -> tuple[dict, str]:
    """One backend per stage of a verified bundle, and the name of the engine chosen (`open_engines`)."""
    backends, choice = open_engines(bundle, backend, providers, threads, precision)
    return backends, choice.backend


def open_engines(
    bundle: Bundle, backend: str = "auto", providers=None, threads: int | None = None, precision: str = "fp32"
) -> tuple[dict, Choice]:
    """One backend per stage of a verified bundle, and the `Choice` (engine, precision, why).

    backend: "onnxruntime"; "tensorrt" (the bundle's engines, on an NVIDIA GPU); "openvino" (OpenVINO
    on the CPU); "auto": TensorRT when the bundle has engines usable here, else the CPU engine
    choice.py picks for `precision`. precision: "fp32" (auto: ONNX Runtime, today's images), "bf16"
    (OpenVINO's bf16 Unets) or "auto" (where the CPU has bf16 natively, the Unets pass the quality gate
    and, for backend auto, it was measured faster: the super-resolution Unets in bf16, the base Unet in
    FP32 for its noisiest quarter of timesteps and bf16 after, choice.py). providers:
    onnxruntime execution providers (None: CPU; "auto": CUDA/TensorRT providers when installed). A
    failure closes what was opened before it."""
    check_backend_options(backend, threads, precision)
    chosen = "onnxruntime"
    if backend == "tensorrt" or (backend == "auto" and precision != "bf16"):
        bundle, chosen = choose_backend(bundle, backend)
    if chosen == "tensorrt":
        unets = bundle.unets[0].precision if bundle.unets else "fp32"
        why = "asked for" if backend == "tensorrt" else "the bundle's engines match this GPU"
        choice = Choice("tensorrt", unets, f"tensorrt {unets} ({why})")
    else:
        choice = choose_cpu(bundle, backend, precision, threads, providers)
    caches = {}  # per engine: TensorRT's execution-provider engine folder (only when asked for), OpenVINO's blobs
    if "onnxruntime" in choice.engines:
        check_providers(providers)
        if TENSORRT_PROVIDER in onnxruntime_providers(providers):
            caches["onnxruntime"] = tensorrt_cache_dir(bundle.root)
    if "openvino" in choice.engines:
        from .openvino import openvino_cache_dir

        caches["openvino"] = openvino_cache_dir(bundle.root)
    unets = {stage.name: index for index, stage in enumerate(bundle.unets)}
    backends = {}
    try:
        for name, stage in bundle.stages.items():
            # the text encoder in FP32 on the base Unet's first engine, each Unet as chosen
            phases = choice.phases(unets.get(name, 0))
            if name == TEXT_ENCODER:
                phases = [(phases[0][0], "fp32")]
            opened = []
            try:
                for engine, precision in phases:
                    opened.append(_open(bundle, engine, precision, name, stage, providers, threads, caches.get(engine)))
            except BaseException:
                close_backends(dict(enumerate(opened)))
                raise
            backends[name] = opened[0] if len(opened) == 1 else SplitBackend(*opened, switch_time(bundle, name))
    except BaseException:
        close_backends(backends)
        raise
    return backends, choice


def _open(bundle: Bundle, engine: str, precision: str, name: str, stage, providers, threads, cache):
    if engine == "openvino":
        from .openvino import OpenVINOBackend

        return OpenVINOBackend(bundle.path(stage.file), stage.signature, precision, threads, cache_dir=cache)
    if engine == "onnxruntime":
        path = bundle.path(stage.file)
        return OnnxRuntimeBackend(
            path, stage.signature, providers, threads, tensorrt_cache=cache, precision=stage.precision
        )
    entry = bundle.manifest.tensorrt.engines.get(name)
    if entry is None:
        raise BundleError(
            f"{bundle.root / 'manifest.json'} has no TensorRT engine for {name}; rebuild with imagen-export "
            "--tensorrt, or use --backend onnxruntime"
        )
    from .tensorrt import TensorRTBackend

    return TensorRTBackend(bundle.path(entry), stage.signature, bundle.manifest.tensorrt)


def close_backends(backends: dict) -> None:
    """Closes every backend that has a `close` (releasing its device memory); the first error is
    raised after all were tried."""
    errors = []
    for backend in backends.values():
        close = getattr(backend, "close", None)
        if callable(close):
            try:
                close()
            except Exception as error:  # noqa: BLE001 - raised below, once every backend was tried
                errors.append(error)
    if errors:
        raise errors[0]
