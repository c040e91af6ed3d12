"""Timers, this machine's GEMM rate (the floor an engine is compared with), and the ONNX
Runtime sessions the engine experiments open."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, runs: int, warmup: int = 1) -> dict:
    """Wall seconds of fn() over `runs` calls after `warmup` calls: median, best, all."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "best": min(times), "times": times}


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall seconds of each of `fns` (name -> callable) over `repeats` rounds, and each one's
    last result. Every round calls them in turn, so slow drift of the machine hits all of them."""
    times, results = {name: [] for name in fns}, {}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}, results


# The experiments open their own sessions rather than the runtime's: the options below are what
# they vary, and the runtime's session policy (runtime/backends/onnxruntime.py) is the one variant they compare.
def ort_session(
    path,
    threads: int,
    level: str = "ALL",
    mem_pattern: bool = True,
    sequential: bool = True,
    spinning: bool | None = None,
    optimized_path: str | None = None,
    fixed_batch: int | None = None,
    denormal_as_zero: bool = False,
):
    """A CPU ONNX Runtime session on `path` with these options (the defaults are the runtime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1 if sequential else threads
    options.graph_optimization_level = {
        "DISABLE": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.enable_mem_pattern = mem_pattern
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if fixed_batch is not None:  # static shapes: the symbolic batch dimension becomes a number
        options.add_free_dimension_override_by_name("batch", fixed_batch)
    if denormal_as_zero:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


_GEMM_CHILD = """
import json, sys, time, numpy as np
n, runs = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
times = []
for _ in range(runs):
    t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def gemm_numpy(n: int, threads: int, runs: int) -> dict:
    """float32 (n x n) @ (n x n) in NumPy, in a subprocess whose BLAS uses `threads` threads
    (BLAS reads its thread count once, at import)."""
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    result = subprocess.run(
        [sys.executable, "-c", _GEMM_CHILD, str(n), str(runs)], env=env, capture_output=True, text=True, check=True
    )
    best = min(json.loads(result.stdout.strip().splitlines()[-1]))
    return {"n": n, "threads": threads, "best_s": best, "gflops": 2 * n**3 / best / 1e9}


def gemm_ort(n: int, threads: int, runs: int) -> dict:
    """float32 (n x n) @ (n x n) through an ONNX Runtime MatMul model (B a constant initializer)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gemm.onnx"
        onnx.save(model, str(path))
        session = ort_session(path, threads)
    a = rng.standard_normal((n, n), dtype=np.float32)
    result = timed(lambda: session.run(None, {"A": a}), runs)
    return {"n": n, "threads": threads, "best_s": result["best"], "gflops": 2 * n**3 / result["best"] / 1e9}


def gemm_rates(n: int, threads: int, runs: int) -> dict:
    """Both GEMM probes, and the faster one's rate: the floor engine times are compared with."""
    gemm = {"numpy": gemm_numpy(n, threads, runs), "onnxruntime": gemm_ort(n, threads, runs)}
    return {"gemm": gemm, "floor_gflops": max(g["gflops"] for g in gemm.values())}
