"""TensorRT without a GPU, the files engines are built from: the strictly typed FP16 ONNX, and
the TensorRT and cuda-python names the code uses, listed once and checked against the real
TensorRT 10.x and 11.x Python bindings and cuda-python 12.x and 13.x (downloaded from PyPI).
What runs only on a GPU is in docs/gpu.md."""

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from imagen.export import tensorrt as export_trt
from imagen.export.fp16 import convert_fp16
from imagen.runtime.backends import cuda as backend_module

from fake_cuda import Device, make_cudart
from fake_tensorrt import make_tensorrt, public_names

ROOT = Path(__file__).parent.parent
BUILD_SOURCE = ROOT / "export" / "tensorrt.py"
RUNTIME_SOURCES = tuple(ROOT / "runtime" / "backends" / name for name in ("cuda.py", "tensorrt.py"))
# TensorRT objects live in variables of these names (tests read the code through them).
OBJECTS = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "config": "IBuilderConfig",
    "profile": "IOptimizationProfile",
    "cache": "ITimingCache",
    "runtime": "Runtime",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "logger": "Logger",
}


# The FP16 ONNX: strictly typed, Resize scales in float32, no cast to the type a tensor already has


def _types(model) -> dict:
    """Element type of every tensor, from strict shape inference (which fails on a type conflict)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    graph = inferred.graph
    types_ = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types_.update((t.name, t.data_type) for t in graph.initializer)
    return types_


def _check_strictly_typed(path: Path) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    types_ = _types(model)
    for node in model.graph.node:
        if node.op_type == "Resize":
            for name in node.input[1:3]:  # roi, scales
                assert not name or types_[name] == TensorProto.FLOAT, (path.name, node.name, name)
        if node.op_type == "Cast":
            to = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            assert types_[node.input[0]] != to, (path.name, node.name, TensorProto.DataType.Name(to))


def test_fp16_unets_are_strictly_typed(bundle_fp16):
    unets = sorted(bundle_fp16.glob("unet_*.onnx"))
    assert len(unets) == 2
    for path in unets:
        _check_strictly_typed(path)
        model = onnx.load(str(path))
        resizes = [n for n in model.graph.node if n.op_type == "Resize"]
        assert resizes, f"{path.name} has no Resize: the scales check above checked nothing"
        assert TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}  # FP16 weights
        scales = {n.input[2] for n in resizes}
        assert {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT} <= scales
        io = [*model.graph.input, *model.graph.output]
        assert {v.type.tensor_type.elem_type for v in io} <= {TensorProto.FLOAT, TensorProto.BOOL}  # FP32 I/O


def test_convert_fp16_drops_the_converters_float32_to_float32_cast(tmp_path):
    """The converter casts a float32 Resize scales tensor that the exporter annotated to float32."""
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((2, 2, 1, 1)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("Resize", ["h", "", "scales"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 8, 8])],
        [weight, scales],
        value_info=[helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), tmp_path / "a.onnx")
    convert_fp16(tmp_path / "a.onnx", tmp_path / "h.onnx")
    _check_strictly_typed(tmp_path / "h.onnx")
    assert [n.op_type for n in onnx.load(tmp_path / "h.onnx").graph.node] == ["Cast", "Conv", "Resize", "Cast"]
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(np.float32)
    want, got = (ort.InferenceSession(tmp_path / f).run(None, {"x": x})[0] for f in ("a.onnx", "h.onnx"))
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


# The TensorRT names: used only from the lists, and present in TensorRT 10.x and 11.x


def _chain(node) -> list[str]:
    names = []
    while isinstance(node, ast.Attribute):
        names.insert(0, node.attr)
        node = node.value
    return [node.id, *names] if isinstance(node, ast.Name) else []


def _lists(tree) -> set[int]:
    """The ids of the nodes inside the name lists themselves (`X_NAMES = (...)`): not uses."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("_NAMES") for t in node.targets):
            inside.update(id(child) for child in ast.walk(node.value))
    return inside


def used_names(path: Path) -> tuple[set, set]:
    """(TensorRT names, cuda-python runtime names) that the module at `path` uses."""
    trt_names, cuda_names = set(), set()
    tree = ast.parse(path.read_text())
    lists = _lists(tree)
    for node in ast.walk(tree):
        if id(node) in lists:
            continue
        chain = _chain(node) if isinstance(node, ast.Attribute) else []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            chain = _chain(node.args[0]) + [node.args[1].value] if isinstance(node.args[1], ast.Constant) else []
        if isinstance(node, ast.Constant) and re.fullmatch(r"cuda[A-Z]\w*", str(node.value)):
            cuda_names.add(node.value)  # a call by name: _cuda(cudart, "cudaMalloc", ...)
        if chain[:1] in (["self"], ["state"]):
            chain = chain[1:]
        if len(chain) < 2:
            continue
        root = chain[0].lstrip("_")
        if root == "trt" and (chain[1] == "__version__" or not chain[1].startswith("__")):
            trt_names.add(".".join(chain[1:3]))
        elif root in OBJECTS:
            trt_names.add(f"{OBJECTS[root]}.{chain[1]}")
        elif root == "cudart":
            cuda_names.add(chain[1])
    return trt_names, cuda_names


def test_the_code_uses_exactly_the_listed_tensorrt_and_cuda_names():
    trt_names, cuda_names = used_names(BUILD_SOURCE)
    assert (sorted(trt_names), cuda_names) == (sorted(export_trt.BUILDER_NAMES), set())
    used = [used_names(path) for path in RUNTIME_SOURCES]  # the TensorRT backend and its environment
    assert sorted(set().union(*(trt for trt, _ in used))) == sorted(backend_module.TENSORRT_NAMES)
    assert sorted(set().union(*(cuda for _, cuda in used))) == sorted(backend_module.CUDART_NAMES)
    assert set(export_trt.TENSORRT_NAMES) == set(export_trt.BUILDER_NAMES) | set(backend_module.TENSORRT_NAMES)
    cudart = make_cudart(Device())  # the fake has every name the code uses (and more, for the tests' own streams)
    assert set(backend_module.CUDART_NAMES) <= {n for n in public_names(cudart) if "." not in n}


WHEELS = {
    "10": "tensorrt_cu12_bindings==10.13.*",
    "11": "tensorrt_cu13_bindings>=11,<12",
    "lean 10": "tensorrt_lean_cu12_bindings==10.13.*",
    "lean 11": "tensorrt_lean_cu13_bindings>=11,<12",
}


class Bindings:
    """The names a TensorRT bindings wheel defines: its shared object's NUL-terminated strings (pybind11
    keeps every class, method and enum member name there; the linker may store a name as the tail
    of a longer string) and the names its own __init__.py defines (`__version__`)."""

    def __init__(self, wheel: Path):
        self.wheel, self.strings = wheel.name, set()
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith(".so"):
                    self.strings.update(s.decode("latin-1") for s in archive.read(member).split(b"\0") if s)
                elif re.fullmatch(r"[^/]+/__init__\.py", member):
                    for node in ast.parse(archive.read(member)).body:
                        targets = node.targets if isinstance(node, ast.Assign) else [node]
                        self.strings.update(getattr(t, "id", getattr(t, "name", "")) for t in targets)
        self.version = wheel.name.split("-")[1]

    def has(self, name: str) -> bool:
        return all(part in self.strings or any(s.endswith(part) for s in self.strings) for part in name.split("."))


def _download(spec: str, folder: Path, *options: str) -> None:
    """The Linux x86-64 CPython 3.11 wheels of `spec` into `folder`, from PyPI; the test skips, saying
    why, when pip cannot get them (offline)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", *options, "--only-binary", ":all:", "--python-version", "3.11"]
        + ["--platform", "manylinux_2_28_x86_64", "--quiet", "--dest", str(folder), spec],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 or not list(folder.glob("*.whl")):
        lines = (done.stderr or done.stdout or "no output").strip().splitlines()
        pytest.skip(f"cannot download {spec} from PyPI (offline?): {lines[-1] if lines else ''}")


@pytest.fixture(scope="module")
def bindings(request) -> dict[str, Bindings]:
    """The four wheels (about 1 MB each), downloaded once into pytest's cache."""
    found = {}
    for key, spec in WHEELS.items():
        folder = request.config.cache.mkdir("tensorrt-bindings") / key.replace(" ", "-")
        folder.mkdir(exist_ok=True)
        if not list(folder.glob("*.whl")):
            _download(spec, folder, "--no-deps")
        found[key] = Bindings(sorted(folder.glob("*.whl"))[-1])
    return found


def test_every_tensorrt_name_the_code_uses_exists_in_tensorrt_10_and_11(bindings):
    for key in ("10", "11"):
        missing = [n for n in export_trt.TENSORRT_NAMES if not bindings[key].has(n)]
        assert missing == [], f"{bindings[key].wheel} lacks {missing}"
    for key in ("lean 10", "lean 11"):  # the lean runtime runs what the backend uses
        missing = [n for n in backend_module.TENSORRT_NAMES if not bindings[key].has(n)]
        assert missing == [], f"{bindings[key].wheel} lacks {missing}"
    print({key: b.version for key, b in bindings.items()})


def test_the_weak_typing_flags_are_in_10_and_gone_in_11(bindings):
    """What the build must not use: FP16 and the precision constraints exist only in 10.x (this also
    shows that the name check can fail)."""
    for name in ("BuilderFlag.FP16", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS"):
        assert bindings["10"].has(name) and not bindings["11"].has(name), name
    assert not bindings["lean 11"].has("OnnxParser")


def test_the_fake_tensorrt_uses_only_real_names(bindings):
    for fake in (make_tensorrt(Device()), make_tensorrt(Device(), lean=True)):
        for key in ("10", "11"):
            missing = sorted(n for n in public_names(fake) if not bindings[key].has(n))
            assert missing == [], f"{fake.__name__}: {bindings[key].wheel} lacks {missing}"


CUDA_PYTHON = {"12": "cuda-bindings>=12,<13", "13": "cuda-bindings>=13,<14"}
# Run with the real cuda.bindings.runtime (it imports without a driver): the names missing from it,
# and whether a stream given as an integer (as __cuda_array_interface__ gives it) is accepted; the
# legacy default stream (1) is a valid handle with a GPU, and without one the call returns error 35.
CUDA_CHECK = """
import json, sys
from cuda.bindings import runtime as cudart

def has(name):
    value = cudart
    for part in name.split("."):
        value = getattr(value, part, None)
    return value is not None

result = cudart.cudaStreamSynchronize(1)
print(json.dumps({"missing": [n for n in json.loads(sys.argv[1]) if not has(n)],
                  "int stream": isinstance(result[0], cudart.cudaError_t)}))
"""


@pytest.fixture(scope="module")
def cuda_python(request) -> dict[str, Path]:
    """cuda-python's bindings 12.x and 13.x with their one dependency (cuda-pathfinder), about 8 MB
    each, downloaded and unpacked once into pytest's cache: key -> folder to put on sys.path."""
    found = {}
    for key, spec in CUDA_PYTHON.items():
        folder = request.config.cache.mkdir("cuda-python") / key
        site = folder / "site"
        if not (site / "cuda" / "bindings").is_dir():
            _download(spec, folder)
            for wheel in folder.glob("*.whl"):
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(site)
        found[key] = site
    return found


def test_every_cuda_name_the_code_uses_exists_in_cuda_python_12_and_13(cuda_python):
    """The backend's calls (CUDART_NAMES) and every name of the fake runtime, enum members included
    (cudaMemcpyKind.cudaMemcpyDeviceToDevice, ...), in the real bindings."""
    names = sorted(set(backend_module.CUDART_NAMES) | public_names(make_cudart(Device())))
    assert "cudaMemcpyKind.cudaMemcpyDeviceToDevice" in names
    for key, site in cuda_python.items():
        done = subprocess.run(
            [sys.executable, "-c", CUDA_CHECK, json.dumps(names)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(site)},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"missing": [], "int stream": True}, key
