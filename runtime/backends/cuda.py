"""The TensorRT backend's environment: TensorRT (full or lean) and cuda-python's runtime, the GPU and
driver probe, and which engines this machine can run.

The full `tensorrt` package runs every engine; the lean runtime (`tensorrt_lean`, about 45 MB) runs
only version-compatible ones, and is imported when the full package is absent. Both, and
cuda-python, are imported only when asked for, and the CUDA driver is probed before any TensorRT
object exists: without one, TensorRT's Runtime is a null object that crashes the process on first
use.
"""

from ..contract import TensorRTEntry
from ..errors import BackendError, BundleError

# Every TensorRT name this package uses ("Class.member" for members). Tests check that each exists
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
    "ICudaEngine.device_memory_size_v2",
    "ExecutionContextAllocationStrategy",
    "ExecutionContextAllocationStrategy.USER_MANAGED",
    "TensorIOMode",
    "TensorIOMode.INPUT",
    "DataType",
    "DataType.FLOAT",
    "DataType.HALF",
    "DataType.INT32",
    "DataType.INT64",
    "DataType.BOOL",
    "IExecutionContext.set_device_memory",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
)
# The cuda-python runtime calls and constants this package uses (checked against cuda-python 12.x and 13.x).
CUDART_NAMES = (
    "cudaGetDeviceCount",
    "cudaGetDevice",
    "cudaGetDeviceProperties",
    "cudaDriverGetVersion",
    "cudaRuntimeGetVersion",
    "cudaMalloc",
    "cudaFree",
    "cudaStreamCreateWithFlags",
    "cudaStreamNonBlocking",
    "cudaStreamDestroy",
    "cudaStreamSynchronize",
    "cudaEventCreateWithFlags",
    "cudaEventDisableTiming",
    "cudaEventRecord",
    "cudaStreamWaitEvent",
    "cudaEventDestroy",
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
INSTALL = (
    "pip install 'imagen-cascade[tensorrt-cu13]' (a CUDA 13 driver) or 'imagen-cascade[tensorrt-cu12]' (CUDA 12), "
    "or the tensorrt-lean-cu13 / tensorrt-lean-cu12 extras for version-compatible engines"
)


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


def import_cudart():
    """cuda-python's runtime module (cuda.bindings.runtime; cuda.cudart before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as error:
            raise BackendError(f"the TensorRT backend needs cuda-python ({INSTALL})") from error
    return cudart


def cuda_call(cudart, call: str, *args, where: str = "CUDA"):
    """cudart.<call>(*args): cuda-python returns (error, *values); BackendError naming the call on an error."""
    result = getattr(cudart, call)(*args)
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendError(f"{where}: {call} failed with CUDA error {int(error)} ({getattr(error, 'name', error)})")
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"  # CUDA's encoding: 1000 * major + 10 * minor


def driver_report(cudart) -> str:
    """What the driver supports against what cuda-python's runtime needs, and what to install when
    the driver is too old for it (cudaDriverGetVersion gives 0 when no driver is installed)."""
    driver = cudart.cudaDriverGetVersion()
    runtime = cudart.cudaRuntimeGetVersion()
    driver = int(driver[1]) if int(driver[0]) == 0 else 0
    runtime = int(runtime[1]) if int(runtime[0]) == 0 else 0
    if not driver:
        return "no NVIDIA driver is installed"
    report = f"the driver supports CUDA {_cuda_version(driver)}"
    if runtime and driver // 1000 < runtime // 1000:
        old = driver // 1000
        report += (
            f" and cuda-python here is built for CUDA {_cuda_version(runtime)}: install the CUDA {old} builds "
            f"(pip install 'imagen-cascade[tensorrt-cu{old}]'), or a driver for CUDA {runtime // 1000}"
        )
    return report


def tensorrt_environment() -> tuple[object, object, str, str]:
    """(tensorrt module, cudart, compute capability 'major.minor', TensorRT version), or BackendError
    saying what is missing. The driver is probed first: no TensorRT object is made without one."""
    trt = import_tensorrt()
    cudart = import_cudart()
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or not count:
        reason = f"CUDA error {int(error)} ({getattr(error, 'name', error)})" if int(error) else "0 devices"
        raise BackendError(
            f"TensorRT {trt.__version__} is installed but there is {NO_GPU} ({reason}; {driver_report(cudart)}); "
            "use --backend onnxruntime"
        )
    props = cuda_call(cudart, "cudaGetDeviceProperties", cuda_call(cudart, "cudaGetDevice"))
    return trt, cudart, f"{props.major}.{props.minor}", trt.__version__


def gpu_name(cudart) -> str:
    """The current device's name, as the driver reports it."""
    name = cuda_call(cudart, "cudaGetDeviceProperties", cuda_call(cudart, "cudaGetDevice")).name
    return (name.split(b"\0")[0].decode(errors="replace") if isinstance(name, bytes) else str(name)).strip()


def check_engines_match(engines: TensorRTEntry | None, capability: str, version: str, lean: bool = False) -> None:
    """BundleError unless this machine (GPU, TensorRT version, full or lean runtime) can run the engines.

    Every engine runs only on the GPU kind and the exact TensorRT version it was built with. Our
    version-compatible engines leave the lean runtime library out of the plan (EXCLUDE_LEAN_RUNTIME,
    so that each plan does not carry a copy of it): TensorRT then runs them only with the runtime of
    the version that built them (NvInferRuntime.h, loadRuntime), so they buy the lean runtime
    (tensorrt_lean) on inference servers, not later TensorRT releases."""
    if engines is None or not engines.engines:
        raise BundleError(
            "this bundle has no TensorRT engines; rebuild it with imagen-export --tensorrt on this "
            "machine, or use --backend onnxruntime"
        )
    if engines.compute_capability != capability or engines.version != version:
        kind = "version-compatible engines" if engines.version_compatible else "engines"
        raise BundleError(
            f"the bundle's TensorRT {kind} were built for compute capability {engines.compute_capability} with "
            f"TensorRT {engines.version}; this machine has compute capability {capability} and TensorRT {version}; "
            f"they run only on the exact TensorRT version they were built with: install TensorRT {engines.version} "
            "(full or lean), or rebuild them here with imagen-export --tensorrt, or use --backend onnxruntime"
        )
    if lean and not engines.version_compatible:
        raise BundleError(
            "the lean TensorRT runtime (tensorrt_lean) runs only version-compatible engines; rebuild "
            "them with imagen-export --tensorrt --version-compatible, or install the full tensorrt "
            "package, or use --backend onnxruntime"
        )
