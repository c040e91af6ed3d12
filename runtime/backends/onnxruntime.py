"""ONNX Runtime as a stage backend: `OnnxRuntimeBackend`, its execution providers, and the TensorRT
execution provider's options and engine cache.

Execution providers are named one way throughout: ONNX Runtime's own names (`CPU_PROVIDER`, ...),
in a list in the order ONNX Runtime tries them, an entry being a name or a (name, options) pair;
`PROVIDER_SETS` maps the short names that imagen-run and imagen-serve take (--providers) to them.
ONNX Runtime's GPU build is the separate `onnxruntime-gpu` distribution, which installs the same
`onnxruntime` package as the CPU build: with both installed, whichever was installed last owns the
files, so GPU providers are refused, with the commands that fix it, until only one is left.
"""

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from ..arrays import NUMPY, to_numpy
from ..contract import MANIFEST, StageSignature
from ..errors import BackendError, BundleError, SignatureError
from .device import (
    contiguous,
    cupy_namespace,
    cupy_synchronize,
    device_buffer,
    empty,
    is_device_array,
    is_device_namespace,
    wait_for_streams,
)
from .feeds import check_feeds, engine_profile

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT_PROVIDER, CUDA_PROVIDER)  # in the order "auto" prefers them
PROVIDER_SETS = {
    "cpu": None,
    "auto": "auto",
    "cuda": [CUDA_PROVIDER, CPU_PROVIDER],
    "tensorrt": [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER],
}
TENSORRT_CACHE = "ort-tensorrt-cache"  # the TensorRT execution provider's engines, inside the bundle
DEVICE_ID = 0  # the GPU device arrays are bound on: one GPU per process (choose it with CUDA_VISIBLE_DEVICES)
GPU_INSTALL = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.17'"


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def onnxruntime_providers(providers=None) -> list:
    """The providers as ONNX Runtime takes them. None -> the CPU; "auto" -> the GPU providers this
    onnxruntime has, then the CPU; a name or a list (names or (name, options) pairs) as given."""
    if providers is None:
        return [CPU_PROVIDER]
    if providers == "auto":
        import onnxruntime as ort

        available = ort.get_available_providers()
        return [p for p in GPU_PROVIDERS if p in available] + [CPU_PROVIDER]
    if isinstance(providers, str):
        return [providers]
    return list(providers)


def provider_names(providers: list) -> list[str]:
    """The names of an ONNX Runtime provider list (entries are names or (name, options) pairs)."""
    return [p if isinstance(p, str) else p[0] for p in providers]


@functools.lru_cache(maxsize=1)
def onnxruntime_builds() -> tuple[str, ...]:
    """The installed distributions that provide the `onnxruntime` package (onnxruntime, onnxruntime-gpu, ...)."""
    from importlib.metadata import packages_distributions

    return tuple(sorted({name.lower() for name in packages_distributions().get("onnxruntime", [])}))


def check_providers(providers) -> None:
    """BackendError when the providers cannot be what they say: GPU providers (by name, or "auto")
    with more than one ONNX Runtime build installed, or a provider named that this onnxruntime lacks
    (ONNX Runtime would only warn, then run on the CPU). None (the CPU) runs on any build."""
    if providers is None:
        return
    named = providers != "auto"
    wanted = provider_names(onnxruntime_providers(providers)) if named else list(GPU_PROVIDERS)
    builds = onnxruntime_builds()
    if len(builds) > 1 and any(name in GPU_PROVIDERS for name in wanted):
        raise BackendError(
            f"{' and '.join(builds)} are installed together; they install the same onnxruntime package over "
            "each other, so whether the GPU providers are there depends on which came last, and removing either "
            f"breaks the other. Keep only the GPU build: {GPU_INSTALL} (pip cannot say 'instead of onnxruntime', "
            "so pip check will name onnxruntime as missing; that is expected), or use --providers cpu"
        )
    if not named:
        return
    import onnxruntime as ort

    missing = [name for name in wanted if name not in ort.get_available_providers()]
    if missing:
        raise BackendError(_no_provider(ort, missing))


def _no_provider(ort, missing: list[str]) -> str:
    return (
        f"onnxruntime {ort.__version__} cannot use {', '.join(missing)} here (this install has "
        f"{', '.join(ort.get_available_providers())}); install ONNX Runtime's GPU build in place of the CPU "
        f"build ({GPU_INSTALL}) on a machine with an NVIDIA GPU, CUDA and cuDNN (and TensorRT 10 for its "
        "TensorRT provider), or use --providers cpu"
    )


def tensorrt_cache_key(root: Path) -> str:
    """The key of the per-user engine folder for the ONNX files in `root`: the first 16 hex digits of
    the sha256 of its manifest.json (a bundle's `short_sha`), or of the folder's path without one."""
    manifest = root / MANIFEST
    data = manifest.read_bytes() if manifest.is_file() else os.fsencode(root.resolve())
    return hashlib.sha256(data).hexdigest()[:16]


def tensorrt_cache_dir(root: Path) -> Path:
    """The folder for the TensorRT execution provider's engines and timing cache of the bundle at
    `root`: `<root>/ort-tensorrt-cache`, or where the bundle cannot be written (a read-only mount),
    a per-user folder, `$XDG_CACHE_HOME` (or ~/.cache)`/imagen/ort-tensorrt/<tensorrt_cache_key>`."""
    tried = []
    for folder in (root / TENSORRT_CACHE, None):
        if folder is None:
            cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            folder = cache_home / "imagen" / "ort-tensorrt" / tensorrt_cache_key(root)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            tried.append(f"{folder} ({error.strerror or error})")
            continue
        if os.access(folder, os.W_OK):
            return folder
        tried.append(f"{folder} (not writable)")
    raise BackendError(
        f"no writable folder for the TensorRT execution provider's engines: {'; '.join(tried)}; "
        "set XDG_CACHE_HOME to a writable folder"
    )


def tensorrt_provider_options(stage: StageSignature, cache: Path, fp16: bool = False) -> dict[str, str]:
    """The TensorRT execution provider's options for a stage: engine and timing caches on, in `cache`,
    one optimization profile from `engine_profile` (batch 1 to the bundle's largest, tuned for the
    largest), so one cached engine serves every batch, and FP16 for an FP16 stage.

    Names and formats from ONNX Runtime: onnxruntime/core/providers/tensorrt/
    tensorrt_execution_provider_info.cc (provider_option_names) and docs/execution-providers/
    TensorRT-ExecutionProvider.md ("input1:dim1xdim2...,input2:..."; booleans "True"/"False"; every
    dynamic input listed). Without trt_timing_cache_path the timing cache goes to the engine cache
    path. The provider links TensorRT 10, which builds weakly typed networks: without
    trt_fp16_enable it runs the FP16 ONNX's layers in FP32."""

    def shapes(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shape[which]))}" for name, shape in engine_profile(stage).items())

    options = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_profile_min_shapes": shapes(0),
        "trt_profile_opt_shapes": shapes(1),
        "trt_profile_max_shapes": shapes(2),
    }
    return options | ({"trt_fp16_enable": "True"} if fp16 else {})


class OnnxRuntimeBackend:
    """One onnxruntime InferenceSession for a stage; `run` is safe to call from several threads.

    io_binding: bind inputs and outputs where they are (device arrays by their CUDA pointer, host
    arrays by theirs) instead of `session.run` (None: on the CUDA or TensorRT execution provider).
    array_namespace: of the outputs (None: CuPy's on those providers when CuPy is installed, else
    NumPy). tensorrt_cache: the TensorRT provider's engine folder (None: `tensorrt_cache_dir` of the
    ONNX file's folder). precision: the stage's ("fp16" turns on the TensorRT provider's FP16).
    `close()` releases the session."""

    def __init__(
        self,
        path,
        stage_signature: StageSignature,
        providers=None,
        threads: int | None = None,
        *,
        io_binding: bool | None = None,
        array_namespace=None,
        tensorrt_cache=None,
        precision: str = "fp32",
    ):
        import onnxruntime as ort

        self.stage = stage_signature
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) if threads else default_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        check_providers(providers)  # before a cache folder is made for a provider that is not there
        self.providers = onnxruntime_providers(providers)
        requested = self.providers
        if TENSORRT_PROVIDER in requested:  # named alone: with this stage's cache and profile
            cache = tensorrt_cache_dir(self.path.parent) if tensorrt_cache is None else Path(tensorrt_cache)
            trt_options = tensorrt_provider_options(self.stage, cache, fp16=precision == "fp16")
            requested = [(p, trt_options) if p == TENSORRT_PROVIDER else p for p in requested]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=requested)
        except Exception as error:  # onnxruntime raises its own exception types
            raise BackendError(
                f"onnxruntime cannot load {self.path} (stage {self.stage.name}): {error}; "
                "re-export the bundle, or check the providers"
            ) from error
        if providers not in (None, "auto"):  # asked for by name: ONNX Runtime must not drop one silently
            self._check_running(ort)
        got = [i.name for i in self.session.get_inputs()]
        if sorted(got) != sorted(self.stage.input_names):
            raise BundleError(
                f"{self.path} has inputs {got}, its manifest lists {self.stage.input_names}; re-export the bundle"
            )
        on_gpu = any(p in GPU_PROVIDERS for p in self.session.get_providers())
        self.io_binding = on_gpu if io_binding is None else bool(io_binding)
        xp = array_namespace if array_namespace is not None else cupy_namespace() if on_gpu else None
        self.array_namespace = NUMPY if xp is None else xp
        self._device_outputs = is_device_namespace(self.array_namespace, self.stage.name)
        if self._device_outputs and not self.io_binding:
            raise BackendError(f"{self.stage.name}: device arrays as outputs need io_binding=True")

    def _check_running(self, ort) -> None:
        """BackendError when the session runs without a provider that was asked for by name: one that is
        installed can still fail to start (its CUDA, cuDNN or TensorRT libraries missing), and ONNX
        Runtime then logs and goes on with what is left, usually the CPU."""
        running = self.session.get_providers()
        dropped = [name for name in provider_names(self.providers) if name not in running]
        if dropped:
            raise BackendError(f"{self.stage.name}: {_no_provider(ort, dropped)}")

    def close(self) -> None:
        """Releases the session (and the device memory its providers hold, when no run still uses it);
        later calls raise BackendError. Call it when no `run` is in flight."""
        self.session = None

    def _session(self):
        session = self.session
        if session is None:
            raise BackendError(f"{self.stage.name}: this ONNX Runtime backend was closed")
        return session

    def run(self, feeds: dict) -> dict:
        batch = check_feeds(self.stage, feeds)
        session = self._session()
        if self.io_binding:
            return self._run_bound(session, feeds, batch)
        try:
            outputs = session.run(self.stage.output_names, feeds)
        except Exception as error:
            raise BackendError(f"{self.stage.name}: onnxruntime failed: {error}") from error
        return dict(zip(self.stage.output_names, outputs, strict=False))

    def _run_bound(self, session, feeds: dict, batch: int) -> dict:
        """One run with an IOBinding of its own (so threads do not share one). Outputs are new arrays
        of the backend's namespace, of the signature's shapes, that ONNX Runtime writes in place.

        Stream order: ONNX Runtime's CUDA streams are non-blocking (cudaStreamNonBlocking in
        onnxruntime/core/providers/cuda/cuda_stream_handle.cc), so they do not wait for the legacy
        default stream: the host first waits for every stream that a device input or output names
        (with CuPy). A run ends by synchronizing the providers' streams (run option
        disable_synchronize_execution_providers, default "0"), so outputs are complete on return."""
        binding, keep, waits = session.io_binding(), [], []
        outputs = {spec.name: self._new_output(spec.concrete(batch), spec.dtype) for spec in self.stage.outputs}
        try:
            for spec in self.stage.inputs:
                self._bind(binding.bind_input, spec.name, feeds[spec.name], keep, waits)
            for name, array in outputs.items():
                self._bind(binding.bind_output, name, array, keep, waits)
            wait_for_streams(waits, _synchronize, self.stage.name)
            session.run_with_iobinding(binding)
        except (BackendError, SignatureError):
            raise
        except Exception as error:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.stage.name}: onnxruntime failed (IO binding): {error}") from error
        return outputs

    def _new_output(self, shape: tuple[int, ...], dtype: str):
        if self._device_outputs:
            return empty(self.array_namespace, shape, dtype, self.stage.name)
        return np.empty(shape, dtype)

    def _bind(self, bind, name: str, array, keep: list, waits: list) -> None:
        """bind(name, device type, device id, element type, shape, pointer): a device array on the
        GPU by its CUDA pointer, any other array in host memory; `keep` holds what must outlive the run."""
        if is_device_array(array):
            array = contiguous(array, f"{self.stage.name}: {name}")
            buffer = device_buffer(array)
            waits.append(buffer)
            bind(name, "cuda", DEVICE_ID, buffer.dtype.type, list(buffer.shape), buffer.pointer)
        else:
            array = np.ascontiguousarray(to_numpy(array))
            bind(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
        keep.append(array)


def _synchronize(stream: int) -> None:
    cupy_synchronize(stream)  # looked up at call time, so that tests can stand in for CuPy
