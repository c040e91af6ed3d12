"""Array libraries over the fake device of fake_cuda.py.

`DeviceNamespace` / `DeviceArray`: a CuPy-like library as far as the backends see one (the CUDA Array
Interface, `empty`, `asarray` for test data, writes left pending on a stream), for the backend tests.

`CupyDouble`: a CuPy-faithful double for the sampling loop, a namespace over NumPy (array_api_compat's)
that refuses what CuPy refuses, so that code which only NumPy or array-api-strict accept fails here
as it would on a GPU:
- implicit conversion to a host array: `np.asarray`, `__array__`, NumPy functions on its arrays, and
  NumPy's DLPack import raise (CuPy's TypeError: "Implicit conversion to a NumPy array is not
  allowed"); `get()` is the explicit copy to the host, and is recorded (`downloads`);
- NumPy arrays in its arithmetic and functions (TypeError "Unsupported type"); NumPy scalars and
  Python numbers are fine, and `asarray` of host data is the explicit copy to the device (`uploads`);
- an array as `repeats` in `repeat` (CuPy 13: ValueError "cupy.ndaray cannot be specified as
  `repeats` argument."): an int or a sequence of ints only.
It counts the Python scalars pulled from its arrays (`bool()`, `float()`, `int()`, `.item()`: each a
device-to-host sync on a GPU) in `scalars`. With a fake `Device` its arrays live in that device's
memory and have `__cuda_array_interface__` (the legacy default stream), so the fake TensorRT backend
copies them and returns arrays of the double; without one they have no interface.
"""

import operator
import weakref
from collections import Counter

import numpy as np

from imagen.runtime.arrays import NUMPY

from fake_cuda import LEGACY, Device


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
    interface. `asarray(..., pending=stream)` queues the write on a fake stream instead (the legacy
    default stream, `Device.legacy`, or one from cudaStreamCreateWithFlags): the array's producer has
    not finished until that stream's work runs."""

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


HOST_CONVERSION = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
)
CREATION = ("asarray", "empty", "zeros", "ones", "full", "arange", "linspace", "eye")
CREATION += ("empty_like", "zeros_like", "ones_like", "full_like")
BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor")
COMPARISONS = ("lt", "le", "gt", "ge", "eq", "ne")


class DoubleDevice:
    """The double's one GPU (CuPy's `cupy.cuda.Device(0)`)."""

    def __repr__(self) -> str:
        return "<CUDA Device 0>"


class _Allocation:
    """A block of fake device memory holding one array's bytes (and its views')."""

    def __init__(self, device: Device, nbytes: int):
        self.address = device.allocate(nbytes, pool=device.arrays)
        self.buffer = device.arrays[self.address]
        self.host = np.frombuffer(self.buffer, np.uint8).ctypes.data if nbytes else 0
        self.nbytes = nbytes
        weakref.finalize(self, device.arrays.pop, self.address, None)


class CupyDouble:
    """The namespace: array_api_compat's NumPy functions on the double's arrays (see the module)."""

    __name__ = "cupy_double"

    def __init__(self, device: Device | None = None):
        self.memory, self.device = device, DoubleDevice()
        self.scalars = Counter()  # "bool", "float", "int", "item" -> Python scalars pulled from arrays
        self.downloads, self.uploads = [], 0  # shapes brought to the host with get(); host data brought here
        self._allocations = weakref.WeakValueDictionary()  # host start of a block -> its _Allocation

    def __getattr__(self, name: str):
        value = getattr(NUMPY, name)
        if isinstance(value, type) or not callable(value):
            return value  # dtypes and constants
        wrapper = self._creation(value) if name in CREATION else self._function(value)
        wrapper.__name__ = name
        return wrapper

    def repeat(self, x, repeats, axis=None):
        if not isinstance(repeats, int) and not (
            isinstance(repeats, (list, tuple)) and all(isinstance(r, int) for r in repeats)
        ):
            raise ValueError("cupy.ndaray cannot be specified as `repeats` argument.")
        return self._wrap(NUMPY.repeat(self._unwrap(x), repeats, axis=axis))

    def _creation(self, function):
        def create(*args, device=None, **kwargs):
            if device not in (None, self.device):
                raise ValueError(f"cupy_double: no device {device!r}")
            uploads = any(not isinstance(a, DoubleArray) for a in args[:1]) and function.__name__ == "asarray"
            self.uploads += int(uploads)
            args = tuple(a._data if isinstance(a, DoubleArray) else a for a in args)
            return self._wrap(function(*args, **kwargs))

        return create

    def _function(self, function):
        def call(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if not (k == "device" and v is self.device)}
            return self._wrap(function(*self._unwrap(args), **self._unwrap(kwargs)))

        return call

    def _unwrap(self, value):
        """Arguments for NumPy: the double's arrays as their data; NumPy arrays refused, as CuPy does."""
        if isinstance(value, DoubleArray):
            return value._data
        if isinstance(value, np.ndarray):
            raise TypeError(f"Unsupported type {type(value)}")
        if isinstance(value, (list, tuple)):
            return type(value)(self._unwrap(v) for v in value)
        if isinstance(value, dict):
            return {k: self._unwrap(v) for k, v in value.items()}
        return value

    def _wrap(self, result):
        if isinstance(result, (tuple, list)):
            return type(result)(self._wrap(r) for r in result)
        if isinstance(result, (np.ndarray, np.generic)):
            return self._adopt(np.asarray(result))
        return result

    def _adopt(self, data: np.ndarray) -> "DoubleArray":
        """`data` as an array of the double: a view of a device array stays one (same memory, same
        address), anything else is copied into new device memory (when there is a device)."""
        if self.memory is None:
            return DoubleArray(self, data, None)
        start = data.__array_interface__["data"][0]
        for host, block in list(self._allocations.items()):
            if host <= start < host + block.nbytes:
                return DoubleArray(self, data, block)
        block = _Allocation(self.memory, data.nbytes)
        self._allocations[block.host] = block
        stored = np.frombuffer(block.buffer, data.dtype, count=data.size).reshape(data.shape)
        stored[...] = data
        return DoubleArray(self, stored, block)


class DoubleArray:
    """An array of CupyDouble: NumPy data, CuPy's refusals (see the module)."""

    __array_ufunc__ = None  # NumPy's operators and ufuncs step aside: NumPy arrays then meet _operand

    def __init__(self, xp: CupyDouble, data: np.ndarray, block: _Allocation | None):
        self._xp, self._data, self._block = xp, data, block

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    device = property(lambda self: self._xp.device)
    T = property(lambda self: self._xp._wrap(self._data.T))

    def __array_namespace__(self, api_version=None):
        return self._xp

    def __array__(self, dtype=None, copy=None):
        raise TypeError(HOST_CONVERSION)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, **kwargs):
        raise BufferError("cupy_double: the array is in GPU memory; NumPy cannot import it through DLPack")

    @property
    def __cuda_array_interface__(self) -> dict:
        if self._block is None:
            raise AttributeError("__cuda_array_interface__")  # no fake device: nothing a backend could read
        data = self._data
        address = self._block.address + data.__array_interface__["data"][0] - self._block.host
        strides = None if data.flags.c_contiguous else data.strides
        shape, typestr = data.shape, data.dtype.str
        return {
            "version": 3,
            "shape": shape,
            "typestr": typestr,
            "data": (address, False),
            "strides": strides,
            "stream": LEGACY,
        }

    def get(self) -> np.ndarray:
        """The explicit copy to the host."""
        self._xp.downloads.append(self.shape)
        return self._data.copy()

    def copy(self, order: str = "C") -> "DoubleArray":
        return self._xp._wrap(np.array(self._data, order=order, copy=True))

    def astype(self, dtype, copy: bool = True) -> "DoubleArray":
        return self._xp._wrap(self._data.astype(dtype, copy=copy))

    def reshape(self, *shape) -> "DoubleArray":
        return self._xp._wrap(self._data.reshape(*shape))

    def _scalar(self, kind: str, convert):
        self._xp.scalars[kind] += 1
        return convert(self._data)

    def __bool__(self) -> bool:
        return self._scalar("bool", bool)

    def __float__(self) -> float:
        return self._scalar("float", float)

    def __int__(self) -> int:
        return self._scalar("int", int)

    def __index__(self) -> int:
        return self._scalar("int", operator.index)

    def item(self):
        return self._scalar("item", lambda data: data.item())

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self):
        return (self._xp._wrap(row) for row in self._data)

    def __getitem__(self, key):
        return self._xp._wrap(self._data[self._xp._unwrap(key)])

    def __setitem__(self, key, value) -> None:
        self._data[self._xp._unwrap(key)] = self._operand(value)

    def __repr__(self) -> str:
        return f"cupy_double.array(shape={self.shape}, dtype={self.dtype})"

    def _operand(self, other):
        if isinstance(other, DoubleArray):
            return other._data
        if isinstance(other, (bool, int, float, complex, np.generic)):
            return other
        raise TypeError(f"Unsupported type {type(other)}")  # NumPy arrays, lists, ...

    __hash__ = None


def _binary(name: str, reflected: bool):
    function = getattr(operator, f"{name}_" if name in ("and", "or") else name)

    def method(self, other):
        other = self._operand(other)
        return self._xp._wrap(function(other, self._data) if reflected else function(self._data, other))

    return method


for _name in BINARY + COMPARISONS:
    setattr(DoubleArray, f"__{_name}__", _binary(_name, reflected=False))
    if _name in BINARY:
        setattr(DoubleArray, f"__r{_name}__", _binary(_name, reflected=True))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(DoubleArray, f"__{_name}__", lambda self, f=getattr(operator, _name): self._xp._wrap(f(self._data)))
