"""OpenVINO as a stage backend on the CPU: `OpenVINOBackend` over a bundle's ONNX files, in FP32 or
bf16, and the folder of its compiled models.

OpenVINO reads the ONNX file itself (no conversion step, nothing written into the bundle). A stage
is compiled per batch size with static shapes, on first use of that size: on the demo's Unets
static shapes ran 20-35% faster than one dynamic-batch model in bf16 (on the 64x64 dim-64 Unet,
the same). A backend keeps the `MAX_SHAPES` sizes used last; each holds its own copy of the
weights and activations. `precision` is OpenVINO's INFERENCE_PRECISION_HINT ("f32" or "bf16"):
in bf16 the convolutions and matrix products run in bf16 with float32 accumulation; inputs and
outputs stay float32 NumPy arrays, so the sampling loop is the same as on ONNX Runtime.

Compiled models are kept in the per-user folder of the machine and the bundle (`openvino_cache_dir`),
one file per stage, batch size and settings, so a second load imports them instead of compiling.
The files are this module's own, not OpenVINO's CACHE_DIR: OpenVINO imports a blob whose weights
were damaged and computes NaN from it. Each file starts with the sha256 of the blob; one that does
not match, or that OpenVINO refuses, is compiled again and replaced (written under a temporary
name, then renamed).
"""

import functools
import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from imagen._io import atomic_write

from ..arrays import to_numpy
from ..errors import BackendError, BundleError, ParameterError
from .feeds import check_feeds
from .machine import cache_folder, machine_key
from .onnxruntime import default_threads, tensorrt_cache_key

OPENVINO_INSTALL = "pip install 'imagen-cascade[openvino]'"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # our names -> OpenVINO's INFERENCE_PRECISION_HINT
MAX_SHAPES = 4  # compiled batch sizes a backend keeps (imagen-run uses one, a server a few)
BLOB_HEADER = b"imagen-openvino-blob 1 sha256 "  # then 64 hex digits and a newline, then the blob


def import_openvino():
    """The openvino module, or BackendError saying how to install it."""
    try:
        import openvino
    except ImportError as error:
        raise BackendError(
            f"OpenVINO is not installed ({error}); install it with {OPENVINO_INSTALL}, or use --backend "
            "onnxruntime --precision fp32"
        ) from None
    return openvino


def openvino_installed() -> bool:
    """Whether `import openvino` would work (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


@functools.lru_cache(maxsize=1)
def openvino_core():
    """One OpenVINO Core per process (compile_model may be called from several threads)."""
    return import_openvino().Core()


def openvino_version() -> str:
    return import_openvino().__version__.split("-")[0]


def openvino_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU device says it can do (OPTIMIZATION_CAPABILITIES: "FP32", "BF16", "INT8", ...)."""
    return tuple(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def openvino_cache_dir(root: Path) -> Path | None:
    """The compiled-model folder for the bundle at `root` on this machine:
    `<cache root>/openvino/<machine_key>/<bundle key>`, or None where it cannot be written."""
    return cache_folder("openvino", machine_key(), tensorrt_cache_key(Path(root)))


class _Shape:
    """One compiled batch size and its infer requests, one per thread (a request is not thread-safe)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.local = threading.local()

    def request(self):
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        return request


class OpenVINOBackend:
    """A stage on OpenVINO's CPU device; `run` is safe to call from several threads.

    precision: "fp32" or "bf16" (the inference precision; bf16 wants a CPU with native bf16, see
    machine.native_bf16). threads: INFERENCE_NUM_THREADS (None: the CPUs this process may run on).
    cache_dir: the folder of compiled models (None: compile every time). The stage's usual batch
    (`batch_opt`) is compiled at once, so that a model OpenVINO cannot compile fails at load.
    `close()` releases the compiled models."""

    array_namespace = None  # NumPy in and out

    def __init__(self, path, stage_signature, precision: str = "fp32", threads: int | None = None, *, cache_dir=None):
        if precision not in PRECISION_HINTS:
            raise ParameterError("precision", f"one of {', '.join(PRECISION_HINTS)} for OpenVINO", precision)
        self.stage, self.path, self.precision = stage_signature, Path(path), precision
        core = openvino_core()
        try:
            self.model = core.read_model(str(self.path))
        except Exception as error:  # OpenVINO raises its own exception types
            raise BackendError(
                f"OpenVINO cannot read {self.path} (stage {self.stage.name}): {error}; re-export the bundle, "
                "or use --backend onnxruntime"
            ) from error
        self._check_names()
        self.config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads) if threads else default_threads(),
        }
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._shapes: OrderedDict[int, _Shape] = OrderedDict()
        self._lock = threading.Lock()
        self._shape(self.stage.batch_opt)

    def _check_names(self) -> None:
        inputs = sorted(name for port in self.model.inputs for name in port.get_names())
        outputs = sorted(name for port in self.model.outputs for name in port.get_names())
        for kind, names, expected in (("inputs", inputs, self.stage.input_names), ("outputs", outputs, None)):
            expected = expected if expected is not None else self.stage.output_names
            missing = [name for name in expected if name not in names]
            if missing:
                raise BundleError(
                    f"{self.path} has {kind} {names}, its manifest lists {sorted(expected)}; re-export the bundle"
                )

    def _shape(self, batch: int) -> _Shape:
        """The compiled model of this batch size: kept, or compiled now (the least recently used one
        beyond MAX_SHAPES is dropped; threads still running it keep it until they finish)."""
        with self._lock:
            if self.model is None:
                raise BackendError(f"{self.stage.name}: this OpenVINO backend was closed")
            shape = self._shapes.get(batch)
            if shape is None:
                shape = self._shapes[batch] = _Shape(self._load(batch))
            self._shapes.move_to_end(batch)
            while len(self._shapes) > MAX_SHAPES:
                self._shapes.popitem(last=False)
            return shape

    def _blob_path(self, batch: int) -> Path | None:
        """The file of this stage's compiled model at `batch`: named by everything it depends on (the
        ONNX file's size and time, OpenVINO's version, the settings)."""
        if self.cache_dir is None:
            return None
        stat = self.path.stat()
        key = [self.path.name, stat.st_size, stat.st_mtime_ns, openvino_version(), batch, sorted(self.config.items())]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.stage.name}-{self.precision}-batch{batch}-{digest}.blob"

    def _load(self, batch: int):
        """The compiled model at `batch`: imported from its file when the file is whole, else compiled
        (and written, when there is a cache folder)."""
        path = self._blob_path(batch)
        blob = None if path is None else read_blob(path)
        if blob is not None:
            try:
                return openvino_core().import_model(blob, "CPU", self.config)
            except Exception:  # noqa: BLE001 - a blob OpenVINO refuses is compiled again below
                pass
        model = self.model.clone()
        model.reshape({spec.name: list(spec.concrete(batch)) for spec in self.stage.inputs})
        try:
            compiled = openvino_core().compile_model(model, "CPU", self.config)
        except Exception as error:
            raise BackendError(
                f"{self.stage.name}: OpenVINO cannot compile {self.path} for batch {batch} in {self.precision}: "
                f"{error}; use --backend onnxruntime"
            ) from error
        if path is not None:
            write_blob(path, compiled.export_model().getvalue())
        return compiled

    def run(self, feeds: dict) -> dict:
        batch = check_feeds(self.stage, feeds)
        request = self._shape(batch).request()
        inputs = {name: np.ascontiguousarray(to_numpy(array)) for name, array in feeds.items()}
        try:
            request.infer(inputs, share_inputs=True)
        except Exception as error:  # OpenVINO raises its own exception types
            raise BackendError(f"{self.stage.name}: OpenVINO failed: {error}") from error
        outputs = {}
        for spec in self.stage.outputs:  # copies: the request's tensors are reused by its next call
            outputs[spec.name] = np.array(request.get_tensor(spec.name).data, dtype=spec.dtype, copy=True)
        return outputs

    def close(self) -> None:
        """Releases the compiled models (once no `run` uses them); later calls raise BackendError."""
        with self._lock:
            self.model = None
            self._shapes.clear()


def read_blob(path: Path) -> bytes | None:
    """The blob in a compiled-model file, or None when the file is missing, unreadable or damaged."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    start = len(BLOB_HEADER) + 65
    if not data.startswith(BLOB_HEADER) or len(data) < start:
        return None
    expected = data[len(BLOB_HEADER) : start - 1].decode("ascii", "replace")
    blob = data[start:]
    return blob if hashlib.sha256(blob).hexdigest() == expected else None


def write_blob(path: Path, blob: bytes) -> None:
    """Writes a compiled-model file atomically; a folder that cannot be written only means compiling again."""
    try:
        atomic_write(path, BLOB_HEADER + hashlib.sha256(blob).hexdigest().encode() + b"\n" + blob)
    except OSError:
        pass
