"""`python -m bench.gpu` (bench/gpu/): on a machine without CUDA, the smoke run end to end on the
session's tiny run and bundle (the environment, the NumPy loop's measured share outside engine
calls, its parity with ONNX Runtime, a reason for every GPU row, the JSON); the device loop's code
path with array-api-strict standing in for CuPy; the child process stopped at its time limit.
With CUDA (and CuPy), the smoke run measures the CuPy loop. No timing assertions."""

import contextlib
import io
import json
import math

import pytest

from bench.gpu.cascade import SMOKE_SIZES
from bench.gpu.env import cuda_reason, cupy_reason
from bench.gpu.loop import loop_section
from bench.gpu.suite import main, run_child

NO_CUDA = cuda_reason()


def _smoke(tiny_run, bundle_fp32, folder, *extra: str) -> tuple[dict, str, dict]:
    out = folder / "gpu.json"
    argv = ["--smoke", "--threads", "1", "--run", str(tiny_run), "--bundle", str(bundle_fp32), *extra]
    argv += ["--json", str(out), "--work", str(folder / "work")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = main(argv)
    return results, printed.getvalue(), json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tiny_run, bundle_fp32, tmp_path_factory):
    return _smoke(tiny_run, bundle_fp32, tmp_path_factory.mktemp("bench_gpu"))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.skipif(NO_CUDA is None, reason="checks the CPU smoke run's reason lines; this machine has CUDA")
def test_cpu_smoke_run_reports_the_numpy_loop_and_why_gpu_rows_are_missing(smoke):
    results, markdown, _ = smoke
    assert results["smoke"] is True and results["environment"]["gpu"] is None
    loop = results["sections"]["loop"]
    numpy_loop = loop["loops"]["numpy"]
    print("NumPy loop outside engine calls:", f"{numpy_loop['outside_percent']:.2f}%")
    assert 0 < numpy_loop["outside_percent"] < 100
    assert 0 < numpy_loop["engine_s"] < numpy_loop["total_s"]
    assert numpy_loop["engine_calls"] == 2 * SMOKE_SIZES.steps  # two Unets, one call a step
    parity = loop["parity"][0]
    print("NumPy loop vs ONNX Runtime:", parity)
    assert (parity["a"], parity["b"]) == ("numpy", "onnxruntime")
    assert _finite(parity["max_abs_x"]) and parity["max_abs_x"] < 1e-3  # FP32 engines, same weights
    assert parity["uint8_max_diff"] <= 1
    assert "CuPy loop" in loop["reasons"]
    reference = results["sections"]["reference"]
    assert _finite(reference["rows"]["eager FP32"]["s_per_image"])
    assert {"FP16 autocast", "CUDA rows", "torch.compile"} <= set(reference["reasons"])
    engines = results["sections"]["engines"]
    assert engines["rows"] == {} and len(engines["reasons"]) == 2
    for line in (
        "#### 6. Environment",
        "| GPU | none: ",
        "| tensorrt |",
        "NumPy loop (torch Unet, feeds copied to its device and back)",
        "- Parity numpy vs onnxruntime: final x max abs difference",
        "- CuPy loop: not measured: ",
        "- torch.compile: not measured: ",
        "- FP16 autocast: not measured: ",
        "- TensorRT FP16: not measured: ",
        "- ONNX Runtime CUDA (FP32): not measured: ",
    ):
        assert line in markdown, line
    assert "Traceback" not in markdown and "| nan" not in markdown


def test_json_has_every_part(smoke):
    results, _, written = smoke
    assert {"environment", "sections", "targets", "smoke", "budget_s", "seconds", "sizes", "argv"} <= set(written)
    assert set(written["sections"]) == {"reference", "loop", "engines"}
    environment = written["environment"]
    assert {"date", "gpu", "torch", "cupy", "onnxruntime", "tensorrt", "tensorrt_lean"} <= set(environment)
    assert "CPUExecutionProvider" in environment["onnxruntime"]["providers"]
    assert written["targets"][0]["unit"] == "%"
    assert written["sections"]["loop"]["loops"] == results["sections"]["loop"]["loops"]


def test_device_loop_path_equals_the_numpy_loop_bit_for_bit(tiny_run, bundle_fp32):
    """The DLPack backend and a namespace other than NumPy (array-api-strict for CuPy): the same
    torch Unet behind both loops, so the images are the same to the bit."""
    xp = pytest.importorskip("array_api_strict", reason="pip install array-api-strict")
    section = loop_section(
        bundle_fp32, tiny_run, SMOKE_SIZES, device="cpu", device_namespace=xp, threads=1, say=lambda message: None
    )
    assert list(section["loops"]) == ["numpy", "array_api_strict", "onnxruntime"]
    strict = section["parity"][0]
    print("NumPy loop vs array-api-strict loop:", strict)
    assert strict["b"] == "array_api_strict" and strict["max_abs_x"] == 0.0 and strict["uint8_max_diff"] == 0
    assert section["loops"]["array_api_strict"]["engine_calls"] == section["loops"]["numpy"]["engine_calls"]


def test_a_child_past_its_time_is_stopped_with_a_reason():
    out = run_child("compile", {"sizes": SMOKE_SIZES.to_dict(), "device": "cpu", "precision": "fp32"}, 1.0)
    assert out["reason"].startswith("stopped after 1 s")


@pytest.mark.skipif(
    NO_CUDA is not None or cupy_reason() is not None, reason=f"needs CUDA and CuPy: {NO_CUDA or cupy_reason()}"
)
def test_gpu_smoke_run_measures_the_cupy_loop(tiny_run, bundle_fp32, tmp_path):
    results, markdown, _ = _smoke(tiny_run, bundle_fp32, tmp_path, "--no-compile")
    assert "CuPy loop (DLPack, arrays stay on the device)" in markdown
    loop = results["sections"]["loop"]
    assert set(loop["loops"]) == {"numpy", "cupy"}
    parity = loop["parity"][0]
    print("NumPy loop vs CuPy loop on the GPU:", parity)
    assert parity["uint8_max_diff"] <= 1
    assert 0 < loop["loops"]["cupy"]["outside_percent"] < 100
    assert results["sections"]["reference"]["rows"]["FP16 autocast"]["s_per_image"] > 0
