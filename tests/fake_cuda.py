"""A fake cuda-python runtime (`cuda.bindings.runtime`), for the TensorRT tests without a GPU,
a fake CuPy-like device array library over the same fake device, and a stand-in for an ONNX
Runtime session on the CUDA provider that reads and writes that device's memory.

The fake device keeps memory as bytearrays at integer addresses. Streams queue their work until
cudaStreamSynchronize (a copy from host memory is taken when enqueued, as for pageable memory; a
device-to-device copy reads its source when it runs); a capture records the work into a graph,
which cudaGraphLaunch replays at the addresses captured. A copy whose kind does not match where
its pointers are (a device address read as host memory) fails instead of touching host memory.
Its public names are cuda-python's: tests check them against the list the backend declares
(`CUDART_NAMES`) and against the real cuda-python bindings."""

import ctypes
import enum
import threading
import types
from collections import Counter

import numpy as np


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class Device:
    """What the fake GPU holds and counts; tests set `fail` (cudart calls that return an error, and
    "empty": the fake array library is out of memory), `perturb` (relative error added to engine
    outputs) and `capture_fails` (execute_async_v3 fails while a stream captures)."""

    def __init__(self, driver: bool = True):
        self.driver, self.memory, self.streams, self.graphs = driver, {}, {}, set()
        self.calls, self.fail, self.perturb, self.capture_fails = Counter(), set(), 0.0, False
        self.plans, self.runtimes, self.capture_modes, self._next = [], [], [], 1 << 16
        self.arrays = {}  # address -> bytearray: what the fake array library allocated (not cudaMalloc)
        self.copies = Counter()  # cudaMemcpyAsync calls by kind name
        self.synchronized = []  # the stream handles given to cudaStreamSynchronize, in order
        self._lock = threading.Lock()

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


class _Stream:
    def __init__(self, handle: int):
        self.handle, self.queue, self.capture, self.invalidated = handle, [], None, False

    def __int__(self) -> int:
        return self.handle

    def enqueue(self, work) -> None:
        (self.queue if self.capture is None else self.capture).append(work)


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

    def call(function):
        def wrapper(*args):
            device.calls[function.__name__] += 1
            if function.__name__ in device.fail:
                return cudaError_t.cudaErrorMemoryAllocation, None
            return function(*args)

        wrapper.__name__ = function.__name__
        setattr(cudart, function.__name__, wrapper)
        return wrapper

    ok = cudaError_t.cudaSuccess

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
    def cudaMalloc(nbytes):
        return ok, device.allocate(nbytes)

    @call
    def cudaFree(address):
        return (ok,) if device.memory.pop(address, None) is not None else (cudaError_t.cudaErrorInvalidValue,)

    @call
    def cudaStreamCreate():
        stream = _Stream(device.handle())
        device.streams[stream.handle] = stream
        return ok, stream

    @call
    def cudaStreamDestroy(stream):
        return (ok,) if device.streams.pop(int(stream), None) is not None else (cudaError_t.cudaErrorInvalidValue,)

    @call
    def cudaMemcpyAsync(destination, source, nbytes, kind, stream):
        kinds = cudart.cudaMemcpyKind
        on_device = (device.holds(destination), device.holds(source))
        expected = {kinds.cudaMemcpyHostToDevice: (True, False), kinds.cudaMemcpyDeviceToHost: (False, True)}
        if on_device != expected.get(kind, (True, True)):
            return (cudaError_t.cudaErrorInvalidValue,)  # a real GPU would read or write the wrong memory
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
        if int(stream) in (1, 2):  # the legacy and per-thread default streams: no fake work runs there
            return (ok,)
        stream = device.streams.get(int(stream))
        if stream is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        if stream.capture is not None:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        work, stream.queue = stream.queue, []
        for item in work:
            item()
        return (ok,)

    @call
    def cudaStreamBeginCapture(stream, mode):
        device.capture_modes.append(mode)
        stream.capture, stream.invalidated = [], False
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
            return (cudaError_t.cudaErrorInvalidValue,)
        for item in instance[1]:
            stream.enqueue(item)
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


class DeviceArray:
    """A CuPy-like array in the fake device's memory, as far as the backends see one: shape, dtype,
    ndim, `__cuda_array_interface__` (version 3: pointer, strides, the stream to wait for) and
    `__array_namespace__`; `copy(order="C")` as CuPy has it; `get()` reads it back for tests."""

    def __init__(self, namespace, shape, dtype, address: int, strides=None, stream: int | None = None):
        self.namespace, self.shape, self.dtype = namespace, tuple(shape), np.dtype(dtype)
        self.address, self.strides, self.stream = address, strides, stream

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "version": 3,
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.address, False),
            "strides": self.strides,
            "stream": self.stream,
        }

    def __array_namespace__(self, api_version=None):
        return self.namespace

    def get(self) -> np.ndarray:
        """A host copy, read straight from the fake memory (no CUDA call, no stream)."""
        strides = self.strides or np.empty(self.shape, self.dtype).strides
        extent = sum((n - 1) * s for n, s in zip(self.shape, strides)) + self.dtype.itemsize
        raw = self.namespace.device.view(self.address, extent)
        return np.ndarray(self.shape, self.dtype, buffer=raw, strides=strides).copy()

    def copy(self, order: str = "C") -> "DeviceArray":
        if order != "C":
            raise ValueError("the fake array library copies in C order only")
        return self.namespace.asarray(self.get())


class DeviceNamespace:
    """The array API namespace of DeviceArray, as far as the backends use one (its dtypes and
    `empty`), and `asarray` to put test data on the fake device. Its arrays name `stream` in their
    interface. `asarray(..., pending=stream)` queues the write on a stream from cudaStreamCreate
    instead: the array's producer has not finished until someone synchronizes that stream."""

    __name__ = "fake_cupy"

    def __init__(self, device: Device, stream: int | None = None):
        self.device, self.stream, self.allocations = device, stream, 0
        for name in ("float16", "float32", "int32", "int64", "bool"):
            setattr(self, name, np.dtype(name))

    def empty(self, shape, dtype=None) -> DeviceArray:
        dtype = np.dtype(self.float32 if dtype is None else dtype)
        if "empty" in self.device.fail:
            raise MemoryError("fake device: out of memory")
        self.allocations += 1
        address = self.device.allocate(int(np.prod(shape)) * dtype.itemsize, pool=self.device.arrays)
        return DeviceArray(self, shape, dtype, address, stream=self.stream)

    def asarray(self, array, pending=None) -> DeviceArray:
        host = np.ascontiguousarray(array)
        result = self.empty(host.shape, host.dtype)
        write = lambda: result.namespace.device.view(result.address, host.nbytes).__setitem__(  # noqa: E731
            slice(None), host.tobytes()
        )
        if pending is None:
            write()
        else:
            pending.enqueue(write)
            result.stream = int(pending)
        return result

    def strided(self, array) -> DeviceArray:
        """`array` on the device as a view with Fortran-order strides (not C-contiguous)."""
        host = np.asfortranarray(array)
        flat = self.asarray(host.ravel(order="K"))
        return DeviceArray(self, host.shape, host.dtype, flat.address, strides=host.strides, stream=self.stream)


class NoCopy(DeviceArray):
    """A device array whose library has no copy(order="C")."""

    copy = None


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
