"""The real TensorRT lean runtime on a machine without a GPU: `tensorrt-lean` and cuda-python
install (into pytest's cache, about 53 MB, once) and import; the backend picks `tensorrt_lean`
when full TensorRT is absent, and every TensorRT name the backend uses resolves on the real
module; `imagen-run --backend tensorrt` stops with one line and exit status 2, while `--backend
auto` falls back to ONNX Runtime and makes the image."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagen.runtime.backends import cuda as tensorrt_environment

PACKAGES = ["tensorrt-lean-cu13>=11,<12", "cuda-bindings>=13,<14"]
CHECK = """
import json, sys
from imagen.runtime.backends import cuda as backend

trt = backend.import_tensorrt()
missing = []
for name in json.loads(sys.argv[1]):
    value = trt
    for part in name.split("."):
        value = getattr(value, part, None)
    if value is None:
        missing.append(name)
found = {"module": trt.__name__, "version": trt.__version__, "lean": backend.is_lean(trt)}
print(json.dumps({**found, "missing": missing}))
"""


@pytest.fixture(scope="module")
def lean_site(request) -> Path:
    """A folder holding tensorrt_lean (11.x, CUDA 13) and cuda-python's bindings, for PYTHONPATH."""
    site = request.config.cache.mkdir("tensorrt-lean") / "site"
    if not (site / "tensorrt_lean").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(site)]
            + PACKAGES,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not (site / "tensorrt_lean").is_dir():
            lines = (done.stderr or done.stdout or "no output").strip().splitlines()
            pytest.skip(f"cannot install {' '.join(PACKAGES)} (offline?): {lines[-1] if lines else ''}")
    return site


def _python(site: Path, *args: str) -> subprocess.CompletedProcess:
    """This Python with `site` first on its path."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [environment.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=environment)


def test_the_lean_runtime_imports_and_has_every_name_the_backend_uses(lean_site):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("full TensorRT is installed here, so the backend would not choose the lean runtime")
    done = _python(lean_site, "-c", CHECK, json.dumps(tensorrt_environment.TENSORRT_NAMES))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    print(f"\n{found}")
    assert found["module"] == "tensorrt_lean" and found["lean"] is True
    assert found["version"].startswith("11.")
    assert found["missing"] == []


def test_imagen_run_on_the_lean_runtime_without_a_gpu(lean_site, tmp_path):
    run = ["-m", "imagen.runtime.cli", "a small red circle on the left", "--seed", "0", "--quiet"]
    refused = _python(lean_site, *run, "--backend", "tensorrt", "-o", str(tmp_path / "trt.png"))
    lines = refused.stderr.strip().splitlines()
    print(f"\n{refused.stderr}")
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert (
        lines[0].startswith("error: TensorRT 11.")
        and "no NVIDIA GPU" in lines[0]
        and "no NVIDIA driver is installed" in lines[0]  # cudaDriverGetVersion gives 0
        and "--backend onnxruntime" in lines[0]
    )
    assert not (tmp_path / "trt.png").exists()
    fallback = _python(lean_site, *run, "--backend", "auto", "-o", str(tmp_path / "auto.png"))
    assert fallback.returncode == 0, fallback.stderr
    assert (tmp_path / "auto.png").stat().st_size > 0
