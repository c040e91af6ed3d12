"""What a GPU run was measured on, and why a GPU row cannot be measured here.

Everything is read, nothing is set: no clocks, no persistence mode, no torch backend flags (the
TF32 switches are reported as torch leaves them). Each `*_reason` function returns None when its
row can run, else one sentence saying what is missing and what would supply it.
"""

import datetime
import shutil
import subprocess

from ..machine import machine


def _version(module_name: str) -> str:
    try:
        return __import__(module_name).__version__
    except Exception as error:  # a broken install raises more than ImportError
        return "not installed" if isinstance(error, ImportError) else f"fails to import ({type(error).__name__})"


def _nvidia_smi_driver() -> str | None:
    """The driver version as nvidia-smi reports it (a read-only query), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def cuda_reason() -> str | None:
    """None when torch sees a CUDA device, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install -e '.[export]')"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA); install a CUDA build of torch on a GPU machine"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def cupy_reason() -> str | None:
    """None when CuPy imports and has a device, else why not."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install -e '.[cuda]', the cupy-cuda12x build)"
    except Exception as error:
        return f"CuPy fails to import: {type(error).__name__}: {error}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"CuPy {cupy.__version__} finds no CUDA device: {type(error).__name__}: {error}"
    return None if count else f"CuPy {cupy.__version__} finds no CUDA device"


def onnxruntime_gpu_reason() -> str | None:
    """None when onnxruntime has the CUDA execution provider and torch sees a device, else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {', '.join(providers)}): "
            "the CPU build is installed; pip install onnxruntime-gpu instead of onnxruntime"
        )
    return cuda_reason()


def tensorrt_reason() -> str | None:
    """None when the full tensorrt package, cuda-python and a device are here (the runtime's own
    probe), else why not. The lean runtime runs engines but cannot build them."""
    from imagen.runtime.backends import tensorrt_environment
    from imagen.runtime.errors import BackendError

    try:
        trt, *_ = tensorrt_environment()
    except BackendError as error:
        return str(error)
    except Exception as error:  # a broken install or driver
        return f"TensorRT cannot start: {type(error).__name__}: {error}"
    if getattr(trt, "Builder", None) is None:
        return f"only the lean TensorRT runtime {trt.__version__} is installed: it cannot build engines"
    return None


def _gpu() -> dict:
    """Name, compute capability, memory and CUDA versions of device 0, as torch and CuPy see it."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": _nvidia_smi_driver(),
        # Reported as torch leaves them; the bench never sets them.
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if cupy_reason() is None:
        import cupy

        info["driver_cuda_api"] = cupy.cuda.runtime.driverGetVersion()
        info["cupy_cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    return info


def _onnxruntime() -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"version": "not installed", "providers": []}
    return {"version": ort.__version__, "providers": ort.get_available_providers()}


def environment() -> dict:
    """The date, the GPU (or why there is none), the CPU machine and every library's version."""
    reason = cuda_reason()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": _gpu() if reason is None else None,
        "no_gpu_reason": reason,
        "machine": machine(),
        "torch": _version("torch"),
        "cupy": _version("cupy"),
        "onnxruntime": _onnxruntime(),
        "tensorrt": _version("tensorrt"),
        "tensorrt_lean": _version("tensorrt_lean"),
    }
