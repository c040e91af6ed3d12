"""Section 9: the first Unet of section 7 as a TensorRT FP16 engine and in ONNX Runtime's CUDA
execution provider, when those are installed and usable; otherwise one reason per row.

The Unet (same preset, width, seed) is exported with the exporter's own `export_stage` (FP32,
then `convert_fp16` for TensorRT), the engine built with `build_engine` and run with the runtime's
`TensorRTBackend` (device arrays in and out when CuPy is here), ONNX Runtime through the runtime's
`OnnxRuntimeBackend` (IO binding; device arrays in and out when CuPy is here). One call at 2 x batch rows is timed
(median of `calls` after warm-up), the unit of section 7's "ms / Unet call"; target: TensorRT FP16
at least 2x faster per image than PyTorch FP16 eager on the same card. Runs in a child process.
"""

import statistics
import time
from pathlib import Path

import numpy as np

from .cascade import bench_unet
from .env import onnxruntime_gpu_reason, tensorrt_reason

TARGET_SPEEDUP = 2.0
TENSORRT, ONNXRUNTIME = "TensorRT FP16", "ONNX Runtime CUDA (FP32)"


def engine_reasons() -> dict:
    """Row -> why it cannot run here (None: it can)."""
    return {TENSORRT: tensorrt_reason(), ONNXRUNTIME: onnxruntime_gpu_reason()}


def _signature(sizes):
    from imagen.runtime.contract import unet_signature

    return unet_signature(0, sizes.image_size, sizes.text_length, sizes.text_width, False, sizes.batch)


def _median_call(run, feeds: dict, synchronize, calls: int) -> float:
    for _ in range(3):
        run(feeds)
    synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(feeds)
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(sizes, call_s: float, setup_s: float) -> dict:
    return {
        "unet_call_ms": 1e3 * call_s,
        "unet_s_per_image": sizes.steps * call_s / sizes.batch,
        "setup_s": setup_s,
    }


def time_onnxruntime(path: Path, sizes, feeds: dict, calls: int) -> dict:
    from imagen.runtime.backends import OnnxRuntimeBackend

    start = time.perf_counter()
    backend = OnnxRuntimeBackend(path, _signature(sizes), providers=["CUDAExecutionProvider"])
    setup = time.perf_counter() - start
    feeds, synchronize = _device_feeds(feeds)
    return _row(sizes, _median_call(backend.run, feeds, synchronize, calls), setup)


def _device_feeds(feeds: dict) -> tuple[dict, object]:
    """The feeds as CuPy arrays and a device synchronize when CuPy is here (the backends then keep
    their outputs on the device), else the NumPy feeds and nothing to wait for (outputs are copied
    back before run returns)."""
    try:
        import cupy
    except ImportError:
        return feeds, lambda: None
    return {name: cupy.asarray(array) for name, array in feeds.items()}, cupy.cuda.runtime.deviceSynchronize


def time_tensorrt(path: Path, sizes, feeds: dict, calls: int) -> dict:
    from imagen.export.fp16 import convert_fp16
    from imagen.export.tensorrt import build_engine
    from imagen.runtime.backends import TensorRTBackend

    start = time.perf_counter()
    half = path.with_name("unet_fp16.onnx")
    convert_fp16(path, half)
    plan = path.with_name("unet_fp16.plan")
    build_engine(half, _signature(sizes), plan, path.with_name("timing.cache"))
    setup = time.perf_counter() - start
    feeds, synchronize = _device_feeds(feeds)
    with TensorRTBackend(plan, _signature(sizes)) as backend:
        return _row(sizes, _median_call(backend.run, feeds, synchronize, calls), setup)


def engines_child(sizes, work: Path, calls: int = 10) -> dict:
    """Runs in a child process: the export once, then every usable row (a failing row gives its reason)."""
    from imagen.export.onnx_export import UnetStage, export_stage

    reasons = {name: reason for name, reason in engine_reasons().items() if reason is not None}
    work.mkdir(parents=True, exist_ok=True)
    path = work / "unet.onnx"
    unet = bench_unet(sizes.unet, sizes.dim, 0, sizes.text_width, sizes.text_length, "cpu")
    start = time.perf_counter()
    export_stage(UnetStage(unet), _signature(sizes), path, timesteps=sizes.timesteps)
    export_s = time.perf_counter() - start
    del unet
    feeds = _signature(sizes).sample_inputs(2 * sizes.batch, np.random.default_rng(0), timesteps=sizes.timesteps)
    rows = {}
    for name, measure in ((TENSORRT, time_tensorrt), (ONNXRUNTIME, time_onnxruntime)):
        if name in reasons:
            continue
        try:
            rows[name] = measure(path, sizes, feeds, calls)
        except Exception as error:  # an engine that fails is a row with its reason, not a crash
            reasons[name] = f"failed: {type(error).__name__}: {error}"
    return {"export_s": export_s, "rows": rows, "reasons": reasons}


def speedup_target(engines: dict, reference: dict) -> dict | None:
    """TensorRT FP16 against PyTorch FP16 eager, Unet seconds per image, when both were measured."""
    trt = engines.get("rows", {}).get(TENSORRT)
    eager = reference.get("rows", {}).get("FP16 autocast")
    if trt is None or eager is None:
        return None
    speedup = eager["unet_s_per_image"] / trt["unet_s_per_image"]
    return {
        "what": "TensorRT FP16 over PyTorch FP16 eager, Unet time per image",
        "value": speedup,
        "unit": "x",
        "goal": f">= {TARGET_SPEEDUP}x",
        "met": speedup >= TARGET_SPEEDUP,
    }
