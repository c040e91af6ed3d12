"""Native TensorRT engines (`imagen-export --tensorrt`) as a stage backend: this package's `Engine`,
as TensorRT's demo/Diffusion keeps one (load, activate device memory, allocate buffers, infer).

Per thread: one non-blocking CUDA stream, one event, one activation block (the engine's
`device_memory_size_v2`, enough for its largest shapes) and one device buffer per input and output
sized for the stage's largest batch, so their addresses never change. Per thread and batch size:
one execution context (`USER_MANAGED`, on the thread's activation block: a thread's contexts run one
after another on its stream, so they share it, as demo/Diffusion's contexts share one block) whose
input shapes are set once, and one CUDA graph captured on it. A context is never changed after its
graph was captured: TensorRT's guide calls that undefined behaviour. The graph is captured after a
warm-up call that has finished (the stream is synchronized first, as trtexec does): TensorRT
allocates and picks kernels on the first call at a shape. A failed capture falls back to plain
`execute_async_v3` for that batch size.

Inputs may be NumPy arrays (copied host-to-device) or device arrays (`__cuda_array_interface__`:
CuPy, torch, Numba; copied device-to-device). A device array given again, as the same object at the
same address, for an input outside STEP_INPUTS (the Unet's conditioning, which GuidedDenoiser feeds
unchanged at every step) is still in its buffer and is not copied again: do not write into such an
array in place between calls. Outputs are arrays of `array_namespace`: NumPy (copied device-to-host),
or with a device namespace (CuPy's, when CuPy is installed) new device arrays filled device-to-device,
never views of the reused buffers.

Stream order: the streams are non-blocking, so they never wait for the legacy default stream, and a
capture on one does not stop other threads from using it. Work on the streams that device arrays
name (the legacy default stream where CuPy runs unless told otherwise, the per-thread default
stream, a stream of their own) is ordered before the copies from or into them with an event
(cudaEventRecord there, cudaStreamWaitEvent here), without waiting on the host. Each call ends with
cudaStreamSynchronize on the thread's stream, so outputs are complete when `run` returns.
"""

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..arrays import NUMPY, to_numpy
from ..contract import StageSignature, TensorRTEntry
from ..errors import BackendError, BundleError
from .cuda import check_engines_match, cuda_call, is_lean, tensorrt_environment
from .device import (
    contiguous,
    cupy_namespace,
    device_buffer,
    empty,
    is_device_array,
    is_device_namespace,
    named_streams,
)
from .feeds import STEP_INPUTS, check_feeds

log = logging.getLogger(__name__)


@dataclass
class _Context:
    """One execution context, its input shapes set for one batch, and the graph captured on it."""

    context: object
    graph: object = None  # an instantiated CUDA graph, or None: run without one
    tried: bool = False  # whether a capture was tried (a failed one is not tried again)


@dataclass
class _ThreadState:
    """One thread's stream, event, activation block, buffers (fixed addresses, sized for batch_max)
    and contexts (one per batch size)."""

    stream: object
    event: object = None
    activations: int | None = None
    buffers: dict = field(default_factory=dict)  # tensor name -> device pointer
    contexts: dict = field(default_factory=dict)  # batch -> _Context
    held: dict = field(default_factory=dict)  # input name -> (device array, pointer) its buffer holds


class TensorRTBackend:
    """A deserialized TensorRT engine for one stage; `run` is safe to call from several threads.

    cuda_graphs: replay one captured CUDA graph per batch size (False: `execute_async_v3` every call).
    version_compatible: allow the engine's host code (version-compatible engines), taken from
    `engines` when given. array_namespace: of the outputs (None: CuPy's when CuPy is installed, else
    NumPy). `close()` frees the device memory, graphs, events and streams of every thread."""

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
        trt, self._cudart, capability, version = tensorrt_environment()
        if engines is not None:
            check_engines_match(engines, capability, version, lean=is_lean(trt))
            version_compatible = engines.version_compatible
        self.stage, self.path, self.cuda_graphs = stage_signature, Path(plan_path), bool(cuda_graphs)
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        if version_compatible:
            self._runtime.engine_host_code_allowed = True  # the plan holds host code for its lean runtime
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
        self._user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._activation_bytes = int(self.engine.device_memory_size_v2)  # for the profile's largest shapes
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
        return cuda_call(self._cudart, call, *args, where=self.stage.name)

    def run(self, feeds: dict) -> dict:
        batch = check_feeds(self.stage, feeds)
        state = self._thread_state()
        try:
            sources = self._copy_inputs(state, feeds)
            entry = self._context(state, batch)
            self._execute(state, entry, batch)
            outputs = self._copy_outputs(state, batch)
            self._call("cudaStreamSynchronize", state.stream)
        except BaseException:
            state.held.clear()  # what the buffers hold is not known after a failure
            raise
        del sources  # the arrays copied from stay alive until the copies are done
        return outputs

    def _thread_state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is not None and not self._closed:
            return state
        with self._lock:
            if self._closed:
                raise BackendError(f"{self.stage.name}: this TensorRT backend was closed")
            cudart = self._cudart
            state = _ThreadState(self._call("cudaStreamCreateWithFlags", cudart.cudaStreamNonBlocking))
            self._states.append(state)  # registered first, so that close() frees what follows even if it fails
            state.event = self._call("cudaEventCreateWithFlags", cudart.cudaEventDisableTiming)
            state.activations = self._call("cudaMalloc", max(self._activation_bytes, 1))
            for spec in self.stage.inputs + self.stage.outputs:
                nbytes = int(np.prod(spec.concrete(self.stage.batch_max))) * np.dtype(spec.dtype).itemsize
                state.buffers[spec.name] = self._call("cudaMalloc", nbytes)
        self._local.state = state
        return state

    def _context(self, state: _ThreadState, batch: int) -> _Context:
        """The thread's context for `batch`: made on first use, on the thread's activation block and
        buffers, its input shapes set for `batch` and never changed again."""
        entry = state.contexts.get(batch)
        if entry is not None:
            return entry
        context = self.engine.create_execution_context(self._user_managed)
        if context is None:
            raise BackendError(
                f"{self.stage.name}: TensorRT cannot create an execution context (out of memory?); use "
                "fewer threads or --backend onnxruntime"
            )
        context.set_device_memory(int(state.activations), self._activation_bytes)
        for name, pointer in state.buffers.items():
            if not context.set_tensor_address(name, int(pointer)):
                raise BackendError(f"{self.stage.name}: TensorRT refused the address of {name}")
        for spec in self.stage.inputs:
            if not context.set_input_shape(spec.name, spec.concrete(batch)):
                raise BackendError(
                    f"{self.stage.name}: TensorRT rejects {spec.name} of shape "
                    f"{spec.concrete(batch)} (outside the engine's profile?)"
                )
        for spec in self.stage.outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            if shape != spec.concrete(batch):
                raise BundleError(
                    f"{self.path}: output {spec.name} has shape {shape} at batch {batch}, the "
                    f"signature says {spec.concrete(batch)}; rebuild it with imagen-export --tensorrt"
                )
        entry = state.contexts[batch] = _Context(context)
        return entry

    def _copy_inputs(self, state: _ThreadState, feeds: dict) -> list:
        """Enqueues each input's copy into its fixed buffer: host arrays host-to-device, device
        arrays device-to-device, but a constant input that the buffer already holds (see above).
        Returns the arrays copied from, to keep alive until the sync."""
        kinds, sources, copies, waits = self._cudart.cudaMemcpyKind, [], [], []
        for spec in self.stage.inputs:
            array, target = feeds[spec.name], state.buffers[spec.name]
            if not is_device_array(array):
                state.held.pop(spec.name, None)
                array = np.ascontiguousarray(to_numpy(array))
                copies.append((target, array.ctypes.data, array.nbytes, kinds.cudaMemcpyHostToDevice))
                sources.append(array)
                continue
            given = array
            array = contiguous(array, f"{self.stage.name}: input {spec.name}")
            buffer = device_buffer(array)
            held = state.held.pop(spec.name, None)
            if held is not None and held[0] is given and held[1] == buffer.pointer:
                state.held[spec.name] = held
                continue
            waits.append(buffer)
            copies.append((target, buffer.pointer, buffer.nbytes, kinds.cudaMemcpyDeviceToDevice))
            sources.append(array)
            if spec.name not in STEP_INPUTS and given is array:
                state.held[spec.name] = (given, buffer.pointer)
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
        """Orders the thread's stream after the streams that device arrays name (an event recorded
        there, waited for here), then enqueues the copies (destination, source, bytes, kind) on it."""
        for stream in named_streams(waits):
            self._call("cudaEventRecord", state.event, stream)
            self._call("cudaStreamWaitEvent", state.stream, state.event, 0)
        for destination, source, nbytes, kind in copies:
            self._call("cudaMemcpyAsync", destination, source, nbytes, kind, state.stream)

    def _execute(self, state: _ThreadState, entry: _Context, batch: int) -> None:
        """The context's graph if it has one; else a plain call, then, the first time, a capture (the
        plain call being the warm-up)."""
        if entry.graph is not None:
            self._call("cudaGraphLaunch", entry.graph, state.stream)
            return
        context = entry.context
        if not context.execute_async_v3(int(state.stream)):
            raise BackendError(f"{self.stage.name}: TensorRT execution failed (execute_async_v3)")
        if self.cuda_graphs and not entry.tried:
            entry.tried = True
            self._call("cudaStreamSynchronize", state.stream)  # the warm-up has run, as trtexec waits for it
            entry.graph = self._capture(state, context, batch)

    def _capture(self, state: _ThreadState, context, batch: int):
        """An instantiated CUDA graph of one engine call at fixed addresses, or None if capture fails
        (the stream is then back to normal and this batch runs without a graph)."""
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls go on
        error = cudart.cudaStreamBeginCapture(state.stream, mode)[0]
        if int(error) != 0:
            return self._no_graph(batch, f"cudaStreamBeginCapture: CUDA error {int(error)}")
        try:
            recorded = context.execute_async_v3(int(state.stream))
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
        """Frees every thread's graphs, contexts, buffers, activation block, event and stream, then the
        engine; later calls raise BackendError. Call it when no `run` is in flight. The first CUDA
        error is raised after everything was tried."""
        with self._lock:
            if self._closed:
                return
            self._closed, states, self._states = True, self._states, []
        errors = []
        for state in states:
            frees = [("cudaGraphExecDestroy", e.graph) for e in state.contexts.values() if e.graph is not None]
            state.contexts, state.held = {}, {}  # the contexts go before the memory they run on
            frees += [("cudaFree", pointer) for pointer in state.buffers.values()]
            frees += [("cudaFree", state.activations)] if state.activations is not None else []
            frees += [("cudaEventDestroy", state.event)] if state.event is not None else []
            for call, handle in frees + [("cudaStreamDestroy", state.stream)]:
                try:
                    self._call(call, handle)
                except BackendError as error:
                    errors.append(error)
            state.buffers, state.activations, state.event = {}, None, None
        self.engine = self._runtime = None
        if errors:
            raise errors[0]

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
