"""Array namespaces for the sampling loop (the Python array API standard).

The loop's arithmetic (samplers, guidance, dynamic thresholding, resize, quantization) is written
once against a namespace `xp`: NumPy on the CPU, CuPy on a GPU, array-api-strict in the tests.
A backend names the namespace its arrays live in with an `array_namespace` attribute (NumPy when
it has none) and their device with `array_device` (the namespace's default device when it has
none). The pipeline moves tokens and noise there (the noise is drawn on the host with NumPy, so a
seed gives the same numbers on every backend) and brings back only the final images.

`array_api_compat` supplies the standard's names for NumPy 1.x/2.x and CuPy; its NumPy namespace
calls NumPy's own functions, so the NumPy path computes what plain NumPy does, bit for bit.
"""

import array_api_compat
import numpy as np

NUMPY = array_api_compat.array_namespace(np.empty(0))


def namespace(*arrays):
    """The array API namespace of `arrays` (TypeError when they come from different libraries)."""
    return array_api_compat.array_namespace(*arrays)


def backend_namespace(backend):
    """The namespace of the arrays `backend.run` takes and returns (NumPy unless it says otherwise)."""
    xp = getattr(backend, "array_namespace", None)
    return NUMPY if xp is None else xp


def backend_device(backend):
    """The device of the arrays `backend.run` takes (None: its namespace's default device)."""
    return getattr(backend, "array_device", None)


def device(array):
    """The device `array` lives on, to create the loop's other arrays next to it."""
    return array_api_compat.device(array)


def dtype_name(array) -> str:
    """ "float32", "int64", "bool", ... for an array of any namespace (NumPy/CuPy dtypes have a
    `.name`; array-api-strict's print as "array_api_strict.float32")."""
    dtype = array.dtype
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).rsplit(".", 1)[-1]


def is_array(value) -> bool:
    """True for an array of any namespace array_api_compat knows (NumPy, CuPy, torch, array-api-strict, ...)."""
    return array_api_compat.is_array_api_obj(value) and not isinstance(value, np.generic)


def to_numpy(array) -> np.ndarray:
    """A NumPy copy on the host of an array of any namespace (the one device-to-host transfer the
    loop makes, for the final images). NumPy arrays are returned as they are. A device array comes
    back through its library's `get()` (CuPy's; NumPy's from_dlpack refuses device memory), any
    other through DLPack."""
    if isinstance(array, np.ndarray):
        return array
    if array_api_compat.is_cupy_array(array) or (_on_device(array) and callable(getattr(array, "get", None))):
        return array.get()
    return np.asarray(np.from_dlpack(array))


def _on_device(array) -> bool:
    """Whether DLPack places `array` outside host memory (kDLCPU is 1)."""
    where = getattr(array, "__dlpack_device__", None)
    return where is not None and int(where()[0]) != 1


def to_namespace(xp, array, like=None, device=None):
    """`array` as an array of namespace `xp`, on the device of `like` (or `device`) when given.
    Arrays already there are returned as they are; arrays of another namespace pass through the
    host (NumPy) once."""
    if like is not None:
        device = array_api_compat.device(like)
    if namespace(array) is xp:
        if device is None or array_api_compat.device(array) == device:
            return array
        return xp.asarray(array, device=device)
    kwargs = {} if device is None else {"device": device}
    return xp.asarray(to_numpy(array), **kwargs)
