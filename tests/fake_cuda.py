"""A fake cuda-python runtime (`cuda.bindings.runtime`), for the TensorRT tests without a GPU.

The fake device keeps memory as bytearrays at integer addresses. Streams queue their work until
cudaStreamSynchronize (a copy from host memory is taken when enqueued, as for pageable memory); a
capture records the work into a graph, which cudaGraphLaunch replays at the addresses captured.
Its public names are cuda-python's: tests check them against the list the backend declares
(`CUDART_NAMES`)."""

import ctypes
import enum
import types
from collections import Counter


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class Device:
    """What the fake GPU holds and counts; tests set `fail` (cudart calls that return an error),
    `perturb` (relative error added to engine outputs) and `capture_fails` (execute_async_v3 fails
    while a stream captures)."""

    def __init__(self, driver: bool = True):
        self.driver, self.memory, self.streams, self.graphs = driver, {}, {}, set()
        self.calls, self.fail, self.perturb, self.capture_fails = Counter(), set(), 0.0, False
        self.plans, self.runtimes, self.capture_modes, self._next = [], [], [], 1 << 16

    def handle(self, nbytes: int = 0) -> int:
        """A number never handed out before (an address or a stream handle)."""
        number, self._next = self._next, self._next + max(nbytes, 1) + 4096
        return number

    def allocate(self, nbytes: int) -> int:
        address = self.handle(nbytes)
        self.memory[address] = bytearray(nbytes)
        return address

    def view(self, address: int, nbytes: int) -> memoryview:
        if address not in self.memory or nbytes > len(self.memory[address]):
            raise RuntimeError(f"fake device: {nbytes} bytes at {address} are not an allocation")
        return memoryview(self.memory[address])[:nbytes]


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
    cudart.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
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
        if kind == cudart.cudaMemcpyKind.cudaMemcpyHostToDevice:
            data = ctypes.string_at(source, nbytes)
            device.view(destination, nbytes)
            stream.enqueue(lambda: device.view(destination, nbytes).__setitem__(slice(None), data))
        else:
            device.view(source, nbytes)
            stream.enqueue(lambda: ctypes.memmove(destination, bytes(device.view(source, nbytes)), nbytes))
        return (ok,)

    @call
    def cudaStreamSynchronize(stream):
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
