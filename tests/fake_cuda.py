"""A fake cuda-python runtime (`cuda.bindings.runtime`), for the TensorRT tests without a GPU, and
a stand-in for an ONNX Runtime session on the CUDA provider that reads and writes that device's
memory (fake_cupy.py holds the array libraries over the same fake device).

The fake device keeps memory as bytearrays at integer addresses. Streams queue their work until
cudaStreamSynchronize (a copy from host memory is taken when enqueued, as for pageable memory; a
device-to-device copy reads its source when it runs); a capture records the work into a graph,
which cudaGraphLaunch replays at the addresses captured. A copy whose kind does not match where
its pointers are (a device address read as host memory) fails instead of touching host memory.

It refuses what CUDA refuses, where this project's code could get it wrong:
- streams: the legacy default stream (handle 0 or 1) is a stream of its own whose work runs when it
  is synchronized, or before later work of a blocking stream (cudaStreamCreate: blocking streams wait
  for the legacy stream's earlier work). Non-blocking streams (cudaStreamCreateWithFlags(
  cudaStreamNonBlocking)) do not: their work is ordered after another stream's only by an event
  (cudaEventRecord there, cudaStreamWaitEvent here);
- capture: work on the legacy default stream, from any thread, while a blocking stream captures
  fails with cudaErrorStreamCaptureImplicit and invalidates that capture (CUDA's implicit
  synchronization with the legacy stream cannot be captured); `Device.on_capture` runs when a capture
  begins, to stand in for another thread's work at that moment.
Its public names are cuda-python's: tests check them against the real cuda-python bindings."""

import ctypes
import enum
import threading
import types
from collections import Counter

import numpy as np

LEGACY, PER_THREAD = 1, 2  # the CUDA Array Interface's handles of the default streams (0 is the legacy one too)


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureImplicit = 906


class Device:
    """What the fake GPU holds and counts; tests set `fail` (cudart calls that return an error, and
    "empty": the fake array library is out of memory), `perturb` (relative error added to engine
    outputs), `capture_fails` (execute_async_v3 fails while a stream captures) and `on_capture`
    (called when a capture begins). `driver`: whether cudaGetDeviceCount finds the GPU (else CUDA
    error 35); `driver_version` is what cudaDriverGetVersion gives (None: 13.0 with a driver, 0, "none
    installed", without), `runtime_version` what cudaRuntimeGetVersion gives."""

    def __init__(self, driver: bool = True, driver_version: int | None = None, runtime_version: int = 13000):
        self.driver, self.memory, self.streams, self.graphs = driver, {}, {}, set()
        self.driver_version = (13000 if driver else 0) if driver_version is None else driver_version
        self.runtime_version = runtime_version
        self.calls, self.fail, self.perturb, self.capture_fails = Counter(), set(), 0.0, False
        self.plans, self.runtimes, self.capture_modes, self._next = [], [], [], 1 << 16
        self.arrays = {}  # address -> bytearray: what the fake array library allocated (not cudaMalloc)
        self.copies = Counter()  # cudaMemcpyAsync calls by kind name
        self.synchronized = []  # the stream handles given to cudaStreamSynchronize, in order
        self.events, self.on_capture = {}, None
        self._lock = threading.Lock()
        for handle in (LEGACY, PER_THREAD):
            self.streams[handle] = _Stream(self, handle, flags=0)

    @property
    def legacy(self) -> "_Stream":
        return self.streams[LEGACY]

    def handle(self, nbytes: int = 0) -> int:
        """A number never handed out before (an address or a stream handle)."""
        with self._lock:
            number, self._next = self._next, self._next + max(nbytes, 1) + 4096
        return number

    def allocate(self, nbytes: int, pool: dict | None = None) -> int:
        address = self.handle(nbytes)
        (self.memory if pool is None else pool)[address] = bytearray(nbytes)
        return address

    def holds(self, address: int) -> bool:
        """Whether `address` is inside fake device memory (cudaMalloc'd or an array's)."""
        return any(
            base <= address < base + len(data)
            for pool in (self.memory, self.arrays)
            for base, data in list(pool.items())
        )

    def view(self, address: int, nbytes: int) -> memoryview:
        """The bytes [address, address + nbytes) of one allocation (an address inside it is fine, as
        for a view of a device array)."""
        for pool in (self.memory, self.arrays):
            for base, data in list(pool.items()):
                if base <= address and address + nbytes <= base + len(data):
                    return memoryview(data)[address - base : address - base + nbytes]
        raise RuntimeError(f"fake device: {nbytes} bytes at {address} are not inside an allocation")

    def stream(self, handle) -> "_Stream | None":
        handle = int(handle)
        return self.streams.get(LEGACY if handle == 0 else handle)

    def legacy_use(self) -> bool:
        """Work on the legacy default stream now: False (and the captures invalidated) while a
        blocking stream captures, as CUDA refuses it then (cudaErrorStreamCaptureImplicit)."""
        capturing = [s for s in list(self.streams.values()) if s.capture is not None and s.flags == 0]
        for stream in capturing:
            stream.invalidated = True
        return not capturing


class _Work:
    """One item of a stream's work; it runs once, from whichever stream gets to it first."""

    def __init__(self, function):
        self.function, self.done = function, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.function()


class _Stream:
    def __init__(self, device: Device, handle: int, flags: int):
        self.device, self.handle, self.flags = device, handle, flags
        self.queue, self.capture, self.invalidated = [], None, False

    def __int__(self) -> int:
        return self.handle

    def enqueue(self, work) -> None:
        if self.capture is not None:
            self.capture.append(work)
            return
        if self.flags == 0 and self.handle not in (LEGACY, PER_THREAD):  # a blocking stream: after the legacy one
            earlier = list(self.device.legacy.queue)
            self.queue.append(_Work(lambda: [item() for item in earlier]))
        self.queue.append(work if isinstance(work, _Work) else _Work(work))

    def run(self) -> None:
        work, self.queue = self.queue, []
        for item in work:
            item()


def make_cudart(device: Device) -> types.ModuleType:
    """cuda.bindings.runtime over `device`: every call returns (error, *values)."""
    cudart = types.ModuleType("cuda.bindings.runtime")
    cudart.cudaMemcpyKind = enum.IntEnum(  # the real values
        "cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2, "cudaMemcpyDeviceToDevice": 3}
    )
    cudart.cudaStreamCaptureMode = enum.IntEnum(
        "cudaStreamCaptureMode",
        {"cudaStreamCaptureModeGlobal": 0, "cudaStreamCaptureModeThreadLocal": 1, "cudaStreamCaptureModeRelaxed": 2},
    )
    cudart.cudaStreamNonBlocking, cudart.cudaEventDisableTiming = 1, 2  # the real values

    def call(function):
        def wrapper(*args):
            device.calls[function.__name__] += 1
            if function.__name__ in device.fail:
                return cudaError_t.cudaErrorMemoryAllocation, None
            return function(*args)

        wrapper.__name__ = function.__name__
        setattr(cudart, function.__name__, wrapper)
        return wrapper

    ok, invalid = cudaError_t.cudaSuccess, cudaError_t.cudaErrorInvalidValue
    implicit = cudaError_t.cudaErrorStreamCaptureImplicit

    def legacy_refused(stream) -> bool:
        """Whether this work on `stream` is on the legacy default stream while CUDA refuses that."""
        return int(stream) in (0, LEGACY) and not device.legacy_use()

    @call
    def cudaGetDeviceCount():
        return (ok, 1) if device.driver else (cudaError_t.cudaErrorInsufficientDriver, None)

    @call
    def cudaGetDevice():
        return ok, 0

    @call
    def cudaGetDeviceProperties(index):
        return ok, types.SimpleNamespace(major=9, minor=0, name=b"Fake GPU 80GB\0\0\0")

    @call
    def cudaDriverGetVersion():
        return ok, device.driver_version

    @call
    def cudaRuntimeGetVersion():
        return ok, device.runtime_version

    @call
    def cudaMalloc(nbytes):
        return ok, device.allocate(nbytes)

    @call
    def cudaFree(address):
        return (ok,) if device.memory.pop(address, None) is not None else (invalid,)

    def create(flags):
        stream = _Stream(device, device.handle(), flags)
        device.streams[stream.handle] = stream
        return ok, stream

    @call
    def cudaStreamCreate():
        return create(0)

    @call
    def cudaStreamCreateWithFlags(flags):
        return create(int(flags))

    @call
    def cudaStreamDestroy(stream):
        if int(stream) in (0, LEGACY, PER_THREAD):
            return (invalid,)
        return (ok,) if device.streams.pop(int(stream), None) is not None else (invalid,)

    @call
    def cudaEventCreateWithFlags(flags):
        event = device.handle()
        device.events[event] = []
        return ok, event

    @call
    def cudaEventRecord(event, stream):
        if legacy_refused(stream):
            return (implicit,)
        source = device.stream(stream)
        if event not in device.events or source is None:
            return (invalid,)
        device.events[event] = list(source.queue if source.capture is None else source.capture)
        return (ok,)

    @call
    def cudaStreamWaitEvent(stream, event, flags):
        if legacy_refused(stream):
            return (implicit,)
        target = device.stream(stream)
        if event not in device.events or target is None:
            return (invalid,)
        earlier = device.events[event]
        target.enqueue(lambda: [item() for item in earlier])
        return (ok,)

    @call
    def cudaEventDestroy(event):
        return (ok,) if device.events.pop(event, None) is not None else (invalid,)

    @call
    def cudaMemcpyAsync(destination, source, nbytes, kind, stream):
        kinds = cudart.cudaMemcpyKind
        on_device = (device.holds(destination), device.holds(source))
        expected = {kinds.cudaMemcpyHostToDevice: (True, False), kinds.cudaMemcpyDeviceToHost: (False, True)}
        if on_device != expected.get(kind, (True, True)):
            return (invalid,)  # a real GPU would read or write the wrong memory
        if legacy_refused(stream):
            return (implicit,)
        stream = device.stream(stream)
        if stream is None:
            return (invalid,)
        device.copies[kinds(kind).name] += 1
        if kind == kinds.cudaMemcpyHostToDevice:
            data = ctypes.string_at(source, nbytes)
            device.view(destination, nbytes)
            stream.enqueue(lambda: device.view(destination, nbytes).__setitem__(slice(None), data))
        elif kind == kinds.cudaMemcpyDeviceToHost:
            device.view(source, nbytes)
            stream.enqueue(lambda: ctypes.memmove(destination, bytes(device.view(source, nbytes)), nbytes))
        else:
            device.view(source, nbytes)
            device.view(destination, nbytes)
            stream.enqueue(
                lambda: device.view(destination, nbytes).__setitem__(slice(None), device.view(source, nbytes))
            )
        return (ok,)

    @call
    def cudaStreamSynchronize(stream):
        device.synchronized.append(int(stream))
        if legacy_refused(stream):
            return (implicit,)
        stream = device.stream(stream)
        if stream is None:
            return (invalid,)
        if stream.capture is not None:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        stream.run()
        return (ok,)

    @call
    def cudaStreamBeginCapture(stream, mode):
        device.capture_modes.append(mode)
        stream.capture, stream.invalidated = [], False
        if device.on_capture is not None:
            device.on_capture()
        return (ok,)

    @call
    def cudaStreamEndCapture(stream):
        work, stream.capture = stream.capture, None
        if work is None or stream.invalidated:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        return ok, ("graph", tuple(work))

    @call
    def cudaGraphInstantiate(graph, flags):
        instance = ("exec", graph[1], len(device.graphs))
        device.graphs.add(instance)
        return ok, instance

    @call
    def cudaGraphLaunch(instance, stream):
        if instance not in device.graphs:
            return (invalid,)
        for item in instance[1]:  # a replay runs the captured work again
            stream.enqueue(_Work(item.function if isinstance(item, _Work) else item))
        return (ok,)

    @call
    def cudaGraphDestroy(graph):
        return (ok,)

    @call
    def cudaGraphExecDestroy(instance):
        device.graphs.discard(instance)
        return (ok,)

    @call
    def cudaGetLastError():
        return (ok,)

    return cudart


# ONNX Runtime on the fake device


class Binding:
    """What an IOBinding is given: name -> (device type, device id, element type, shape, pointer)."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.inputs[name] = (device_type, device_id, np.dtype(element_type), tuple(shape), buffer_ptr)

    def bind_output(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.outputs[name] = (device_type, device_id, np.dtype(element_type), tuple(shape), buffer_ptr)


class CudaSession:
    """Stands in for an onnxruntime session on the CUDA provider: what a binding names as "cuda" is
    read from and written to the fake device's memory, "cpu" host memory, and the ONNX file runs on
    the CPU in between (`session`: a real onnxruntime session of that file, on the CPU)."""

    def __init__(self, device: Device, session):
        self.device, self.bindings, self.fail, self.real = device, [], False, session

    def get_inputs(self):
        return self.real.get_inputs()

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self):
        self.bindings.append(Binding())
        return self.bindings[-1]

    def _memory(self, device_type, dtype, shape, pointer) -> memoryview:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if device_type == "cuda":
            return self.device.view(pointer, nbytes)
        return memoryview((ctypes.c_char * nbytes).from_address(pointer)).cast("B")

    def run_with_iobinding(self, binding):
        if self.fail:
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")
        feeds = {
            name: np.frombuffer(self._memory(kind, dtype, shape, pointer), dtype).reshape(shape).copy()
            for name, (kind, _, dtype, shape, pointer) in binding.inputs.items()
        }
        for name, value in zip(binding.outputs, self.real.run(list(binding.outputs), feeds), strict=True):
            kind, _, dtype, shape, pointer = binding.outputs[name]
            if (value.dtype, value.shape) != (dtype, shape):
                raise RuntimeError(f"{name} is bound as {dtype} {shape}, the model gives {value.dtype} {value.shape}")
            self._memory(kind, dtype, shape, pointer)[:] = value.tobytes()
