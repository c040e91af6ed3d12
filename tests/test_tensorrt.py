"""TensorRT without a GPU: the strictly typed FP16 ONNX that engines are built from; the TensorRT
names the code uses, listed once and checked against the real TensorRT 10.x and 11.x Python
bindings (downloaded from PyPI); the engine build (strongly typed, checked against ONNX Runtime,
recorded in the manifest) and the backend (fixed buffers, CUDA graphs, one context per thread,
typed errors) against the fakes in fake_tensorrt.py. What runs only on a GPU is in docs/gpu.md."""

import ast
import json
import re
import shutil
import subprocess
import sys
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fake_tensorrt import Device, install, make_cudart, make_tensorrt, public_names
from onnx import TensorProto

from imagen.export import tensorrt as export_trt
from imagen.export.bundle import TOLERANCE
from imagen.export.onnx_export import convert_fp16
from imagen.runtime import tensorrt_backend as backend_module
from imagen.runtime.bundle import load_bundle
from imagen.runtime.contract import Manifest, TensorRTEntry
from imagen.runtime.errors import BackendError, BundleError, SignatureError

ROOT = Path(__file__).parent.parent
SOURCES = {ROOT / "export" / "tensorrt.py": export_trt.BUILDER_NAMES,
           ROOT / "runtime" / "tensorrt_backend.py": backend_module.TENSORRT_NAMES}
# TensorRT objects live in variables of these names (tests read the code through them).
OBJECTS = {"builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig",
           "profile": "IOptimizationProfile", "cache": "ITimingCache", "runtime": "Runtime", "engine": "ICudaEngine",
           "context": "IExecutionContext", "logger": "Logger"}


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
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 8, 8])], [weight, scales],
                              value_info=[helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4])])
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


def used_names(path: Path) -> tuple[set, set]:
    """(TensorRT names, cuda-python runtime names) that the module at `path` uses."""
    trt_names, cuda_names = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
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
    for path, listed in SOURCES.items():
        trt_names, cuda_names = used_names(path)
        assert sorted(trt_names) == sorted(listed), path.name
        assert sorted(cuda_names) == sorted(backend_module.CUDART_NAMES if "runtime" in path.parts else []), path
    assert set(export_trt.TENSORRT_NAMES) == set(export_trt.BUILDER_NAMES) | set(backend_module.TENSORRT_NAMES)
    cudart = make_cudart(Device())
    assert {n for n in public_names(cudart) if "." not in n} == set(backend_module.CUDART_NAMES)


WHEELS = {"10": "tensorrt_cu12_bindings==10.13.*", "11": "tensorrt_cu13_bindings>=11,<12",
          "lean 10": "tensorrt_lean_cu12_bindings==10.13.*", "lean 11": "tensorrt_lean_cu13_bindings>=11,<12"}


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


@pytest.fixture(scope="module")
def bindings(request) -> dict[str, Bindings]:
    """The four wheels (about 1 MB each), downloaded once into pytest's cache."""
    found = {}
    for key, spec in WHEELS.items():
        folder = request.config.cache.mkdir("tensorrt-bindings") / key.replace(" ", "-")
        folder.mkdir(exist_ok=True)
        if not list(folder.glob("*.whl")):
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                   "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--quiet",
                                   "--dest", str(folder), spec], capture_output=True, text=True, timeout=300)
            if done.returncode != 0 or not list(folder.glob("*.whl")):
                lines = (done.stderr or done.stdout or "no output").strip().splitlines()
                pytest.skip(f"cannot download {spec} from PyPI (offline?): {lines[-1] if lines else ''}")
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


# The engine build, on the fakes


@pytest.fixture
def device(monkeypatch) -> Device:
    device = Device()
    install(monkeypatch, make_tensorrt(device), make_cudart(device))
    return device


def _stages(root: Path):
    """What build_engines needs of each stage, from a bundle's manifest."""
    bundle = load_bundle(root)
    timesteps = {name: s.timesteps for name, s in bundle.manifest.schedules.items()}
    return [types.SimpleNamespace(name=name, signature=stage.signature,
                                  input_kwargs={"timesteps": timesteps[name]} if name in timesteps else {})
            for name, stage in bundle.stages.items()], bundle.manifest.stages


@pytest.fixture
def copied(bundle_fp16, tmp_path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(bundle_fp16, root)
    return root


def _build(root: Path, messages: list, **options) -> TensorRTEntry | None:
    stages, entries = _stages(root)
    return export_trt.build_engines(stages, entries, root, messages.append, tolerance=TOLERANCE["fp16"], **options)


def test_engines_are_strongly_typed_checked_and_recorded(device, copied):
    messages = []
    entry = _build(copied, messages)
    assert [Path(p["onnx"]).name for p in device.plans] == ["text_encoder.onnx", "unet_0.onnx", "unet_1.onnx"]
    for plan in device.plans:  # strongly typed (flag STRONGLY_TYPED = 1), no precision flag at all
        assert (plan["network_flags"], plan["flags"], plan["pools"]) == (1 << 1, [], {"WORKSPACE": 4 * 2**30})
    assert (entry.compute_capability, entry.version, entry.gpu_name) == ("9.0", "11.4.0.106", "Fake GPU 80GB")
    assert entry.max_rel_error == {"text_encoder": 0.0, "unet_0": 0.0, "unet_1": 0.0}  # the fake runs the ONNX
    assert entry.tolerance == TOLERANCE["fp16"] and not entry.version_compatible
    assert TensorRTEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry
    assert sorted(p.name for p in (copied / entry.dir).iterdir()) == [
        "text_encoder.plan", "timing.cache", "unet_0.plan", "unet_1.plan"]
    assert any("unet_1: engine rel. error 0.00e+00" in m for m in messages)


@pytest.mark.parametrize("perturb", [0.05, float("nan")])
def test_an_engine_that_differs_from_onnxruntime_is_not_written(device, copied, perturb):
    device.perturb = perturb
    with pytest.raises(export_trt.EngineCheckError, match=r"text_encoder: .*relative error (5\.0\d+e-02|inf) > "
                       r"tolerance 1e-02 at batch 1; the engine was not written") as info:
        _build(copied, [])
    assert info.value.stage == "text_encoder"
    assert not list((copied / "tensorrt").glob("*/*.plan*"))


def test_version_compatible_engines_exclude_the_lean_runtime_and_load_with_host_code(device, copied, monkeypatch):
    entry = _build(copied, [], version_compatible=True)
    assert entry.version_compatible and entry.to_json()["version_compatible"] is True
    assert all(p["flags"] == ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"] for p in device.plans)
    assert device.runtimes and all(r.engine_host_code_allowed for r in device.runtimes)
    install(monkeypatch, make_tensorrt(device, lean=True), make_cudart(device))  # the lean runtime alone runs them
    stage = load_bundle(copied).stages["unet_0"]
    with backend_module.TensorRTBackend(copied / entry.engines["unet_0"].file, stage.signature, entry) as lean:
        feeds = stage.signature.sample_inputs(2, np.random.default_rng(0), timesteps=30)
        want = ort.InferenceSession(copied / "unet_0.onnx").run(None, feeds)[0]
        assert np.array_equal(lean.run(feeds)["noise_pred"], want)


def test_strongly_typed_only_where_the_flag_exists(device):
    assert export_trt.network_flags(make_tensorrt(device)) == 1 << 1
    assert export_trt.network_flags(make_tensorrt(device, strongly_typed_flag=False)) == 0


def test_the_lean_runtime_cannot_build(monkeypatch, copied):
    device = Device()
    install(monkeypatch, make_tensorrt(device, lean=True), make_cudart(device))
    messages = []
    assert _build(copied, messages) is None
    assert "tensorrt: skipped: only the lean TensorRT runtime 11.4.0.106 is installed" in messages[0]


def test_parse_and_build_failures_are_typed(device, copied, tmp_path):
    stage = load_bundle(copied).stages["unet_0"]
    with pytest.raises(export_trt.EngineError, match=r"unet_0: TensorRT cannot parse missing\.onnx: cannot open"):
        export_trt.build_engine(tmp_path / "missing.onnx", stage.signature, tmp_path / "p", tmp_path / "c")
    device.fail.add("build_serialized_network")
    with pytest.raises(export_trt.EngineError, match="unet_0: TensorRT failed to build an engine from unet_0.onnx"):
        export_trt.build_engine(copied / "unet_0.onnx", stage.signature, tmp_path / "p", tmp_path / "c")


# The backend, on the fakes


@pytest.fixture
def unet(device, copied, tmp_path):
    """(signature, plan path, ONNX Runtime session) of the super-resolution Unet."""
    stage = load_bundle(copied).stages["unet_1"]
    export_trt.build_engine(copied / "unet_1.onnx", stage.signature, tmp_path / "u.plan", tmp_path / "cache")
    return stage.signature, tmp_path / "u.plan", ort.InferenceSession(copied / "unet_1.onnx")


def _run_and_compare(backend, signature, session, batch: int, seed: int = 0) -> None:
    feeds = signature.sample_inputs(batch, np.random.default_rng(seed), timesteps=30)
    assert np.array_equal(backend.run(feeds)["noise_pred"], session.run(None, feeds)[0])


def test_fixed_buffers_and_one_graph_per_batch(device, unet):
    signature, plan, session = unet
    backend = backend_module.TensorRTBackend(plan, signature)
    for batch in (2, 2, 2, 4, 2, 2):
        _run_and_compare(backend, signature, session, batch)
    tensors = len(signature.inputs) + len(signature.outputs)
    # One allocation per tensor, at batch_max: later batches copy into the same addresses.
    assert device.calls["cudaMalloc"] == tensors and device.calls["create_execution_context"] == 1
    assert device.capture_modes == [1, 1]  # batches 2 and 4, thread-local capture
    # 2: warm-up + capture, launch, launch; 4: warm-up + capture; 2: one plain call after the batch change, launch
    assert (device.calls["execute_async_v3"], device.calls["cudaGraphLaunch"]) == (5, 3)
    backend.close()
    assert (device.memory, device.streams, device.graphs) == ({}, {}, set())


def test_cuda_graphs_can_be_turned_off(device, unet):
    signature, plan, session = unet
    with backend_module.TensorRTBackend(plan, signature, cuda_graphs=False) as backend:
        for batch in (1, 3, 3):
            _run_and_compare(backend, signature, session, batch)
    assert (device.calls["execute_async_v3"], device.calls["cudaStreamBeginCapture"]) == (3, 0)


@pytest.mark.parametrize("failure", ["cudaStreamBeginCapture", "capture", "cudaGraphInstantiate"])
def test_a_failed_capture_falls_back_to_plain_calls(device, unet, failure):
    signature, plan, session = unet
    if failure == "capture":
        device.capture_fails = True  # execute_async_v3 fails while capturing: the capture is invalidated
    else:
        device.fail.add(failure)
    with backend_module.TensorRTBackend(plan, signature) as backend:
        for batch in (2, 2, 2, 3):
            _run_and_compare(backend, signature, session, batch, seed=batch)
    assert device.calls["cudaGraphLaunch"] == 0
    assert device.calls["cudaStreamBeginCapture"] == 2  # one try per batch size, then plain calls
    assert device.calls["cudaGetLastError"] == 2 and device.memory == {}


def test_one_context_and_stream_per_thread(device, unet):
    signature, plan, session = unet
    backend = backend_module.TensorRTBackend(plan, signature)
    barrier, failures = threading.Barrier(4), []

    def work(seed):
        try:
            barrier.wait()  # four live threads at once: four contexts
            for batch in (1, 2, 1):
                _run_and_compare(backend, signature, session, batch, seed)
        except Exception as error:  # noqa: BLE001 - reported below with the thread's seed
            failures.append((seed, error))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert device.calls["create_execution_context"] == 4 and device.calls["cudaStreamCreate"] == 4
    backend.close()
    backend.close()  # twice is fine
    assert (device.memory, device.streams, device.graphs) == ({}, {}, set())
    with pytest.raises(BackendError, match="unet_1: this TensorRT backend was closed"):
        _run_and_compare(backend, signature, session, 1)


def test_backend_errors_are_typed(device, unet, tmp_path):
    signature, plan, session = unet
    feeds = signature.sample_inputs(2, np.random.default_rng(0), timesteps=30)
    with backend_module.TensorRTBackend(plan, signature) as backend:
        with pytest.raises(SignatureError, match="batch 17 is outside"):
            backend.run(signature.sample_inputs(17, np.random.default_rng(0), timesteps=30))
        device.fail.add("execute_async_v3")
        with pytest.raises(BackendError, match=r"unet_1: TensorRT execution failed"):
            backend.run(feeds)
    device.fail = {"cudaMalloc"}
    with pytest.raises(BackendError, match=r"unet_1: cudaMalloc failed with CUDA error 2"):
        backend_module.TensorRTBackend(plan, signature).run(feeds)
    device.fail = {"create_execution_context"}
    with pytest.raises(BackendError, match="cannot create an execution context"):
        backend_module.TensorRTBackend(plan, signature).run(feeds)
    (tmp_path / "bad.plan").write_bytes(b"not a plan")
    with pytest.raises(BundleError, match=r"cannot deserialize .*bad\.plan \(stage unet_1\)"):
        backend_module.TensorRTBackend(tmp_path / "bad.plan", signature)
    renamed = type(signature)(signature.name, signature.inputs[:-1], signature.outputs, 1, 1, 8)
    with pytest.raises(BundleError, match=r"u\.plan has tensors .*expects"):
        backend_module.TensorRTBackend(plan, renamed)


def test_engines_from_another_version_and_lean_rules(device):
    entry = TensorRTEntry("tensorrt/sm90-10.3.0", "9.0", "10.3.0", {"unet_0": None}, version_compatible=True)
    for version in ("10.3.0", "10.13.3.9"):
        backend_module.check_engines_match(entry, "9.0", version, lean=True)
    for capability, version in (("9.0", "10.1.0"), ("9.0", "11.4.0.106"), ("8.9", "10.3.0")):
        with pytest.raises(BundleError, match="version-compatible engines were built for compute capability 9.0"):
            backend_module.check_engines_match(entry, capability, version)
    fixed = TensorRTEntry("tensorrt/sm90-10.3.0", "9.0", "10.3.0", {"unet_0": None})
    with pytest.raises(BundleError, match=r"TensorRT 10\.3\.0; this machine has .* TensorRT 10\.3\.1"):
        backend_module.check_engines_match(fixed, "9.0", "10.3.1")
    with pytest.raises(BundleError, match="lean TensorRT runtime .* runs only version-compatible engines"):
        backend_module.check_engines_match(fixed, "9.0", "10.3.0", lean=True)


def test_without_a_gpu_the_error_says_so_in_one_line(monkeypatch):
    """The driver is probed before any TensorRT object exists (the fake Runtime refuses without one)."""
    from click.testing import CliRunner

    from imagen.runtime.cli import main

    device = Device(driver=False)
    install(monkeypatch, make_tensorrt(device), make_cudart(device))
    done = CliRunner().invoke(main, ["a red circle", "--backend", "tensorrt"])
    assert done.exit_code == 2, done.output
    assert done.output.count("\n") == 1 and "TensorRT 11.4.0.106 is installed but there is no NVIDIA GPU / CUDA " \
        "driver visible (CUDA error 35 (cudaErrorInsufficientDriver)); use --backend onnxruntime" in done.output
    install(monkeypatch, make_tensorrt(device), None)
    with pytest.raises(BackendError, match=r"needs cuda-python \(pip install 'imagen-cascade\[tensorrt\]'"):
        backend_module.tensorrt_environment()
    install(monkeypatch, None, make_cudart(device))
    with pytest.raises(BackendError, match="the tensorrt package is not installed"):
        backend_module.tensorrt_environment()


def test_pipeline_on_engines_matches_onnxruntime(device, copied, monkeypatch):
    from imagen.runtime import Pipeline

    entry = _build(copied, [])
    manifest = json.loads((copied / "manifest.json").read_text())
    (copied / "manifest.json").write_text(json.dumps({**manifest, "tensorrt": entry.to_json()}, indent=2))
    engines, plain = Pipeline.load(copied, backend="tensorrt"), Pipeline.load(copied, backend="onnxruntime")
    assert (engines.backend_name, plain.backend_name) == ("tensorrt", "onnxruntime")
    got, want = (pipe("a red circle", steps=2, seed=0) for pipe in (engines, plain))
    assert np.abs(got.array.astype(int) - want.array.astype(int)).max() <= 1
    assert device.calls["cudaGraphLaunch"] > 0
    install(monkeypatch, make_tensorrt(device, lean=True), make_cudart(device))  # these engines need the full one
    assert Pipeline.load(copied, backend="auto").backend_name == "onnxruntime"
    with pytest.raises(BundleError, match="lean TensorRT runtime"):
        Pipeline.load(copied, backend="tensorrt")


# The manifest and the command line


def test_manifests_without_the_new_fields_are_written_as_before():
    demo = ROOT / "runtime" / "demo" / "manifest.json"
    assert json.dumps(Manifest.from_json(json.loads(demo.read_text())).to_json(), indent=2) == demo.read_text()
    old = {"dir": "tensorrt/sm90-10.3.0", "compute_capability": "9.0", "version": "10.3.0", "engines": {}}
    assert TensorRTEntry.from_json(old).to_json() == old
    with pytest.raises(BundleError, match="tensorrt.max_rel_error must map engine names to non-negative numbers"):
        TensorRTEntry.from_json({**old, "max_rel_error": {"unet_0": "small"}})


def test_version_compatible_option_implies_tensorrt(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from imagen.export import cli

    seen = {}
    monkeypatch.setattr(cli, "export_bundle", lambda *args, **kwargs: seen.update(kwargs))
    done = CliRunner().invoke(cli.main, ["--ckpt", str(tmp_path), "--version-compatible"])
    assert done.exit_code == 0, done.output
    assert seen["tensorrt"] is True and seen["tensorrt_version_compatible"] is True
