"""The backends with device arrays, without a GPU.

For real, on this machine's CPU: ONNX Runtime's IO binding (the code path that binds device arrays
on a GPU binds host arrays here) against `session.run`, bit for bit. Through fakes: the TensorRT
execution provider's options (a recorder for onnxruntime.InferenceSession), device arrays bound on a
CUDA session (a stand-in running the ONNX file on the CPU from fake device memory), and the TensorRT
backend's device-to-device copies (fake_cuda.py, fake_tensorrt.py). The rest is in docs/gpu.md."""

import sys
from pathlib import Path

import array_api_strict
import numpy as np
import onnxruntime as ort
import pytest

from imagen.export import tensorrt as export_trt
from imagen.runtime import backends
from imagen.runtime.arrays import NUMPY
from imagen.runtime.backends import TensorRTBackend
from imagen.runtime.backends import device as device_arrays
from imagen.runtime.backends import onnxruntime as onnxruntime_backend
from imagen.runtime.bundle import load_bundle
from imagen.runtime.errors import BackendError, SignatureError

from fake_cuda import CudaSession, Device, make_cudart
from fake_cupy import DeviceArray, DeviceNamespace, NoCopy
from fake_tensorrt import install, make_tensorrt
from threads import failures_in_threads

RNG = np.random.default_rng
InferenceSession = ort.InferenceSession  # the real one, before tests put stand-ins in its place
cupy_synchronize = device_arrays.cupy_synchronize  # likewise


def _feeds(signature, batch: int, seed: int = 0) -> dict:
    return signature.sample_inputs(batch, RNG(seed), timesteps=30)


# ONNX Runtime's IO binding on the CPU, for real


@pytest.fixture(scope="module")
def real(bundle_fp32):
    return load_bundle(bundle_fp32)


@pytest.mark.parametrize("name", ["text_encoder", "unet_0", "unet_1"])
def test_io_binding_on_the_cpu_gives_session_run_bit_for_bit(real, name):
    stage = real.stages[name]
    plain = backends.OnnxRuntimeBackend(real.path(stage.file), stage.signature, threads=1)
    bound = backends.OnnxRuntimeBackend(real.path(stage.file), stage.signature, threads=1, io_binding=True)
    assert (plain.io_binding, bound.io_binding, bound.array_namespace) == (False, True, NUMPY)
    for batch in (1, 3):
        feeds = _feeds(stage.signature, batch, seed=batch)
        want = plain.run(feeds)
        got = bound.run(feeds)
        again = bound.run(feeds)
        for spec in stage.signature.outputs:
            assert got[spec.name].shape == spec.concrete(batch) and got[spec.name].dtype == np.dtype(spec.dtype)
            assert np.array_equal(got[spec.name], want[spec.name]), (name, batch)
            assert again[spec.name] is not got[spec.name]  # a new output array every call
    if name != "text_encoder":  # a host input that is not C-contiguous is bound through a contiguous copy
        feeds = _feeds(stage.signature, 2)
        strided = {**feeds, "x": np.asfortranarray(feeds["x"])}
        assert np.array_equal(bound.run(strided)["noise_pred"], plain.run(feeds)["noise_pred"])


def test_io_binding_from_several_threads(real):
    stage = real.stages["unet_1"]
    plain = backends.OnnxRuntimeBackend(real.path(stage.file), stage.signature, threads=1)
    bound = backends.OnnxRuntimeBackend(real.path(stage.file), stage.signature, threads=1, io_binding=True)
    wanted = {seed: plain.run(_feeds(stage.signature, 1 + seed % 3, seed))["noise_pred"] for seed in range(4)}

    def work(seed):
        for _ in range(3):
            got = bound.run(_feeds(stage.signature, 1 + seed % 3, seed))["noise_pred"]
            if not np.array_equal(got, wanted[seed]):
                return float(np.abs(got - wanted[seed]).max())
        return None

    assert failures_in_threads(work) == []


def test_a_pipeline_on_io_binding_makes_the_same_images(real):
    from imagen.runtime import Pipeline

    opened = {
        name: backends.OnnxRuntimeBackend(real.path(stage.file), stage.signature, threads=1, io_binding=True)
        for name, stage in real.stages.items()
    }
    bound, plain = Pipeline(real, opened), Pipeline.load(real.root, backend="onnxruntime", threads=1)
    got, want = (pipe(["a red circle", "a blue square"], steps=2, seed=5).array for pipe in (bound, plain))
    assert got.shape == want.shape and np.array_equal(got, want)


def _cuda_onnxruntime() -> bool:
    """onnxruntime-gpu with the CUDA provider, CuPy, and a GPU for them."""
    try:
        import cupy

        return "CUDAExecutionProvider" in ort.get_available_providers() and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any reason means no usable GPU here
        return False


@pytest.mark.skipif(not _cuda_onnxruntime(), reason="needs onnxruntime-gpu, CuPy and an NVIDIA GPU")
def test_cupy_arrays_on_the_cuda_provider_give_the_cpus_outputs(real):
    import cupy

    stage = real.stages["unet_1"]
    gpu = backends.OnnxRuntimeBackend(real.path(stage.file), stage.signature, ["CUDAExecutionProvider"])
    assert gpu.io_binding and gpu.array_namespace.__name__ == "array_api_compat.cupy"
    feeds = _feeds(stage.signature, 3)
    want = InferenceSession(str(real.path(stage.file))).run(None, feeds)[0]
    got = cupy.asnumpy(gpu.run({name: cupy.asarray(value) for name, value in feeds.items()})["noise_pred"])
    error = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"CUDA provider with CuPy arrays vs CPU: max relative error {error:.2e}")
    assert error <= 1e-2  # TF32 matrix products on Ampere and later


class Recorder:
    """Stands in for onnxruntime.InferenceSession on the hand-made bundle (whose stage files are not
    ONNX): records the providers it was given and how it is run; its inputs are the stage's."""

    made: list = []
    bundle = None

    def __init__(self, path, sess_options=None, providers=None):
        self.path, self.providers, self.runs, self.bindings = Path(path), providers, 0, 0
        Recorder.made.append(self)
        stages = Recorder.bundle.stages.values()
        self.signature = next(s.signature for s in stages if Recorder.bundle.path(s.file) == self.path)

    def get_inputs(self):
        return [type("Input", (), {"name": spec.name}) for spec in self.signature.inputs]

    def get_providers(self):
        return [p if isinstance(p, str) else p[0] for p in self.providers]

    def run(self, names, feeds):
        self.runs += 1
        batch = len(next(iter(feeds.values())))
        return [np.zeros(spec.concrete(batch), spec.dtype) for spec in self.signature.outputs]

    def io_binding(self):
        self.bindings += 1
        raise RuntimeError("the recorder binds nothing")


@pytest.fixture
def recorded(fake_bundle, monkeypatch):
    """The hand-made bundle, with the Recorder in place of onnxruntime.InferenceSession."""
    Recorder.made, Recorder.bundle = [], load_bundle(fake_bundle)
    monkeypatch.setattr(ort, "InferenceSession", Recorder)
    monkeypatch.setattr(ort, "get_available_providers", lambda: TRT_EP)
    return Recorder.bundle


def test_the_cpu_default_is_session_run_with_the_cpu_provider(recorded):
    opened, chosen = backends.open_backends(recorded, "onnxruntime")
    assert chosen == "onnxruntime" and [r.providers for r in Recorder.made] == [["CPUExecutionProvider"]] * 3
    unet = opened["unet_0"]
    assert (unet.io_binding, unet.array_namespace) == (False, NUMPY)
    unet.run(_feeds(unet.stage, 2))
    assert (Recorder.made[1].runs, Recorder.made[1].bindings) == (1, 0)
    assert not (recorded.root / backends.TENSORRT_CACHE).exists()  # nothing is written into the bundle


TRT_EP = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
# Batches: 1 to the largest, tuned for the largest (what a busy server runs).
ENCODER_RANGE, RANGE = (("min", 1), ("opt", 4), ("max", 4)), (("min", 1), ("opt", 8), ("max", 8))


def test_the_tensorrt_provider_gets_the_bundles_engine_cache_and_the_signature_profiles(recorded):
    opened, _ = backends.open_backends(recorded, "onnxruntime", providers=TRT_EP)
    cache = recorded.root / backends.TENSORRT_CACHE
    options = {r.signature.name: r.providers[0] for r in Recorder.made}
    # The hand-made bundle: max batch 4 (8 Unet rows: cond + uncond), text length 8, width 4, images 8 and 16.
    common = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True"}
    encoder = {f"trt_profile_{k}_shapes": f"input_ids:{b}x8,attention_mask:{b}x8" for k, b in ENCODER_RANGE}
    assert options["text_encoder"] == ("TensorrtExecutionProvider", {**common, **encoder})

    def unet(batch, size, lowres):
        shapes = f"x:{batch}x3x{size}x{size},time:{batch},text_embeds:{batch}x8x4,text_mask:{batch}x8,text_keep:{batch}"
        return shapes + (f",lowres_cond_img:{batch}x3x{size}x{size},lowres_noise_times:{batch}" if lowres else "")

    for name, size in (("unet_0", 8), ("unet_1", 16)):
        profile = {f"trt_profile_{k}_shapes": unet(b, size, name == "unet_1") for k, b in RANGE}
        assert options[name] == ("TensorrtExecutionProvider", {**common, **profile}), name
    assert all(r.providers[1:] == TRT_EP[1:] for r in Recorder.made)
    assert not any("fp16" in key for _, o in options.values() for key in o)  # an FP32 bundle
    assert cache.is_dir() and opened["unet_1"].io_binding  # on a GPU provider: IO binding, NumPy without CuPy
    assert opened["unet_1"].array_namespace is NUMPY
    (cache / "TensorrtExecutionProvider_TRTKernel_graph_main_1_0_sm90.engine").write_bytes(b"an engine")
    (cache / "TensorrtExecutionProvider_cache_sm90.timing").write_bytes(b"timings")
    assert load_bundle(recorded.root).files == recorded.files  # the cache folder is not part of verification


def test_a_read_only_bundle_caches_engines_per_user(recorded, monkeypatch, tmp_path):
    mkdir, root = Path.mkdir, recorded.root

    def read_only(path, *args, **kwargs):
        if path.is_relative_to(root):
            raise PermissionError(30, "Read-only file system", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    backends.open_backends(recorded, "onnxruntime", providers=TRT_EP)
    folder = tmp_path / "cache" / "imagen" / "ort-tensorrt" / recorded.short_sha
    assert folder.is_dir() and {r.providers[0][1]["trt_engine_cache_path"] for r in Recorder.made} == {str(folder)}
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))  # no writable folder at all
    with pytest.raises(
        BackendError,
        match=r"no writable folder for the TensorRT execution provider's engines: .*"
        r"ort-tensorrt-cache \(Read-only file system\); .*set XDG_CACHE_HOME",
    ):
        backends.open_backends(recorded, "onnxruntime", providers=TRT_EP)


def test_provider_options_given_by_the_caller_are_kept(recorded):
    mine = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": "False"})
    stage = recorded.stages["unet_0"]
    backends.OnnxRuntimeBackend(recorded.path(stage.file), stage.signature, providers=[mine, "CPUExecutionProvider"])
    assert Recorder.made[0].providers == [mine, "CPUExecutionProvider"]
    assert not (recorded.root / backends.TENSORRT_CACHE).exists()


# Device arrays on ONNX Runtime's CUDA provider, through a stand-in session


@pytest.fixture
def cuda_session(real, monkeypatch):
    """(stage signature, a function making a backend on a CudaSession, the sessions made, the fake
    device, its cudart, the streams waited for with "CuPy")."""
    device, waited = Device(), []
    cudart = make_cudart(device)
    stage, sessions = real.stages["unet_1"], []

    def session(path, sess_options=None, providers=None):
        sessions.append(CudaSession(device, InferenceSession(str(path), providers=["CPUExecutionProvider"])))
        return sessions[-1]

    def synchronize(stream):  # CuPy's streamSynchronize, on the fake device
        waited.append(stream)
        if int(cudart.cudaStreamSynchronize(stream)[0]) != 0:
            raise RuntimeError(f"cudaErrorInvalidResourceHandle for stream {stream}")

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: TRT_EP)
    monkeypatch.setattr(onnxruntime_backend, "cupy_synchronize", synchronize)
    for name in ("cupy", "array_api_compat.cupy"):  # the fake device cannot hold CuPy's arrays
        monkeypatch.setitem(sys.modules, name, None)

    def backend(**options):
        return backends.OnnxRuntimeBackend(real.path(stage.file), stage.signature, ["CUDAExecutionProvider"], **options)

    return stage.signature, backend, sessions, device, cudart, waited


def test_device_arrays_are_bound_by_their_cuda_pointers(cuda_session):
    signature, backend, sessions, device, _, waited = cuda_session
    xp = DeviceNamespace(device)
    on_gpu = backend(array_namespace=xp)
    assert on_gpu.io_binding and on_gpu.array_namespace is xp
    for batch in (1, 3):
        feeds = _feeds(signature, batch, seed=batch)
        want = sessions[0].real.run(None, feeds)[0]
        inputs = {name: xp.asarray(value) for name, value in feeds.items()}
        out = on_gpu.run(inputs)["noise_pred"]
        assert isinstance(out, DeviceArray) and np.array_equal(out.get(), want)
        binding = sessions[0].bindings[-1]
        assert binding.inputs == {
            n: ("cuda", 0, a.dtype, a.shape, a.address) for n, a in inputs.items()
        }  # no host copy on the way in
        shape = signature.outputs[0].concrete(batch)
        assert binding.outputs == {"noise_pred": ("cuda", 0, np.dtype(np.float32), shape, out.address)}
    assert len(sessions[0].bindings) == 2 and waited == []  # one binding per call; no stream named
    host_in = {**inputs, "x": feeds["x"], "text_keep": feeds["text_keep"]}  # host and device inputs mixed
    assert np.array_equal(on_gpu.run(host_in)["noise_pred"].get(), want)
    assert [sessions[0].bindings[-1].inputs[n][0] for n in ("x", "time", "text_keep")] == ["cpu", "cuda", "cpu"]
    plain = backend()  # no CuPy here: NumPy outputs, still bound
    assert (plain.io_binding, plain.array_namespace) == (True, NUMPY)
    assert np.array_equal(plain.run(feeds)["noise_pred"], want)
    assert sessions[1].bindings[-1].outputs["noise_pred"][0] == "cpu"


def test_streams_that_device_arrays_name_are_waited_for_first(cuda_session):
    """ONNX Runtime's own streams are non-blocking: the host waits for every stream an array names,
    the legacy default stream (1) included, before the run."""
    signature, backend, sessions, device, cudart, waited = cuda_session
    _, producer = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
    on_gpu = backend(array_namespace=DeviceNamespace(device, stream=1))
    feeds = _feeds(signature, 2)
    inputs = {name: on_gpu.array_namespace.asarray(value, pending=producer) for name, value in feeds.items()}
    got = on_gpu.run(inputs)["noise_pred"].get()  # the writes queued on `producer` ran before the run
    assert np.array_equal(got, sessions[0].real.run(None, feeds)[0])
    assert waited == [int(producer), 1]
    cudart.cudaStreamDestroy(producer)
    stale = {name: on_gpu.array_namespace.asarray(value, pending=producer) for name, value in feeds.items()}
    with pytest.raises(BackendError, match=rf"unet_1: cannot wait for CUDA stream {int(producer)}: cudaError"):
        on_gpu.run(stale)


def test_device_array_layouts_and_failures_are_typed(cuda_session, monkeypatch):
    signature, backend, sessions, device, _, _ = cuda_session
    xp = DeviceNamespace(device)
    on_gpu = backend(array_namespace=xp)
    feeds = _feeds(signature, 2)
    inputs = {name: xp.asarray(value) for name, value in feeds.items()}
    want = sessions[0].real.run(None, feeds)[0]
    strided = xp.strided(feeds["x"])  # Fortran order: copied into C order by its own library first
    assert np.array_equal(on_gpu.run({**inputs, "x": strided})["noise_pred"].get(), want)
    assert sessions[0].bindings[-1].inputs["x"][4] != strided.address
    no_copy = NoCopy(xp, strided.shape, strided.dtype, strided.address, strided.strides)
    with pytest.raises(SignatureError, match=r"unet_1: x is a device array whose strides are not C order"):
        on_gpu.run({**inputs, "x": no_copy})
    with pytest.raises(SignatureError, match=r"input x must be float32, got float64"):
        on_gpu.run({**inputs, "x": xp.asarray(feeds["x"].astype(np.float64))})
    sessions[0].fail = True
    with pytest.raises(BackendError, match=r"unet_1: onnxruntime failed \(IO binding\): CUDA failure 700"):
        on_gpu.run(inputs)
    device.fail.add("empty")
    with pytest.raises(BackendError, match=r"unet_1: cannot allocate a float32 array of shape \[2, 3, 32, 32\]"):
        on_gpu.run(inputs)
    device.fail.clear()
    with pytest.raises(BackendError, match=r"array_namespace array_api_strict gives arrays without __cuda_array_inte"):
        backend(array_namespace=array_api_strict)
    with pytest.raises(BackendError, match=r"unet_1: device arrays as outputs need io_binding=True"):
        backend(array_namespace=xp, io_binding=False)
    monkeypatch.setitem(sys.modules, "cupy", None)  # the real waiter, and no CuPy to wait with
    with pytest.raises(BackendError, match=r"names CUDA stream 7 to wait for, and CuPy, which waits for it, is not"):
        buffer = device_arrays.DeviceBuffer(1, (1,), np.dtype(np.float32), stream=7)
        device_arrays.wait_for_streams([buffer], cupy_synchronize, "unet_1")


# The TensorRT backend with device arrays, on the fakes


@pytest.fixture
def fakes(monkeypatch):
    device = Device()
    cudart = make_cudart(device)
    install(monkeypatch, make_tensorrt(device), cudart)
    return device, cudart


@pytest.fixture
def engine(fakes, bundle_fp16, tmp_path):
    """(signature, plan path, ONNX Runtime session) of the super-resolution Unet's fake engine."""
    stage = load_bundle(bundle_fp16).stages["unet_1"]
    export_trt.build_engine(bundle_fp16 / "unet_1.onnx", stage.signature, tmp_path / "u.plan", tmp_path / "cache")
    return stage.signature, tmp_path / "u.plan", InferenceSession(str(bundle_fp16 / "unet_1.onnx"))


def test_device_arrays_go_device_to_device_into_fixed_buffers_and_out_as_new_arrays(fakes, engine):
    device, _ = fakes
    signature, plan, session = engine
    xp = DeviceNamespace(device)
    backend = TensorRTBackend(plan, signature, array_namespace=xp)
    kept, addresses = [], None
    for call, batch in enumerate((2, 2, 2, 4, 2, 2)):
        feeds = _feeds(signature, batch, seed=call)
        out = backend.run({name: xp.asarray(value) for name, value in feeds.items()})["noise_pred"]
        want = session.run(None, feeds)[0]
        assert isinstance(out, DeviceArray) and np.array_equal(out.get(), want), call
        kept.append((out, want))
        state = backend._states[0]
        addresses = addresses or dict(state.buffers)
        assert state.buffers == addresses and state.contexts[batch].context._addresses == addresses  # fixed
    tensors = len(signature.inputs) + len(signature.outputs)
    assert device.copies == {"cudaMemcpyDeviceToDevice": 6 * tensors}  # no host copy either way
    assert device.calls["cudaMalloc"] == tensors + 1  # and the activation block
    assert (device.calls["execute_async_v3"], device.calls["cudaGraphLaunch"]) == (4, 4)  # graphs as with NumPy
    outputs = {out.address for out, _ in kept}
    assert len(outputs) == 6 and not outputs & set(addresses.values())  # new arrays, not the buffers
    assert all(np.array_equal(out.get(), want) for out, want in kept)  # later calls left earlier outputs alone
    backend.close()
    assert (device.memory, set(device.streams)) == ({}, {1, 2})


def test_host_and_device_arrays_mix(fakes, engine):
    device, _ = fakes
    signature, plan, session = engine
    xp = DeviceNamespace(device)
    feeds = _feeds(signature, 3)
    want = session.run(None, feeds)[0]
    inputs = len(signature.inputs)
    with TensorRTBackend(plan, signature) as host_out:  # no CuPy: NumPy outputs
        assert host_out.array_namespace is NUMPY
        got = host_out.run({name: xp.asarray(value) for name, value in feeds.items()})["noise_pred"]
        assert isinstance(got, np.ndarray) and np.array_equal(got, want)
        assert device.copies == {"cudaMemcpyDeviceToDevice": inputs, "cudaMemcpyDeviceToHost": 1}
    device.copies.clear()
    with TensorRTBackend(plan, signature, array_namespace=xp) as device_out:
        assert np.array_equal(device_out.run(feeds)["noise_pred"].get(), want)
        assert device.copies == {"cudaMemcpyHostToDevice": inputs, "cudaMemcpyDeviceToDevice": 1}


def test_named_streams_are_ordered_with_events_not_host_waits(fakes, engine):
    """The backend's streams are non-blocking: work on any stream an array names (the legacy default
    stream, the per-thread one, a stream of its own) is ordered before the copies by an event recorded
    there and waited for on the backend's stream; the host waits only for the backend's own stream."""
    device, cudart = fakes
    signature, plan, session = engine
    feeds = _feeds(signature, 2)
    want = session.run(None, feeds)[0]
    _, producer = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
    for stream, pending in ((1, device.legacy), (2, producer), (int(producer), producer)):
        xp = DeviceNamespace(device, stream=stream)
        with TensorRTBackend(plan, signature, array_namespace=xp) as backend:
            device.synchronized.clear()
            device.calls.clear()
            inputs = {name: xp.asarray(value, pending=pending) for name, value in feeds.items()}  # not yet written
            assert np.array_equal(backend.run(inputs)["noise_pred"].get(), want), stream
            own = int(backend._states[0].stream)
            assert device.synchronized == [own, own]  # the warm-up before the capture, and the end of the call
            assert device.calls["cudaEventRecord"] == device.calls["cudaStreamWaitEvent"] == 2  # inputs, outputs


def test_device_array_failures_are_typed(fakes, engine):
    device, cudart = fakes
    signature, plan, session = engine
    xp = DeviceNamespace(device)
    feeds = _feeds(signature, 2)
    inputs = {name: xp.asarray(value) for name, value in feeds.items()}
    with TensorRTBackend(plan, signature, array_namespace=xp) as backend:
        strided = xp.strided(feeds["x"])
        assert np.array_equal(backend.run({**inputs, "x": strided})["noise_pred"].get(), session.run(None, feeds)[0])
        no_copy = NoCopy(xp, strided.shape, strided.dtype, strided.address, strided.strides)
        with pytest.raises(SignatureError, match=r"unet_1: input x is a device array whose strides are not C order"):
            backend.run({**inputs, "x": no_copy})
        with pytest.raises(SignatureError, match=r"input text_mask must be bool, got int64"):
            backend.run({**inputs, "text_mask": xp.asarray(feeds["text_mask"].astype(np.int64))})
        _, producer = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
        cudart.cudaStreamDestroy(producer)
        with pytest.raises(BackendError, match=r"unet_1: cudaEventRecord failed with CUDA error 1"):
            backend.run({**inputs, "x": xp.asarray(feeds["x"], pending=producer)})
        device.fail.add("empty")
        with pytest.raises(BackendError, match=r"unet_1: cannot allocate a float32 array of shape \[2, 3, 32, 32\]"):
            backend.run(inputs)
        device.fail = {"cudaMemcpyAsync"}
        with pytest.raises(BackendError, match=r"unet_1: cudaMemcpyAsync failed with CUDA error 2"):
            backend.run(inputs)
        device.fail.clear()
    with pytest.raises(BackendError, match=r"unet_1: array_namespace array_api_strict gives arrays without"):
        TensorRTBackend(plan, signature, array_namespace=array_api_strict)
