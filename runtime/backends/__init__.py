"""Inference backends: one object per stage with `run(feeds) -> {output name: array}` and `close()`.

    feeds.py        the feed check every backend runs first, and the shapes engines are tuned for
    onnxruntime.py  `OnnxRuntimeBackend` (the default: CPU, or the CUDA/TensorRT execution providers)
    tensorrt.py     `TensorRTBackend`, serialized engines from `imagen-export --tensorrt`
    cuda.py         TensorRT and cuda-python, the GPU and driver probe, which engines run here
    device.py       device arrays (the CUDA Array Interface) at the backends' edges

This module chooses and opens them. A backend's `array_namespace` is the array library its outputs
belong to (NumPy, or CuPy's on a GPU, so that the sampling loop stays there). TensorRT and
cuda-python are imported only when the TensorRT backend is used, and so are the modules for it:
`TensorRTBackend`, `tensorrt_environment`, ... are loaded from here on first use.
"""

from ..bundle import Bundle
from ..contract.settings import is_int
from ..errors import BackendError, BundleError, ParameterError
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

BACKENDS = ("auto", "onnxruntime", "tensorrt")
# What cuda.py gives, loaded on first use (module attribute lookup, PEP 562), and TensorRTBackend.
_CUDA = ("tensorrt_environment", "check_engines_match", "gpu_name", "import_tensorrt", "is_lean")
_CUDA += ("TENSORRT_NAMES", "CUDART_NAMES")

__all__ = [
    "BACKENDS",
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
    "provider_names",
    "tensorrt_cache_dir",
    "tensorrt_provider_options",
    "TensorRTBackend",
    *_CUDA,
]


def __getattr__(name: str):
    if name == "TensorRTBackend":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend
    if name in _CUDA:
        from . import cuda

        return getattr(cuda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_backend_options(backend: str, threads: int | None) -> None:
    if backend not in BACKENDS:
        raise ParameterError("backend", f"one of {', '.join(BACKENDS)}", backend)
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ParameterError("threads", "a positive integer or None", threads)


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
    bundle: Bundle, backend: str = "auto", providers=None, threads: int | None = None
) -> tuple[dict, str]:
    """One backend per stage of a verified bundle, and the name of the one chosen.

    backend: "onnxruntime"; "tensorrt" (the bundle's engines, on an NVIDIA GPU); "auto": TensorRT
    when the bundle has engines usable here, else onnxruntime. providers: onnxruntime execution
    providers (None: CPU; "auto": CUDA/TensorRT providers when installed). A failure closes what
    was opened before it."""
    check_backend_options(backend, threads)
    bundle, chosen = choose_backend(bundle, backend)
    cache = None  # the TensorRT execution provider's engine folder, made only when that provider is asked for
    if chosen == "onnxruntime":
        check_providers(providers)
        if TENSORRT_PROVIDER in onnxruntime_providers(providers):
            cache = tensorrt_cache_dir(bundle.root)
    backends = {}
    try:
        for name, stage in bundle.stages.items():
            backends[name] = _open(bundle, chosen, name, stage, providers, threads, cache)
    except BaseException:
        close_backends(backends)
        raise
    return backends, chosen


def _open(bundle: Bundle, chosen: str, name: str, stage, providers, threads, cache):
    if chosen == "onnxruntime":
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
