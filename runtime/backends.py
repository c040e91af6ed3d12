"""Inference backends: one object per stage with `run(feeds) -> {output name: array}`.

`OnnxRuntimeBackend` (the default, CPU or CUDA/TensorRT execution providers) and
`TensorRTBackend` (serialized engines from `imagen-export --tensorrt`, in tensorrt_backend.py;
tensorrt and cuda-python are imported only when it is used). Both check the feeds against the stage
signature first and raise SignatureError, so a wrong array never reaches an engine. A backend's
`array_namespace` is the array library its outputs belong to (NumPy, or CuPy's on a GPU, so that
the sampling loop stays there); device_arrays.py reads device arrays at these edges.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

from . import device_arrays
from .arrays import NUMPY, dtype_name, is_array, to_numpy
from .bundle import Bundle
from .contract import BATCH, StageSignature
from .contract.settings import is_int
from .device_arrays import contiguous, cupy_namespace, device_buffer, empty, is_device_array, is_device_namespace
from .errors import BackendError, BundleError, ParameterError, SignatureError
from .tensorrt_backend import TensorRTBackend, check_engines_match, is_lean, tensorrt_environment

BACKENDS = ("auto", "onnxruntime", "tensorrt")
# ONNX Runtime's execution providers by the short names imagen-run and imagen-serve take (--providers)
PROVIDER_SETS = {
    "cpu": None,
    "auto": "auto",
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT_PROVIDER, "CUDAExecutionProvider")
TENSORRT_CACHE = "ort-tensorrt-cache"  # the TensorRT execution provider's engines, inside the bundle
DEVICE_ID = 0  # the GPU device arrays are bound on: one GPU per process (choose it with CUDA_VISIBLE_DEVICES)


def check_feeds(stage: StageSignature, feeds: dict) -> int:
    """The batch size of `feeds` if they match the signature, else SignatureError naming what differs."""
    if not isinstance(feeds, dict):
        raise SignatureError(f"{stage.name}: feeds must be a dict of name -> array, got {type(feeds).__name__}")
    names = stage.input_names
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        raise SignatureError(f"{stage.name}: inputs are {names}; missing {missing}, unexpected {extra}")
    batch = None
    for spec in stage.inputs:
        array = feeds[spec.name]
        if not is_array(array):
            raise SignatureError(f"{stage.name}: input {spec.name} must be an array, got {type(array).__name__}")
        if dtype_name(array) != spec.dtype:
            raise SignatureError(f"{stage.name}: input {spec.name} must be {spec.dtype}, got {dtype_name(array)}")
        if array.ndim != len(spec.shape):
            raise SignatureError(
                f"{stage.name}: input {spec.name} must have rank {len(spec.shape)} "
                f"{list(spec.shape)}, got shape {list(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=False)):
            if want == BATCH:
                if batch is None:
                    batch = got
                elif got != batch:
                    raise SignatureError(f"{stage.name}: input {spec.name} has batch {got}, other inputs have {batch}")
            elif want != got:
                raise SignatureError(
                    f"{stage.name}: input {spec.name} dimension {axis} must be {want}, got {got} "
                    f"(shape {list(array.shape)}, expected {list(spec.shape)})"
                )
    batch = 1 if batch is None else batch
    if not 1 <= batch <= stage.batch_max:
        raise SignatureError(f"{stage.name}: batch {batch} is outside [1, {stage.batch_max}] (the bundle's max batch)")
    return batch


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def onnxruntime_providers(providers=None) -> list:
    """None -> CPU; "auto" -> TensorRT/CUDA execution providers when this onnxruntime has them, then CPU."""
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    if providers == "auto":
        available = ort.get_available_providers()
        chosen = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        return chosen + ["CPUExecutionProvider"]
    if isinstance(providers, str):
        return [providers]
    return list(providers)


def check_providers_installed(providers) -> None:
    """BackendError naming each execution provider asked for by name that this onnxruntime lacks (it
    would only warn, then run on the CPU); None and "auto" take what is there."""
    if providers is None or providers == "auto":
        return
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [name for name in _provider_names(onnxruntime_providers(providers)) if name not in available]
    if missing:
        raise BackendError(_no_provider(ort, missing))


def _provider_names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def _no_provider(ort, missing: list[str]) -> str:
    return (
        f"onnxruntime {ort.__version__} cannot use {', '.join(missing)} here (this install has "
        f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu in place of onnxruntime "
        "(pip install 'imagen-cascade[gpu]') on a machine with an NVIDIA GPU, CUDA and cuDNN (and TensorRT for "
        "its provider), or use --providers cpu"
    )


def tensorrt_cache_dir(root: Path, key: str) -> Path:
    """The folder for the TensorRT execution provider's engines and timing cache of the bundle at
    `root`: `<root>/ort-tensorrt-cache`, or where the bundle cannot be written (a read-only mount),
    a per-user folder keyed by the bundle's sha, `$XDG_CACHE_HOME` (or ~/.cache)`/imagen/ort-tensorrt/<key>`."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagen" / "ort-tensorrt" / key
    tried = []
    for folder in (root / TENSORRT_CACHE, user):
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


def tensorrt_provider_options(stage: StageSignature, cache: Path) -> dict[str, str]:
    """The TensorRT execution provider's options for a stage: engine and timing caches on, in `cache`,
    and one optimization profile with the signature's min/opt/max shapes (batch 1 to the bundle's
    largest; a Unet's counts the cond and uncond rows), so one cached engine serves every batch.

    Names and formats from ONNX Runtime: onnxruntime/core/providers/tensorrt/
    tensorrt_execution_provider_info.cc (provider_option_names) and docs/execution-providers/
    TensorRT-ExecutionProvider.md ("input1:dim1xdim2...,input2:..."; booleans "True"/"False"; every
    dynamic input listed). Without trt_timing_cache_path the timing cache goes to the engine cache
    path (tensorrt_execution_provider.cc: global_cache_path_ falls back to cache_path_). No
    trt_fp16_enable: TensorRT 11 has no FP16 flag, and the FP16 ONNX that `imagen-export --fp16`
    writes carries its precision."""

    def shapes(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shape[which]))}" for name, shape in stage.profile().items())

    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_profile_min_shapes": shapes(0),
        "trt_profile_opt_shapes": shapes(1),
        "trt_profile_max_shapes": shapes(2),
    }


class OnnxRuntimeBackend:
    """One onnxruntime InferenceSession for a stage; `run` is safe to call from several threads.

    io_binding: bind inputs and outputs where they are (device arrays by their CUDA pointer, host
    arrays by theirs) instead of `session.run` (None: on the CUDA or TensorRT execution provider).
    array_namespace: of the outputs (None: CuPy's on those providers when CuPy is installed, else
    NumPy). tensorrt_cache: the TensorRT provider's engine folder (None: beside the ONNX file, see
    `tensorrt_cache_dir`)."""

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
    ):
        import onnxruntime as ort

        self.stage = stage_signature
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) if threads else default_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        check_providers_installed(providers)  # before a cache folder is made for a provider that is not there
        self.providers = onnxruntime_providers(providers)
        requested = self.providers
        if TENSORRT_PROVIDER in requested:  # named alone: with this stage's cache and profile
            if tensorrt_cache is None:
                tensorrt_cache = tensorrt_cache_dir(
                    self.path.parent, hashlib.sha256(bytes(self.path.resolve())).hexdigest()[:16]
                )
            trt_options = tensorrt_provider_options(self.stage, Path(tensorrt_cache))
            requested = [(p, trt_options) if p == TENSORRT_PROVIDER else p for p in requested]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=requested)
        except Exception as error:  # onnxruntime raises its own exception types
            raise BackendError(
                f"onnxruntime cannot load {self.path} (stage {self.stage.name}): {error}; "
                "re-export the bundle, or check the providers"
            ) from error
        if providers not in (None, "auto"):  # asked for by name: ONNX Runtime must not drop one silently
            self._check_providers(ort)
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

    def _check_providers(self, ort) -> None:
        """BackendError when the session runs without a provider that was asked for by name: one that is
        installed can still fail to start (its CUDA, cuDNN or TensorRT libraries missing), and ONNX
        Runtime then logs and goes on with what is left, usually the CPU."""
        running = self.session.get_providers()
        dropped = [name for name in _provider_names(self.providers) if name not in running]
        if dropped:
            raise BackendError(f"{self.stage.name}: {_no_provider(ort, dropped)}")

    def run(self, feeds: dict) -> dict:
        batch = check_feeds(self.stage, feeds)
        if self.io_binding:
            return self._run_bound(feeds, batch)
        try:
            outputs = self.session.run(self.stage.output_names, feeds)
        except Exception as error:
            raise BackendError(f"{self.stage.name}: onnxruntime failed: {error}") from error
        return dict(zip(self.stage.output_names, outputs, strict=False))

    def _run_bound(self, feeds: dict, batch: int) -> dict:
        """One run with an IOBinding of its own (so threads do not share one). Outputs are new arrays
        of the backend's namespace, of the signature's shapes, that ONNX Runtime writes in place.

        Stream order: ONNX Runtime's CUDA streams are non-blocking (cudaStreamNonBlocking in
        onnxruntime/core/providers/cuda/cuda_stream_handle.cc), so they do not wait for the legacy
        default stream: the host first waits for every stream that a device input or output names
        (with CuPy). A run ends by synchronizing the providers' streams (run option
        disable_synchronize_execution_providers, default "0"), so outputs are complete on return."""
        binding, keep, waits = self.session.io_binding(), [], []
        outputs = {spec.name: self._new_output(spec.concrete(batch), spec.dtype) for spec in self.stage.outputs}
        try:
            for spec in self.stage.inputs:
                self._bind(binding.bind_input, spec.name, feeds[spec.name], keep, waits)
            for name, array in outputs.items():
                self._bind(binding.bind_output, name, array, keep, waits)
            device_arrays.wait_for_streams(waits, device_arrays.cupy_synchronize, self.stage.name)
            self.session.run_with_iobinding(binding)
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
    providers (None: CPU; "auto": CUDA/TensorRT providers when installed)."""
    check_backend_options(backend, threads)
    bundle, chosen = choose_backend(bundle, backend)
    cache = None  # the TensorRT execution provider's engine folder, made only when that provider is asked for
    if chosen == "onnxruntime" and TENSORRT_PROVIDER in onnxruntime_providers(providers):
        check_providers_installed(providers)
        cache = tensorrt_cache_dir(bundle.root, bundle.short_sha)
    backends = {}
    for name, stage in bundle.stages.items():
        if chosen == "tensorrt":
            entry = bundle.manifest.tensorrt.engines.get(name)
            if entry is None:
                raise BundleError(
                    f"{bundle.root / 'manifest.json'} has no TensorRT engine for {name}; rebuild with imagen-export "
                    "--tensorrt, or use --backend onnxruntime"
                )
            backends[name] = TensorRTBackend(bundle.path(entry), stage.signature, bundle.manifest.tensorrt)
        else:
            backends[name] = OnnxRuntimeBackend(
                bundle.path(stage.file), stage.signature, providers, threads, tensorrt_cache=cache
            )
    return backends, chosen
