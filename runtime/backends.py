"""Inference backends: one object per stage with `run(feeds) -> {output name: array}`.

`OnnxRuntimeBackend` (the default, CPU or CUDA/TensorRT execution providers) and
`TensorRTBackend` (serialized engines from `imagen-export --tensorrt`, in tensorrt_backend.py;
tensorrt and cuda-python are imported only when it is used). Both check the feeds against the stage
signature first and raise SignatureError, so a wrong array never reaches an engine.
"""

import os
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .contract import BATCH, StageSignature
from .errors import BackendError, BundleError, ParameterError, SignatureError
from .settings import is_int
from .tensorrt_backend import TensorRTBackend, check_engines_match, is_lean, tensorrt_environment

BACKENDS = ("auto", "onnxruntime", "tensorrt")


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
        if not isinstance(array, np.ndarray):
            raise SignatureError(f"{stage.name}: input {spec.name} must be a numpy array, got {type(array).__name__}")
        if array.dtype != np.dtype(spec.dtype):
            raise SignatureError(f"{stage.name}: input {spec.name} must be {spec.dtype}, got {array.dtype}")
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


class OnnxRuntimeBackend:
    """One onnxruntime InferenceSession for a stage; `run` is safe to call from several threads."""

    def __init__(self, path, stage_signature: StageSignature, providers=None, threads: int | None = None):
        import onnxruntime as ort

        self.stage = stage_signature
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) if threads else default_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.providers = onnxruntime_providers(providers)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own exception types
            raise BackendError(
                f"onnxruntime cannot load {self.path} (stage {self.stage.name}): {error}; "
                "re-export the bundle, or check the providers"
            ) from error
        got = [i.name for i in self.session.get_inputs()]
        if sorted(got) != sorted(self.stage.input_names):
            raise BundleError(
                f"{self.path} has inputs {got}, its manifest lists {self.stage.input_names}; re-export the bundle"
            )

    def run(self, feeds: dict) -> dict:
        check_feeds(self.stage, feeds)
        try:
            outputs = self.session.run(self.stage.output_names, feeds)
        except Exception as error:
            raise BackendError(f"{self.stage.name}: onnxruntime failed: {error}") from error
        return dict(zip(self.stage.output_names, outputs, strict=False))


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
                bundle.path(stage.file), stage.signature, providers=providers, threads=threads
            )
    return backends, chosen
