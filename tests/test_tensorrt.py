"""TensorRT without a GPU, the build and the backend against the fakes in fake_tensorrt.py: the
engine build (strongly typed, checked against ONNX Runtime, recorded in the manifest) and the
backend (fixed buffers, CUDA graphs, one stream per thread and one context per thread and batch,
typed errors; more on device arrays in test_backends_device.py, the GPU path's defects in
test_tensorrt_defects.py). What runs only on a GPU is in docs/gpu.md."""

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from imagen.export import tensorrt as export_trt
from imagen.export.bundle import TOLERANCE
from imagen.runtime import backends as backend_module
from imagen.runtime.bundle import load_bundle
from imagen.runtime.contract import Manifest, TensorRTEntry
from imagen.runtime.errors import BackendError, BundleError, SignatureError

from fake_cuda import LEGACY, PER_THREAD, Device, make_cudart
from fake_cupy import DeviceNamespace
from fake_tensorrt import install, make_tensorrt
from threads import failures_in_threads

ROOT = Path(__file__).parent.parent
DEFAULT_STREAMS = {LEGACY, PER_THREAD}  # the fake device's streams that nobody creates or destroys


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
    return [
        types.SimpleNamespace(
            name=name,
            signature=stage.signature,
            input_kwargs={"timesteps": timesteps[name]} if name in timesteps else {},
        )
        for name, stage in bundle.stages.items()
    ], bundle.manifest.stages


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
        "text_encoder.plan",
        "timing.cache",
        "unet_0.plan",
        "unet_1.plan",
    ]
    assert any("unet_1: engine rel. error 0.00e+00" in m for m in messages)


@pytest.mark.parametrize("perturb", [0.05, float("nan")])
def test_an_engine_that_differs_from_onnxruntime_is_not_written(device, copied, perturb):
    device.perturb = perturb
    with pytest.raises(
        export_trt.EngineCheckError,
        match=r"text_encoder: .*relative error (5\.0\d+e-02|inf) > "
        r"tolerance 1e-02 at batch 1; the engine was not written",
    ) as info:
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


def test_fixed_buffers_one_context_and_graph_per_batch(device, unet):
    signature, plan, session = unet
    backend = backend_module.TensorRTBackend(plan, signature)
    for batch in (2, 2, 2, 4, 2, 2):
        _run_and_compare(backend, signature, session, batch)
    tensors = len(signature.inputs) + len(signature.outputs)
    # One allocation per tensor, at batch_max (later batches copy into the same addresses), and one
    # activation block that the thread's two contexts (batches 2 and 4) share.
    assert device.calls["cudaMalloc"] == tensors + 1 and device.calls["create_execution_context"] == 2
    assert device.capture_modes == [1, 1]  # batches 2 and 4, thread-local capture
    # 2: warm-up + capture, launch, launch; 4: warm-up + capture; 2: launch, launch (its own context)
    assert (device.calls["execute_async_v3"], device.calls["cudaGraphLaunch"]) == (4, 4)
    backend.close()
    assert (device.memory, set(device.streams), device.graphs, device.events) == ({}, DEFAULT_STREAMS, set(), {})


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
    captured = 0 if failure == "cudaStreamBeginCapture" else 2  # the calls tried inside a capture
    assert (device.calls["execute_async_v3"], device.calls["create_execution_context"]) == (4 + captured, 2)


def test_one_stream_per_thread_and_one_context_per_thread_and_batch(device, unet):
    signature, plan, session = unet
    backend = backend_module.TensorRTBackend(plan, signature)

    def work(seed):  # four live threads at once, two batch sizes each: eight contexts, four streams
        for batch in (1, 2, 1):
            _run_and_compare(backend, signature, session, batch, seed)

    assert failures_in_threads(work) == []
    assert device.calls["create_execution_context"] == 8 and device.calls["cudaStreamCreateWithFlags"] == 4
    assert device.calls["cudaMalloc"] == 4 * (len(signature.inputs) + len(signature.outputs) + 1)
    backend.close()
    backend.close()  # twice is fine
    assert (device.memory, set(device.streams), device.graphs, device.events) == ({}, DEFAULT_STREAMS, set(), {})
    with pytest.raises(BackendError, match="unet_1: this TensorRT backend was closed"):
        _run_and_compare(backend, signature, session, 1)


def test_device_arrays_from_several_threads(device, unet):
    signature, plan, session = unet
    xp = DeviceNamespace(device)
    backend = backend_module.TensorRTBackend(plan, signature, array_namespace=xp)

    def work(seed):
        for batch in (1, 2, 1):
            feeds = signature.sample_inputs(batch, np.random.default_rng(seed), timesteps=30)
            got = backend.run({name: xp.asarray(value) for name, value in feeds.items()})["noise_pred"].get()
            if not np.array_equal(got, session.run(None, feeds)[0]):
                return batch
        return None

    assert failures_in_threads(work) == []
    assert device.calls["create_execution_context"] == 8 and device.calls["cudaStreamCreateWithFlags"] == 4
    assert set(device.copies) == {"cudaMemcpyDeviceToDevice"}
    backend.close()
    assert device.memory == {}


def test_the_fake_refuses_a_copy_whose_kind_does_not_match_its_pointers(device):
    """What makes 'device-to-device copies only' in the device-array tests mean something: a device
    pointer in a host-to-device copy (or the reverse) fails in the fake, as it would corrupt memory
    on a GPU."""
    cudart = sys.modules["cuda.bindings.runtime"]
    kinds, stream = cudart.cudaMemcpyKind, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)[1]
    on_device, host = device.allocate(64), np.zeros(16, np.float32)
    invalid = (
        cudart.cudaMemcpyAsync(on_device, on_device, 64, kinds.cudaMemcpyHostToDevice, stream)[0],
        cudart.cudaMemcpyAsync(host.ctypes.data, on_device, 64, kinds.cudaMemcpyDeviceToDevice, stream)[0],
        cudart.cudaMemcpyAsync(on_device, host.ctypes.data, 64, kinds.cudaMemcpyDeviceToHost, stream)[0],
    )
    assert [int(e) for e in invalid] == [1, 1, 1] and device.copies == {}
    assert int(cudart.cudaMemcpyAsync(on_device + 16, on_device, 32, kinds.cudaMemcpyDeviceToDevice, stream)[0]) == 0


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
    device.fail = {"cudaStreamCreateWithFlags"}
    with pytest.raises(BackendError, match=r"unet_1: cudaStreamCreateWithFlags failed with CUDA error 2"):
        backend_module.TensorRTBackend(plan, signature).run(feeds)
    device.fail = set()
    (tmp_path / "bad.plan").write_bytes(b"not a plan")
    with pytest.raises(BundleError, match=r"cannot deserialize .*bad\.plan \(stage unet_1\)"):
        backend_module.TensorRTBackend(tmp_path / "bad.plan", signature)
    renamed = type(signature)(signature.name, signature.inputs[:-1], signature.outputs, 1, 1, 8)
    with pytest.raises(BundleError, match=r"u\.plan has tensors .*expects"):
        backend_module.TensorRTBackend(plan, renamed)


def _gpu_with_tensorrt_and_cupy() -> bool:
    try:
        import cupy  # noqa: F401

        backend_module.tensorrt_environment()
    except Exception:  # noqa: BLE001 - any reason means no usable GPU here
        return False
    return True


@pytest.mark.skipif(not _gpu_with_tensorrt_and_cupy(), reason="needs an NVIDIA GPU with tensorrt, cuda-python and CuPy")
def test_cupy_arrays_through_a_real_engine(bundle_fp16, tmp_path):
    import cupy

    stage = load_bundle(bundle_fp16).stages["unet_1"]
    export_trt.build_engine(bundle_fp16 / "unet_1.onnx", stage.signature, tmp_path / "u.plan", tmp_path / "cache")
    feeds = stage.signature.sample_inputs(3, np.random.default_rng(0), timesteps=30)
    want = ort.InferenceSession(bundle_fp16 / "unet_1.onnx").run(None, feeds)[0]
    with backend_module.TensorRTBackend(tmp_path / "u.plan", stage.signature) as backend:
        assert backend.array_namespace.__name__ == "array_api_compat.cupy"
        for call in range(3):  # warm-up and capture, then graph replays
            got = backend.run({name: cupy.asarray(value) for name, value in feeds.items()})["noise_pred"]
            error = float(np.abs(cupy.asnumpy(got) - want).max() / np.abs(want).max())
            print(f"call {call}: engine with CuPy arrays vs ONNX Runtime (CPU): max relative error {error:.2e}")
            assert error <= TOLERANCE["fp16"]


def test_without_a_gpu_the_error_says_so_in_one_line(monkeypatch):
    """The driver is probed before any TensorRT object exists (the fake Runtime refuses without one)."""
    from click.testing import CliRunner

    from imagen.runtime.cli import main

    device = Device(driver=False)
    install(monkeypatch, make_tensorrt(device), make_cudart(device))
    done = CliRunner().invoke(main, ["a red circle", "--backend", "tensorrt"])
    assert done.exit_code == 2, done.output
    assert (
        done.output.count("\n") == 1
        and "TensorRT 11.4.0.106 is installed but there is no NVIDIA GPU / CUDA driver visible (CUDA error 35 "
        "(cudaErrorInsufficientDriver); no NVIDIA driver is installed); use --backend onnxruntime"
        in done.output
    )
    install(monkeypatch, make_tensorrt(device), None)
    with pytest.raises(
        BackendError,
        match=r"needs cuda-python \(pip install 'imagen-cascade\[tensorrt-cu13\]' \(a CUDA 13 driver\) or ",
    ):
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
    monkeypatch.setattr(cli, "export_bundle", lambda ckpt, out, options, **kwargs: seen.update(options=options))
    done = CliRunner().invoke(cli.main, ["--ckpt", str(tmp_path), "--version-compatible"])
    assert done.exit_code == 0, done.output
    assert seen["options"].builds_engines is True and seen["options"].tensorrt_version_compatible is True
