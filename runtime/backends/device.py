"""Device arrays at the backends' edges: CuPy arrays, torch CUDA tensors, Numba device arrays.

A backend whose `array_namespace` is a device namespace (CuPy's, from array_api_compat) takes and
returns device arrays, so the sampling loop's arrays stay on the GPU between stage calls. Device
arrays are recognised by the CUDA Array Interface (`__cuda_array_interface__`, version 3, in
Numba's documentation: "CUDA Array Interface"), which gives their pointer, shape, type, strides
and the stream that may still be writing them (1: the legacy default stream, 2: the per-thread
default stream, another number: a cudaStream_t; none: nothing to wait for). CuPy is imported only
when it is used.
"""

from dataclasses import dataclass

import array_api_compat
import numpy as np

from ..errors import BackendError, SignatureError


@dataclass(frozen=True)
class DeviceBuffer:
    """A C-contiguous device array's bytes, and the stream to wait for before touching them."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: int | None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def is_device_array(array) -> bool:
    return getattr(array, "__cuda_array_interface__", None) is not None


def _is_c_contiguous(interface: dict) -> bool:
    strides = interface.get("strides")
    if strides is None:
        return True
    step = np.dtype(interface["typestr"]).itemsize
    for size, stride in zip(reversed(interface["shape"]), reversed(strides), strict=True):
        if size > 1 and stride != step:
            return False
        step *= size
    return True


def contiguous(array, where: str):
    """`array`, or a C-contiguous copy made by its own library (`copy(order="C")`, as NumPy and CuPy
    have) when its strides are not C order (a broadcast or transposed view); SignatureError if neither."""
    if _is_c_contiguous(array.__cuda_array_interface__):
        return array
    copy = getattr(array, "copy", None)
    try:
        copied = copy(order="C") if copy is not None else None
    except TypeError:  # a copy() without an order
        copied = None
    if copied is None or not _is_c_contiguous(copied.__cuda_array_interface__):
        raise SignatureError(
            f"{where} is a device array whose strides are not C order, and it has no copy(order='C'); "
            "pass a C-contiguous array (cupy.ascontiguousarray)"
        )
    return copied


def device_buffer(array) -> DeviceBuffer:
    """The buffer of a C-contiguous device array (see `contiguous`)."""
    interface = array.__cuda_array_interface__
    stream = interface.get("stream")  # version 3; older versions have none
    return DeviceBuffer(
        int(interface["data"][0]),
        tuple(int(d) for d in interface["shape"]),
        np.dtype(interface["typestr"]),
        None if stream is None else int(stream),
    )


def cupy_namespace():
    """CuPy's array API namespace (array_api_compat.cupy) when CuPy can be imported, else None."""
    try:
        import array_api_compat.cupy as xp
    except (ImportError, OSError, RuntimeError):  # not installed, or no CUDA libraries for it
        return None
    return xp


def namespace_name(xp) -> str:
    return getattr(xp, "__name__", type(xp).__name__)


def is_device_namespace(xp, where: str) -> bool:
    """False for NumPy; True for a namespace whose arrays have `__cuda_array_interface__` (checked on
    a one-element array); BackendError for any other namespace."""
    if xp is None or array_api_compat.is_numpy_namespace(xp):
        return False
    probe = empty(xp, (1,), "float32", where)
    if not is_device_array(probe):
        raise BackendError(
            f"{where}: array_namespace {namespace_name(xp)} gives arrays without __cuda_array_interface__; "
            "use NumPy or a CUDA array library (CuPy: pip install 'imagen-cascade[cuda]')"
        )
    return True


def empty(xp, shape: tuple[int, ...], dtype: str, where: str):
    """A new array of namespace `xp`; BackendError when it cannot be allocated (out of GPU memory)."""
    try:
        return xp.empty(shape, dtype=getattr(xp, dtype))
    except Exception as error:  # noqa: BLE001 - each library raises its own out-of-memory type
        raise BackendError(f"{where}: cannot allocate a {dtype} array of shape {list(shape)}: {error}") from error


def named_streams(buffers) -> list[int]:
    """The streams that `buffers` name, each once, in order."""
    return list(dict.fromkeys(b.stream for b in buffers if b.stream is not None))


def wait_for_streams(buffers, synchronize, where: str) -> None:
    """Blocks until every stream that `buffers` name has done its work, with `synchronize(handle)`;
    BackendError naming the stream if that fails."""
    for stream in named_streams(buffers):
        try:
            synchronize(stream)
        except BackendError:
            raise
        except Exception as error:  # noqa: BLE001 - the CUDA library's own error types
            raise BackendError(f"{where}: cannot wait for CUDA stream {stream}: {error}") from error


def cupy_synchronize(stream: int) -> None:
    """Waits for a CUDA stream, given as the Array Interface gives it, with CuPy's runtime bindings."""
    try:
        import cupy
    except ImportError as error:
        raise BackendError(
            f"a device array names CUDA stream {stream} to wait for, and CuPy, which waits for it, is not "
            "installed (pip install 'imagen-cascade[cuda]')"
        ) from error
    cupy.cuda.runtime.streamSynchronize(stream)
