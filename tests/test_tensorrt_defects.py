"""The GPU path's defects found by reading it against TensorRT, trtexec, demo/Diffusion, CUDA and
ONNX Runtime, one regression test each, on fakes that refuse what those libraries refuse
(fake_cuda.py, fake_tensorrt.py). Each fails on the code before its fix. The CuPy-only defects
(array `repeats`, the engine check's arrays) are in test_cupy_double.py; docs/gpu.md lists every
defect, its fix and what still needs a GPU."""

import json
import logging
import re
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tomllib

from imagen.export import tensorrt as export_trt
from imagen.runtime import Pipeline
from imagen.runtime.backends import PROVIDER_SETS, OnnxRuntimeBackend, TensorRTBackend, check_providers
from imagen.runtime.backends import cuda as environment
from imagen.runtime.backends import onnxruntime as onnxruntime_backend
from imagen.runtime.bundle import load_bundle
from imagen.runtime.contract import TensorRTEntry
from imagen.runtime.errors import BackendError, BundleError

from fake_cuda import LEGACY, Device, make_cudart
from fake_cupy import DeviceNamespace
from fake_tensorrt import install, make_tensorrt

ROOT = Path(__file__).parent.parent
InferenceSession = ort.InferenceSession  # the real one, before a test puts a stand-in in its place


@pytest.fixture
def device(monkeypatch) -> Device:
    device = Device()
    install(monkeypatch, make_tensorrt(device), make_cudart(device))
    return device


@pytest.fixture
def copied(bundle_fp16, tmp_path) -> Path:
    shutil.copytree(bundle_fp16, tmp_path / "bundle")
    return tmp_path / "bundle"


def build(root: Path, **options) -> TensorRTEntry:
    """Engines for every stage of the bundle at `root`, recorded in its manifest."""
    bundle = load_bundle(root)
    timesteps = {name: schedule.timesteps for name, schedule in bundle.manifest.schedules.items()}
    stages = [
        types.SimpleNamespace(name=name, signature=stage.signature, input_kwargs={"timesteps": timesteps[name]})
        if name in timesteps
        else types.SimpleNamespace(name=name, signature=stage.signature, input_kwargs={})
        for name, stage in bundle.stages.items()
    ]
    entry = export_trt.build_engines(stages, bundle.manifest.stages, root, lambda _: None, tolerance=1e-2, **options)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "tensorrt": entry.to_json()}, indent=2))
    return entry


@pytest.fixture
def unet(device, copied, tmp_path):
    """(signature, plan path, ONNX Runtime session) of the super-resolution Unet."""
    stage = load_bundle(copied).stages["unet_1"]
    export_trt.build_engine(copied / "unet_1.onnx", stage.signature, tmp_path / "u.plan", tmp_path / "cache")
    return stage.signature, tmp_path / "u.plan", ort.InferenceSession(copied / "unet_1.onnx")


def _feeds(signature, batch: int, seed: int = 0) -> dict:
    return signature.sample_inputs(batch, np.random.default_rng(seed), timesteps=30)


def _run_and_compare(backend, signature, session, batch: int, seed: int = 0) -> None:
    feeds = _feeds(signature, batch, seed)
    assert np.array_equal(backend.run(feeds)["noise_pred"], session.run(None, feeds)[0]), (batch, seed)


# A CUDA graph replayed after set_input_shape changed its context


def test_the_fake_refuses_a_graph_replayed_after_its_context_changed(device, unet):
    """What makes the next test mean something: the fake context raises when a graph captured on it
    replays after its input shapes changed (TensorRT's guide: undefined behaviour)."""
    signature, plan, _ = unet
    cudart, trt = sys.modules["cuda.bindings.runtime"], sys.modules["tensorrt"]
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan.read_bytes())
    context, stream = engine.create_execution_context(), cudart.cudaStreamCreateWithFlags(1)[1]
    for spec in signature.inputs + signature.outputs:
        context.set_tensor_address(spec.name, cudart.cudaMalloc(4 << 20)[1])
    for batch in (2, 4):
        for spec in signature.inputs:
            context.set_input_shape(spec.name, spec.concrete(batch))
        assert context.execute_async_v3(int(stream)) and int(cudart.cudaStreamSynchronize(stream)[0]) == 0
        if batch == 2:
            cudart.cudaStreamBeginCapture(stream, 1)
            assert context.execute_async_v3(int(stream))
            graph = cudart.cudaGraphInstantiate(cudart.cudaStreamEndCapture(stream)[1], 0)[1]
    cudart.cudaGraphLaunch(graph, stream)
    with pytest.raises(RuntimeError, match="replayed after set_input_shape changed its context"):
        cudart.cudaStreamSynchronize(stream)


def test_each_batch_size_has_its_own_context_and_graph(device, unet):
    signature, plan, session = unet
    with TensorRTBackend(plan, signature) as backend:
        for call, batch in enumerate((2, 2, 4, 4, 2, 2, 1)):
            _run_and_compare(backend, signature, session, batch, seed=call)
        contexts = backend._states[0].contexts
        assert sorted(contexts) == [1, 2, 4] and all(entry.graph is not None for entry in contexts.values())
        memory = {entry.context._memory for entry in contexts.values()}
        assert memory == {(int(backend._states[0].activations), 4096)}  # one shared activation block
    # batches 2, 4 and 1: a warm-up and a capture each; the other four calls replay their graphs
    assert (device.calls["execute_async_v3"], device.calls["cudaGraphLaunch"]) == (6, 4)


# Capture on a blocking stream, and stream order without blocking streams


def test_the_fake_refuses_legacy_stream_work_while_a_blocking_stream_captures(device):
    cudart = sys.modules["cuda.bindings.runtime"]
    blocking, non_blocking = cudart.cudaStreamCreate()[1], cudart.cudaStreamCreateWithFlags(1)[1]
    for stream, want in ((blocking, 906), (non_blocking, 0)):  # cudaErrorStreamCaptureImplicit
        cudart.cudaStreamBeginCapture(stream, 1)
        assert int(cudart.cudaStreamSynchronize(LEGACY)[0]) == want
        cudart.cudaStreamEndCapture(stream)


def test_a_capture_leaves_the_legacy_stream_to_other_threads(device, unet):
    """Another thread works on the legacy default stream (as CuPy does by default) while the backend
    captures: allowed, because the backend's streams are non-blocking."""
    signature, plan, session = unet
    cudart, errors = sys.modules["cuda.bindings.runtime"], []

    def other_thread():
        work = threading.Thread(target=lambda: errors.append(int(cudart.cudaStreamSynchronize(LEGACY)[0])))
        work.start()
        work.join()

    device.on_capture = other_thread
    with TensorRTBackend(plan, signature) as backend:
        for batch in (2, 2):
            _run_and_compare(backend, signature, session, batch)
        flags = {device.streams[int(state.stream)].flags for state in backend._states}
    assert errors == [0] and flags == {cudart.cudaStreamNonBlocking}
    assert device.calls["cudaGraphLaunch"] == 1  # the capture was not invalidated


# Version-compatible engines without their lean runtime


def test_version_compatible_engines_run_only_on_the_version_that_built_them(device, copied, monkeypatch):
    entry = build(copied, version_compatible=True)
    assert entry.version == "11.4.0.106"
    assert all(plan["flags"] == ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"] for plan in device.plans)
    install(monkeypatch, make_tensorrt(device, version="11.5.0.1", lean=True), make_cudart(device))  # later 11.x
    with pytest.raises(
        BundleError,
        match=r"built for compute capability 9\.0 with TensorRT 11\.4\.0\.106; this machine has compute capability "
        r"9\.0 and TensorRT 11\.5\.0\.1; they run only on the exact TensorRT version they were built with: "
        r"install TensorRT 11\.4\.0\.106 \(full or lean\)",
    ):
        Pipeline.load(copied, backend="tensorrt")
    assert Pipeline.load(copied, backend="auto").backend_name == "onnxruntime"
    install(monkeypatch, make_tensorrt(device, lean=True), make_cudart(device))  # the lean runtime of 11.4.0.106
    with Pipeline.load(copied, backend="tensorrt") as pipe:
        assert pipe.backend_name == "tensorrt" and pipe("a red circle", steps=1, seed=0).array.shape[0] == 1


def test_every_engine_needs_the_exact_version_and_the_lean_runtime_a_compatible_one():
    compatible = TensorRTEntry("tensorrt/sm90-10.3.0", "9.0", "10.3.0", {"unet_0": None}, version_compatible=True)
    fixed = TensorRTEntry("tensorrt/sm90-10.3.0", "9.0", "10.3.0", {"unet_0": None})
    for entry in (compatible, fixed):
        environment.check_engines_match(entry, "9.0", "10.3.0")
        for capability, version in (("9.0", "10.3.1"), ("9.0", "10.13.3.9"), ("9.0", "11.4.0.106"), ("8.9", "10.3.0")):
            with pytest.raises(BundleError, match="run only on the exact TensorRT version they were built with"):
                environment.check_engines_match(entry, capability, version, lean=entry.version_compatible)
    environment.check_engines_match(compatible, "9.0", "10.3.0", lean=True)
    with pytest.raises(BundleError, match="lean TensorRT runtime .* runs only version-compatible engines"):
        environment.check_engines_match(fixed, "9.0", "10.3.0", lean=True)


# onnxruntime and onnxruntime-gpu installed together; CUDA 12 and 13


def test_both_onnxruntime_builds_refuse_gpu_providers_naming_the_fix(monkeypatch):
    assert onnxruntime_backend.onnxruntime_builds() == ("onnxruntime",)  # this machine: the CPU build alone
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.17'"
    monkeypatch.setattr(onnxruntime_backend, "onnxruntime_builds", lambda: ("onnxruntime", "onnxruntime-gpu"))
    for providers in ("auto", PROVIDER_SETS["cuda"], PROVIDER_SETS["tensorrt"]):
        with pytest.raises(
            BackendError, match=r"onnxruntime and onnxruntime-gpu are installed together.*" + re.escape(fix)
        ):
            check_providers(providers)
    check_providers(None)  # the CPU runs on either build
    with pytest.raises(BackendError, match="installed together"):
        Pipeline.load(providers="auto")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["onnxruntime-gpu>=1.17"] and fix in (ROOT / "docs" / "gpu.md").read_text()


def test_cuda_12_and_13_each_have_their_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major, cupy in ((12, "cupy-cuda12x>=13.0"), (13, "cupy-cuda13x>=13.6")):
        python = f"cuda-python>={major}.0,<{major + 1}"
        assert extras[f"tensorrt-cu{major}"][1] == extras[f"tensorrt-lean-cu{major}"][1] == python
        assert extras[f"tensorrt-cu{major}"][0].startswith(f"tensorrt-cu{major}>=")
        assert extras[f"tensorrt-lean-cu{major}"][0].startswith(f"tensorrt-lean-cu{major}>=")
        assert extras[f"cuda{major}"] == [cupy]
    assert (extras["tensorrt"], extras["cuda"]) == (["imagen-cascade[tensorrt-cu13]"], ["imagen-cascade[cuda13]"])


def test_a_driver_older_than_the_cuda_libraries_is_named_with_the_fix(monkeypatch):
    device = Device(driver=False, driver_version=12040, runtime_version=13000)
    install(monkeypatch, make_tensorrt(device), make_cudart(device))
    with pytest.raises(
        BackendError,
        match=r"no NVIDIA GPU / CUDA driver visible \(CUDA error 35 \(cudaErrorInsufficientDriver\); the driver "
        r"supports CUDA 12\.4 and cuda-python here is built for CUDA 13\.0: install the CUDA 12 builds \(pip install "
        r"'imagen-cascade\[tensorrt-cu12\]'\), or a driver for CUDA 13\); use --backend onnxruntime",
    ):
        environment.tensorrt_environment()


# Profiles tuned for the batch that runs; the TensorRT provider's FP16


def test_engines_and_the_tensorrt_provider_are_tuned_for_the_batch_a_busy_server_runs(device, copied, monkeypatch):
    build(copied)
    opt = {
        Path(plan["onnx"]).stem: {name: shapes[1][0] for name, shapes in plan["profile"].items()}
        for plan in device.plans
    }
    bundle = load_bundle(copied)
    assert bundle.max_batch == 4 and opt["text_encoder"] == {"input_ids": 4, "attention_mask": 4}
    assert all(set(opt[unet.name].values()) == {8} for unet in bundle.unets)  # 4 images, cond and uncond rows
    made = {}

    class Recorder:  # stands in for a session on the TensorRT provider, recording its options
        def __init__(self, path, sess_options=None, providers=None):
            self.real, self.providers = InferenceSession(str(path)), providers
            made[Path(path).stem] = providers[0]

        def get_inputs(self):
            return self.real.get_inputs()

        def get_providers(self):
            return onnxruntime_backend.provider_names(self.providers)

    monkeypatch.setattr(ort, "InferenceSession", Recorder)
    monkeypatch.setattr(ort, "get_available_providers", lambda: PROVIDER_SETS["tensorrt"])
    Pipeline.load(copied, backend="onnxruntime", providers=PROVIDER_SETS["tensorrt"]).close()
    assert [s.precision for s in bundle.stages.values()] == ["fp32", "fp16", "fp16"]
    for stage in bundle.stages.values():
        provider, options = made[stage.name]
        assert provider == "TensorrtExecutionProvider"
        assert options.get("trt_fp16_enable") == ("True" if stage.precision == "fp16" else None), stage.name
        rows = 4 if stage.name == "text_encoder" else 8
        assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"], stage.name
        assert set(re.findall(r":(\d+)", options["trt_profile_opt_shapes"])) == {str(rows)}, stage.name


# Smaller: the warm-up before capture, close(), the timing cache, constant inputs


def test_the_capture_begins_after_the_warm_up_has_run(device, unet):
    signature, plan, session = unet
    synchronized_at_capture = []
    device.on_capture = lambda: synchronized_at_capture.append(list(device.synchronized))
    with TensorRTBackend(plan, signature) as backend:
        for batch in (2, 2):
            _run_and_compare(backend, signature, session, batch)
        own = int(backend._states[0].stream)
    assert synchronized_at_capture == [[own]] and device.calls["cudaGraphLaunch"] == 1


def test_close_releases_every_backend(device, copied, bundle_fp32):
    stage = load_bundle(bundle_fp32).stages["unet_0"]
    onnxruntime = OnnxRuntimeBackend(bundle_fp32 / stage.file.file, stage.signature, threads=1)
    onnxruntime.close()
    with pytest.raises(BackendError, match="unet_0: this ONNX Runtime backend was closed"):
        onnxruntime.run(_feeds(stage.signature, 1))
    build(copied)
    with Pipeline.load(copied, backend="tensorrt") as pipe:
        pipe("a red circle", steps=1, seed=0)
        assert device.memory != {}
    assert device.memory == {} and device.graphs == set() and device.events == {}


def test_a_timing_cache_from_another_gpu_is_replaced(device, copied, tmp_path, caplog):
    stage = load_bundle(copied).stages["unet_0"]
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"other-gpu timings")
    with caplog.at_level(logging.WARNING):
        export_trt.build_engine(copied / "unet_0.onnx", stage.signature, tmp_path / "u.plan", cache)
    assert cache.read_bytes() == b"+" and (tmp_path / "u.plan").is_file()  # a fresh cache, filled and written
    assert "unet_0: TensorRT refused the timing cache" in caplog.text


def test_constant_inputs_stay_in_their_buffers(device, unet):
    """As GuidedDenoiser feeds a Unet: the conditioning arrays are the same objects at every step, x
    and time are new. Those are copied once; a new object, or any host array, is copied again."""
    signature, plan, session = unet
    xp = DeviceNamespace(device, stream=LEGACY)
    feeds = _feeds(signature, 2)
    constant = {name: xp.asarray(value) for name, value in feeds.items() if name not in ("x", "time")}
    with TensorRTBackend(plan, signature, array_namespace=xp) as backend:
        for step in range(3):
            step_feeds = _feeds(signature, 2, seed=step)
            feeds = {**{n: step_feeds[n] for n in constant}, "x": step_feeds["x"], "time": step_feeds["time"]}
            got = backend.run({**constant, "x": xp.asarray(feeds["x"]), "time": xp.asarray(feeds["time"])})
            want = session.run(None, {**_feeds(signature, 2), "x": feeds["x"], "time": feeds["time"]})[0]
            assert np.array_equal(got["noise_pred"].get(), want), step
        # inputs: all 7, then x and time twice; outputs: one each call
        assert device.copies == {"cudaMemcpyDeviceToDevice": len(signature.inputs) + 2 * 2 + 3}
        changed = {**constant, "text_embeds": xp.asarray(feeds["text_embeds"])}  # a new object: copied
        host = {name: value.get() for name, value in changed.items()}  # host arrays: always copied
        host["lowres_noise_times"][:] = 7.0  # written in place between calls
        for inputs in (changed, host, host):
            inputs = {**inputs, "x": xp.asarray(feeds["x"]), "time": xp.asarray(feeds["time"])}
            want = session.run(None, {n: (v.get() if hasattr(v, "get") else v) for n, v in inputs.items()})[0]
            assert np.array_equal(backend.run(inputs)["noise_pred"].get(), want)
