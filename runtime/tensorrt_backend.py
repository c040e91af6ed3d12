"""Native TensorRT engines (`imagen-export --tensorrt`) as a stage backend.

The full `tensorrt` package runs every engine; the lean runtime (`tensorrt_lean`, about 45 MB)
runs only version-compatible ones (`--version-compatible`), and is imported when the full
package is absent. Both, and cuda-python, are imported only when this backend is used, and the
CUDA driver is probed before any TensorRT object exists: without one, TensorRT's Runtime is a
null object that crashes the process on first use.

Per thread, one execution context, one stream and one set of device buffers sized for the
stage's largest batch, so their addresses never change: inputs are copied into them, and one
CUDA graph per batch size (captured after a warm-up call, as NVIDIA's diffusion demo does)
replays the engine's kernels at those addresses. A failed capture falls back to plain
`execute_async_v3` for that batch size.

Inputs may be NumPy arrays (copied host-to-device) or device arrays (`__cuda_array_interface__`:
CuPy, torch, Numba; copied device-to-device). Outputs are arrays of `array_namespace`: NumPy
(copied device-to-host), or with a device namespace (CuPy's, when CuPy is installed) new device
arrays filled device-to-device, never views of the reused buffers.
"""

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arrays import NUMPY, to_numpy
from .contract import StageSignature, TensorRTEntry
from .device_arrays import (
    LEGACY_STREAM,
    contiguous,
    cupy_namespace,
    device_buffer,
    empty,
    is_device_array,
    is_device_namespace,
    wait_for_streams,
)
from .errors import BackendError, BundleError

# Every TensorRT name this module uses ("Class.member" for members). Tests check that each exists
# in the TensorRT 10.x and 11.x Python bindings, full and lean, and that the code uses no other.
TENSORRT_NAMES = (
    "__version__",
    "Logger",
    "Logger.ERROR",
    "Runtime",
    "Runtime.deserialize_cuda_engine",
    "Runtime.engine_host_code_allowed",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.create_execution_context",
    "TensorIOMode",
    "TensorIOMode.INPUT",
    "DataType",
    "DataType.FLOAT",
    "DataType.HALF",
    "DataType.INT32",
    "DataType.INT64",
    "DataType.BOOL",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
)
# The cuda-python runtime calls and enums this module uses.
CUDART_NAMES = (
    "cudaGetDeviceCount",
    "cudaGetDevice",
    "cudaGetDeviceProperties",
    "cudaMalloc",
    "cudaFree",
    "cudaStreamCreate",
    "cudaStreamDestroy",
    "cudaStreamSynchronize",
    "cudaMemcpyAsync",
    "cudaMemcpyKind",
    "cudaStreamBeginCapture",
    "cudaStreamEndCapture",
    "cudaStreamCaptureMode",
    "cudaGraphInstantiate",
    "cudaGraphLaunch",
    "cudaGraphDestroy",
    "cudaGraphExecDestroy",
    "cudaGetLastError",
)
LEAN = "tensorrt_lean"
NO_GPU = "no NVIDIA GPU / CUDA driver visible"
INSTALL = "pip install 'imagen-cascade[tensorrt]' (or [tensorrt-lean] for version-compatible engines)"
log = logging.getLogger(__name__)


def import_tensorrt():
    """The full tensorrt package, else the lean runtime, else BackendError."""
    try:
        import tensorrt as trt
    except ImportError:
        try:
            import tensorrt_lean as trt
        except ImportError as error:
            raise BackendError(
                f"the tensorrt package is not installed ({INSTALL} on a machine with an NVIDIA "
                "GPU); use --backend onnxruntime"
            ) from error
    return trt


def is_lean(trt) -> bool:
    return trt.__name__.split(".")[0] == LEAN


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as error:
            raise BackendError(f"the TensorRT backend needs cuda-python ({INSTALL})") from error
    return cudart


def _cuda(cudart, call: str, *args, where: str = "CUDA"):
    """cudart.<call>(*args): cuda-python returns (error, *values); BackendError naming the call on an error."""
    result = getattr(cudart, call)(*args)
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendError(f"{where}: {call} failed with CUDA error {int(error)} ({getattr(error, 'name', error)})")
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_environment() -> tuple[object, object, str, str]:
    """(tensorrt module, cudart, compute capability 'major.minor', TensorRT version), or BackendError
    saying what is missing. The driver is probed first: no TensorRT object is made without one."""
    trt = import_tensorrt()
    cudart = _cudart()
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or not count:
        reason = f"CUDA error {int(error)} ({getattr(error, 'name', error)})" if int(error) else "0 devices"
        raise BackendError(
            f"TensorRT {trt.__version__} is installed but there is {NO_GPU} ({reason}); use --backend onnxruntime"
        )
    props = _cuda(cudart, "cudaGetDeviceProperties", _cuda(cudart, "cudaGetDevice"))
    return trt, cudart, f"{props.major}.{props.minor}", trt.__version__


def gpu_name(cudart) -> str:
    """The current device's name, as the driver reports it."""
    name = _cuda(cudart, "cudaGetDeviceProperties", _cuda(cudart, "cudaGetDevice")).name
    return (name.split(b"\0")[0].decode(errors="replace") if isinstance(name, bytes) else str(name)).strip()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def check_engines_match(engines: TensorRTEntry | None, capability: str, version: str, lean: bool = False) -> None:
    """BundleError unless this machine (GPU, TensorRT version, full or lean runtime) can run the engines.
    A version-compatible engine runs on the TensorRT it was built with and later releases of that major
    version; any other engine only on the exact version it was built with."""
    if engines is None or not engines.engines:
        raise BundleError(
            "this bundle has no TensorRT engines; rebuild it with imagen-export --tensorrt on this "
            "machine, or use --backend onnxruntime"
        )
    built = (engines.compute_capability, engines.version)
    runs = version == engines.version
    if engines.version_compatible:
        here, there = _release(version), _release(engines.version)
        runs = bool(here and there) and here[0] == there[0] and here >= there
    if built[0] != capability or not runs:
        kind = "version-compatible engines" if engines.version_compatible else "engines"
        raise BundleError(
            f"the bundle's TensorRT {kind} were built for compute capability {built[0]} with TensorRT {built[1]}; "
            f"this machine has compute capability {capability} and TensorRT {version}; rebuild them here with "
            "imagen-export --tensorrt, or use --backend onnxruntime"
        )
    if lean and not engines.version_compatible:
        raise BundleError(
            "the lean TensorRT runtime (tensorrt_lean) runs only version-compatible engines; rebuild "
            "them with imagen-export --tensorrt --version-compatible, or install the full tensorrt "
            "package, or use --backend onnxruntime"
        )


@dataclass
class _ThreadState:
    """One thread's execution context, stream and device buffers (fixed addresses, sized for batch_max)."""

    context: object
    stream: object
    buffers: dict = field(default_factory=dict)  # tensor name -> device pointer
    graphs: dict = field(default_factory=dict)  # batch -> instantiated CUDA graph, or None: run without one
    batch: int | None = None  # the batch the context's input shapes are set for
    enqueued: int | None = None  # the batch of the last real execute_async_v3


class TensorRTBackend:
    """A deserialized TensorRT engine for one stage; `run` is safe to call from several threads.

    cuda_graphs: replay one captured CUDA graph per batch size (False: `execute_async_v3` every call).
    version_compatible: allow the engine's embedded host code (version-compatible engines), taken
    from `engines` when given. array_namespace: of the outputs (None: CuPy's when CuPy is installed,
    else NumPy). `close()` frees the device buffers, graphs and streams of every thread."""

    def __init__(
        self,
        plan_path,
        stage_signature: StageSignature,
        engines: TensorRTEntry | None = None,
        *,
        cuda_graphs: bool = True,
        version_compatible: bool = False,
        array_namespace=None,
    ):
        from .backends import check_feeds  # backends imports this module

        trt, self._cudart, capability, version = tensorrt_environment()
        if engines is not None:
            check_engines_match(engines, capability, version, lean=is_lean(trt))
            version_compatible = engines.version_compatible
        self.stage, self.path, self.cuda_graphs = stage_signature, Path(plan_path), bool(cuda_graphs)
        self._check_feeds = check_feeds
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        if version_compatible:
            self._runtime.engine_host_code_allowed = True  # the engine brings its own lean runtime's host code
        try:
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        except OSError as error:
            raise BundleError(f"cannot read TensorRT engine {self.path}: {error}") from error
        if self.engine is None:
            raise BundleError(
                f"TensorRT {version} cannot deserialize {self.path} (stage {self.stage.name}); rebuild "
                "it with imagen-export --tensorrt on this machine"
            )
        self._dtypes = {
            trt.DataType.FLOAT: "float32",
            trt.DataType.HALF: "float16",
            trt.DataType.INT32: "int32",
            trt.DataType.INT64: "int64",
            trt.DataType.BOOL: "bool",
        }
        self._check_io(trt.TensorIOMode.INPUT)
        xp = cupy_namespace() if array_namespace is None else array_namespace
        self.array_namespace = NUMPY if xp is None else xp
        self._device_outputs = is_device_namespace(self.array_namespace, self.stage.name)
        self._local, self._lock, self._states, self._closed = threading.local(), threading.Lock(), [], False

    def _check_io(self, input_mode) -> None:
        """BundleError unless the engine's tensors are the signature's, with its dtypes."""
        engine, io = self.engine, {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            io[name] = (engine.get_tensor_mode(name) == input_mode, self._dtypes.get(engine.get_tensor_dtype(name)))
        want = {s.name: (True, s.dtype) for s in self.stage.inputs}
        want |= {s.name: (False, s.dtype) for s in self.stage.outputs}
        if io != want:
            raise BundleError(
                f"{self.path} has tensors {io} (name: (is input, dtype)); its manifest signature "
                f"expects {want}; rebuild it with imagen-export --tensorrt"
            )

    def _call(self, call: str, *args):
        return _cuda(self._cudart, call, *args, where=self.stage.name)

    def _thread_state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is not None and not self._closed:
            return state
        with self._lock:
            if self._closed:
                raise BackendError(f"{self.stage.name}: this TensorRT backend was closed")
            context = self.engine.create_execution_context()
            if context is None:
                raise BackendError(
                    f"{self.stage.name}: TensorRT cannot create an execution context (out of GPU "
                    "memory?); use fewer threads or --backend onnxruntime"
                )
            state = _ThreadState(context, self._call("cudaStreamCreate"))
            self._states.append(state)  # registered first, so that close() frees what follows even if it fails
            for spec in self.stage.inputs + self.stage.outputs:
                shape = spec.concrete(self.stage.batch_max)
                state.buffers[spec.name] = self._call("cudaMalloc", int(np.prod(shape)) * np.dtype(spec.dtype).itemsize)
                if not context.set_tensor_address(spec.name, int(state.buffers[spec.name])):
                    raise BackendError(f"{self.stage.name}: TensorRT refused the address of {spec.name}")
        self._local.state = state
        return state

    def _set_batch(self, state: _ThreadState, batch: int) -> None:
        """Input shapes for `batch`, and a check that the engine's output shapes are the signature's."""
        if state.batch == batch:
            return
        state.batch = None
        for spec in self.stage.inputs:
            if not state.context.set_input_shape(spec.name, spec.concrete(batch)):
                raise BackendError(
                    f"{self.stage.name}: TensorRT rejects {spec.name} of shape "
                    f"{spec.concrete(batch)} (outside the engine's profile?)"
                )
        for spec in self.stage.outputs:
            shape = tuple(state.context.get_tensor_shape(spec.name))
            if shape != spec.concrete(batch):
                raise BundleError(
                    f"{self.path}: output {spec.name} has shape {shape} at batch {batch}, the "
                    f"signature says {spec.concrete(batch)}; rebuild it with imagen-export --tensorrt"
                )
        state.batch = batch

    def run(self, feeds: dict) -> dict:
        batch = self._check_feeds(self.stage, feeds)
        state = self._thread_state()
        sources = self._copy_inputs(state, feeds)
        self._set_batch(state, batch)
        self._execute(state, batch)
        outputs = self._copy_outputs(state, batch)
        self._call("cudaStreamSynchronize", state.stream)
        del sources  # the arrays copied from stay alive until the copies are done
        return outputs

    # Stream order: the backend's streams come from cudaStreamCreate, which makes blocking streams:
    # their work waits for earlier work on the legacy default stream (where CuPy runs unless told
    # otherwise) and the reverse, so copies from or into arrays that a library wrote or allocated
    # there are ordered without waiting. An array whose interface names another stream (a CuPy
    # stream of its own, the per-thread default stream) is waited for on the host first. Each
    # call ends with cudaStreamSynchronize on the backend's stream, so outputs are complete (on
    # every stream) when `run` returns.

    def _copy_inputs(self, state: _ThreadState, feeds: dict) -> list:
        """Enqueues each input's copy into its fixed buffer: host arrays host-to-device, device
        arrays device-to-device. Returns the arrays copied from, to keep alive until the sync."""
        kinds, sources, copies, waits = self._cudart.cudaMemcpyKind, [], [], []
        for spec in self.stage.inputs:
            array = feeds[spec.name]
            if is_device_array(array):
                array = contiguous(array, f"{self.stage.name}: input {spec.name}")
                waits.append(buffer := device_buffer(array))
                copies.append((state.buffers[spec.name], buffer.pointer, buffer.nbytes, kinds.cudaMemcpyDeviceToDevice))
            else:
                array = np.ascontiguousarray(to_numpy(array))
                copies.append((state.buffers[spec.name], array.ctypes.data, array.nbytes, kinds.cudaMemcpyHostToDevice))
            sources.append(array)
        self._copy(state, copies, waits)
        return sources

    def _copy_outputs(self, state: _ThreadState, batch: int) -> dict:
        """Enqueues each output's copy out of its fixed buffer into a new array: of the device
        namespace (device-to-device) or NumPy (device-to-host)."""
        kinds, outputs, copies, waits = self._cudart.cudaMemcpyKind, {}, [], []
        for spec in self.stage.outputs:
            shape = spec.concrete(batch)
            if self._device_outputs:
                array = empty(self.array_namespace, shape, spec.dtype, self.stage.name)
                waits.append(buffer := device_buffer(array))  # the stream its library allocated it on
                copies.append((buffer.pointer, state.buffers[spec.name], buffer.nbytes, kinds.cudaMemcpyDeviceToDevice))
            else:
                array = np.empty(shape, spec.dtype)
                copies.append((array.ctypes.data, state.buffers[spec.name], array.nbytes, kinds.cudaMemcpyDeviceToHost))
            outputs[spec.name] = array
        self._copy(state, copies, waits)
        return outputs

    def _copy(self, state: _ThreadState, copies: list, waits: list) -> None:
        """Waits on the host for the streams that device arrays name (but the legacy default stream,
        see above), then enqueues the copies (destination, source, bytes, kind) on the thread's stream."""
        synchronize = lambda stream: self._call("cudaStreamSynchronize", stream)  # noqa: E731
        wait_for_streams(waits, synchronize, self.stage.name, skip=(LEGACY_STREAM,))
        for destination, source, nbytes, kind in copies:
            self._call("cudaMemcpyAsync", destination, source, nbytes, kind, state.stream)

    def _enqueue(self, state: _ThreadState) -> None:
        if not state.context.execute_async_v3(int(state.stream)):
            raise BackendError(f"{self.stage.name}: TensorRT execution failed (execute_async_v3)")

    def _execute(self, state: _ThreadState, batch: int) -> None:
        """The graph for this batch, if there is one and the last real call ran at this batch too (a
        plain call after a batch change refreshes what TensorRT keeps per shape; graphs replay only
        kernels). Else a plain call, then, the first time at this batch, a capture: the plain call is
        the warm-up, since TensorRT allocates and picks kernels on the first call after a shape change."""
        graph = state.graphs.get(batch)
        if graph is not None and state.enqueued == batch:
            self._call("cudaGraphLaunch", graph, state.stream)
            return
        self._enqueue(state)
        state.enqueued = batch
        if self.cuda_graphs and batch not in state.graphs:
            state.graphs[batch] = self._capture(state, batch)

    def _capture(self, state: _ThreadState, batch: int):
        """An instantiated CUDA graph of one engine call at fixed addresses, or None if capture fails
        (the stream is then back to normal and this batch runs without a graph)."""
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls go on
        error = cudart.cudaStreamBeginCapture(state.stream, mode)[0]
        if int(error) != 0:
            return self._no_graph(batch, f"cudaStreamBeginCapture: CUDA error {int(error)}")
        try:
            recorded = state.context.execute_async_v3(int(state.stream))
        except Exception as failure:  # noqa: BLE001 - whatever TensorRT raises while capturing, run without a graph
            recorded = failure
        error, graph = cudart.cudaStreamEndCapture(state.stream)
        if recorded is not True or int(error) != 0 or graph is None:
            if int(error) == 0 and graph is not None:
                cudart.cudaGraphDestroy(graph)
            return self._no_graph(batch, f"execute_async_v3 gave {recorded!r}, cudaStreamEndCapture error {int(error)}")
        error, instance = cudart.cudaGraphInstantiate(graph, 0)
        cudart.cudaGraphDestroy(graph)
        if int(error) != 0:
            return self._no_graph(batch, f"cudaGraphInstantiate: CUDA error {int(error)}")
        return instance

    def _no_graph(self, batch: int, reason: str) -> None:
        self._cudart.cudaGetLastError()  # a failed capture leaves a (non-sticky) error behind: clear it
        log.warning(
            "%s: CUDA graph capture at batch %d failed (%s); running without a graph", self.stage.name, batch, reason
        )
        return None

    def close(self) -> None:
        """Frees every thread's graphs, buffers and stream, then the engine; later calls raise BackendError.
        Call it when no `run` is in flight. The first CUDA error is raised after everything was tried."""
        with self._lock:
            if self._closed:
                return
            self._closed, states, self._states = True, self._states, []
        errors = []
        for state in states:
            frees = [("cudaGraphExecDestroy", g) for g in state.graphs.values() if g is not None]
            frees += [("cudaFree", pointer) for pointer in state.buffers.values()]
            for call, handle in frees + [("cudaStreamDestroy", state.stream)]:
                try:
                    self._call(call, handle)
                except BackendError as error:
                    errors.append(error)
            state.graphs, state.buffers, state.context = {}, {}, None
        self.engine = self._runtime = None
        if errors:
            raise errors[0]

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
