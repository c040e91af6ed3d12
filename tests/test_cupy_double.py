"""The GPU path in a CuPy-faithful double (fake_cupy.CupyDouble) on the fake TensorRT: the double
refuses what CuPy refuses (implicit host conversion, NumPy arrays in its arithmetic, array `repeats`)
and counts the Python scalars pulled from device arrays. With it importable as CuPy's array API
namespace (`array_api_compat.cupy`), the TensorRT backend returns its arrays, and the pipeline,
imagen-serve's and the Ray app's batch path, and the export's engine check run through it. Two
defects that array-api-strict let through fail here on the code before their fixes: the batch path
passing `repeats` to `xp.repeat` as an array, and the engine check comparing the engine's device
arrays with NumPy's."""

import asyncio
import inspect
import io
import json
import shutil
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen.export import tensorrt as export_trt
from imagen.runtime import Pipeline
from imagen.runtime.backends.device import cupy_namespace
from imagen.runtime.bundle import load_bundle
from imagen.runtime.serve import engine

from fake_cuda import Device, make_cudart
from fake_cupy import CupyDouble
from fake_tensorrt import install, make_tensorrt

PROMPTS = ("a small red circle on the left", "a large blue square")


def _stages(root: Path) -> list:
    bundle = load_bundle(root)
    timesteps = {name: schedule.timesteps for name, schedule in bundle.manifest.schedules.items()}
    return [
        types.SimpleNamespace(
            name=name,
            signature=stage.signature,
            input_kwargs={"timesteps": timesteps[name]} if name in timesteps else {},
        )
        for name, stage in bundle.stages.items()
    ]


@pytest.fixture
def double(monkeypatch) -> tuple[Device, CupyDouble]:
    """The fake GPU with the fake TensorRT, and the double installed where CuPy's namespace is imported."""
    device = Device()
    install(monkeypatch, make_tensorrt(device), make_cudart(device))
    xp = CupyDouble(device)
    monkeypatch.setitem(sys.modules, "array_api_compat.cupy", xp)
    monkeypatch.delitem(sys.modules, "cupy")  # array_api_compat's type checks look for it there: not imported
    assert cupy_namespace() is xp
    return device, xp


@pytest.fixture
def engines(double, bundle_fp16, tmp_path) -> Path:
    """A copy of the FP16 bundle with engines built (and checked) with the double importable."""
    root = tmp_path / "bundle"
    shutil.copytree(bundle_fp16, root)
    bundle = load_bundle(root)
    entry = export_trt.build_engines(_stages(root), bundle.manifest.stages, root, lambda _: None, tolerance=1e-2)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "tensorrt": entry.to_json()}, indent=2))
    return root


def test_the_double_refuses_what_cupy_refuses():
    xp = CupyDouble()
    x = xp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host = np.ones((2, 3), np.float32)
    for refused, error in (
        (lambda: np.asarray(x), "Implicit conversion to a NumPy array is not allowed"),
        (lambda: np.mean(x), "Implicit conversion to a NumPy array is not allowed"),
        (lambda: x + host, "Unsupported type <class 'numpy.ndarray'>"),
        (lambda: host * x, "Unsupported type <class 'numpy.ndarray'>"),
        (lambda: xp.concat([x, host]), "Unsupported type <class 'numpy.ndarray'>"),
        (lambda: np.from_dlpack(x), "in GPU memory"),
        (lambda: xp.repeat(x, xp.asarray([1, 2]), axis=0), "cannot be specified as `repeats` argument"),
        (lambda: xp.repeat(x, np.array([1, 2]), axis=0), "cannot be specified as `repeats` argument"),
    ):
        with pytest.raises((TypeError, ValueError, BufferError), match=error):
            refused()
    np.testing.assert_array_equal(xp.repeat(x, [1, 2], axis=0).get(), np.repeat(x.get(), [1, 2], axis=0))
    np.testing.assert_array_equal((x * np.float32(2) + 1.0).get(), x.get() * 2 + 1)  # NumPy scalars are fine
    assert bool(xp.all(x < 6)) and float(x[1, 2]) == 5.0 and x[0, 1].item() == 1.0 and int(x[1, 0]) == 3
    assert xp.scalars == {"bool": 1, "float": 1, "item": 1, "int": 1} and xp.uploads == 2  # x, and [1, 2]
    assert not hasattr(x, "__cuda_array_interface__")  # no fake device: nothing a backend could read


def test_the_export_engine_check_compares_on_the_host(double, engines):
    """With CuPy importable, the engine check's backend would default to CuPy's namespace; its outputs
    are compared with ONNX Runtime's NumPy outputs, so they are taken on the host."""
    device, xp = double
    entry = load_bundle(engines).manifest.tensorrt
    assert entry.max_rel_error == {"text_encoder": 0.0, "unet_0": 0.0, "unet_1": 0.0}
    assert xp.downloads == [] and len(device.plans) == 3


def _images(pipe, settings) -> np.ndarray:
    return pipe(list(PROMPTS), num_images_per_prompt=2, seed=11, **settings).array


def test_the_pipeline_on_engines_stays_in_the_double(double, engines):
    device, xp = double
    settings = dict(steps=3, sampler="ddim", guidance_scale=3.0)
    with Pipeline.load(engines, backend="onnxruntime", threads=1) as plain:
        want = _images(plain, settings)
    with Pipeline.load(engines, backend="tensorrt") as pipe:
        assert pipe.xp is xp and all(backend.array_namespace is xp for backend in pipe.backends.values())
        xp.scalars.clear()
        device.copies.clear()  # the engine check's host copies
        result = pipe(list(PROMPTS), num_images_per_prompt=2, seed=11, **settings)
        got = result.array
        calls = result.info[0]["timings"]["engine_calls"]
        assert xp.downloads == [got.shape]  # only the final images come back to the host
        # one finite check per engine call and per Unet's result, nothing else pulled from the GPU
        assert xp.scalars == {"bool": calls + len(pipe.bundle.unets)}
        assert device.calls["cudaGraphLaunch"] > 0 and set(device.copies) == {"cudaMemcpyDeviceToDevice"}
    difference = np.abs(got.astype(int) - want.astype(int)).max()
    print(f"engines in the double vs ONNX Runtime (CPU): max difference {difference} of 255")
    assert got.shape == want.shape == (4, 32, 32, 3) and difference <= 1
    assert device.memory == {}  # Pipeline.close freed every engine's device memory


def _batch(pipe) -> list:
    """Two requests of different counts and seeds, as imagen-serve gathers them into one batch."""
    return [engine.prepare(pipe, PROMPTS[0], 2, seed=1, steps=2), engine.prepare(pipe, PROMPTS[1], 1, seed=2, steps=2)]


def _decoded(images) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(png))) for result in images for png in result.pngs])


def test_the_serving_batch_path_in_the_double(double, engines):
    """imagen-serve's engine batch: requests with their own counts, so the text rows repeat unevenly."""
    with Pipeline.load(engines, backend="onnxruntime", threads=1) as plain:
        want = _decoded(engine.run_batch(plain, _batch(plain)))
    with Pipeline.load(engines, backend="tensorrt") as pipe:
        got = _decoded(engine.run_batch(pipe, _batch(pipe)))
    assert got.shape == want.shape == (3, 32, 32, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_the_ray_batch_path_in_the_double(double, engines):
    """The Ray app's batch method itself (its `@serve.batch` wrapper aside) on what it uses of a
    replica (the pipeline and the engine thread), without a Ray cluster."""
    pytest.importorskip("ray", reason="ray[serve] not installed: pip install 'imagen-cascade[ray]'")
    from imagen.runtime.serve import ray as ray_app

    generate_batch = inspect.unwrap(ray_app.ImagenDeployment.func_or_class.generate_batch)
    with Pipeline.load(engines, backend="onnxruntime", threads=1) as plain:
        want = _decoded(engine.run_batch(plain, _batch(plain)))
    with Pipeline.load(engines, backend="tensorrt") as pipe:
        replica = types.SimpleNamespace(pipe=pipe, _executor=ThreadPoolExecutor(max_workers=1))  # what it uses
        try:
            outcomes = asyncio.run(generate_batch(replica, [ray_app.Pending(request) for request in _batch(pipe)]))
        finally:
            replica._executor.shutdown()
    assert [type(outcome).__name__ for outcome in outcomes] == ["Images", "Images"]
    got = _decoded(outcomes)
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
