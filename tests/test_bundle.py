"""Bundle verification (runtime/bundle.py, docs/reliability.md items 1-4): the hand-made bundle
verifies; broken files, manifests and paths raise a BundleError naming what is wrong before any
session or engine exists; external data and TensorRT engines are held to the same rules; and the
typed manifest writes back exactly what it read."""

import json
import shutil
from pathlib import Path

import pytest

from imagen.runtime import Pipeline, load_bundle
from imagen.runtime.backends import cuda as environment_module
from imagen.runtime.backends import tensorrt as tensorrt_module
from imagen.runtime.contract import Manifest
from imagen.runtime.errors import BackendError, BundleError

from bundles import LENGTH, SIZES, WIDTH, edit_manifest, external_data_model, make_bundle, sha, with_engines

DEMO_MANIFEST = Path(__file__).resolve().parents[1] / "runtime" / "demo" / "manifest.json"


@pytest.fixture
def no_sessions(monkeypatch):
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("an InferenceSession was created before the bundle was verified")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def test_hand_made_bundle_verifies(fake_bundle):
    bundle = load_bundle(fake_bundle)
    assert list(bundle.stages) == ["text_encoder", "unet_0", "unet_1"]
    assert bundle.max_batch == 4 and bundle.manifest.image_sizes == SIZES
    assert bundle.short_sha == sha((fake_bundle / "manifest.json").read_bytes())[:16]


def _corrupt_sha(root):
    (root / "unet_0.onnx").write_bytes(b"X" * (root / "unet_0.onnx").stat().st_size)


def _truncate(root):
    data = (root / "unet_1.onnx").read_bytes()
    (root / "unet_1.onnx").write_bytes(data[:-3])


def _escape_symlink(root):
    outside = root.parent / "outside.onnx"
    outside.write_bytes((root / "unet_0.onnx").read_bytes())
    (root / "unet_0.onnx").unlink()
    (root / "unet_0.onnx").symlink_to(outside)


def _remove_stage(root):
    edit_manifest(root, lambda m: m["stages"].pop("unet_1"))


def _set(path, value):
    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _width(manifest):
    manifest["stages"]["unet_1"]["inputs"][2]["shape"] = ["batch", LENGTH, WIDTH + 1]


def _lowres_on_base(manifest):
    manifest["stages"]["unet_0"]["inputs"] = manifest["stages"]["unet_1"]["inputs"][:]
    for spec in manifest["stages"]["unet_0"]["inputs"]:
        if spec["name"] in ("x", "lowres_cond_img"):
            spec["shape"] = ["batch", 3, 8, 8]


BROKEN = {
    "wrong sha256": (_corrupt_sha, r"unet_0\.onnx.*sha256 [0-9a-f]{64}.*expects [0-9a-f]{64}.*re-export"),
    "truncated file": (_truncate, r"unet_1\.onnx.*has \d+ bytes.*expects \d+.*re-export"),
    "symlink escaping": (_escape_symlink, r"unet_0\.onnx.*outside the bundle"),
    "missing stage": (_remove_stage, r"manifest\.json.*stage 'unet_1' is missing"),
    "unknown version": (
        lambda r: edit_manifest(r, _set(["format_version"], 3)),
        r"manifest\.json.*format_version 3.*supported: 1, 2.*re-export",
    ),
    "not json": (lambda r: (r / "manifest.json").write_text("{nope"), r"manifest\.json is not valid JSON"),
    "dotdot path": (
        lambda r: edit_manifest(r, _set(["stages", "unet_0", "file"], "../unet_0.onnx")),
        r"'\.\./unet_0\.onnx' contains '\.\.'",
    ),
    "absolute path": (
        lambda r: edit_manifest(r, _set(["stages", "unet_0", "file"], str(r / "unet_0.onnx"))),
        r"unet_0\.onnx.*absolute path",
    ),
    "missing file": (lambda r: (r / "text_encoder.onnx").unlink(), r"text_encoder\.onnx.*missing"),
    "embed width": (lambda r: edit_manifest(r, _width), r"unet_1\.onnx.*text_embeds of width 5.*width 4"),
    "wrong image size": (lambda r: edit_manifest(r, _set(["image_sizes"], [8, 32])), r"unet_1"),
    "lowres inputs on base": (lambda r: edit_manifest(r, _lowres_on_base), r"unet_0\.onnx.*lowres_cond_img"),
    "wrong dtype": (
        lambda r: edit_manifest(r, _set(["stages", "unet_0", "inputs", 3, "dtype"], "int64")),
        r"unet_0\.onnx.*text_mask is int64.*expects bool",
    ),
    "not an imagen bundle": (lambda r: edit_manifest(r, _set(["format"], "other")), r"not 'imagen-bundle'"),
    "missing manifest": (lambda r: (r / "manifest.json").unlink(), r"no manifest\.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_bundles_raise_bundle_error_before_any_session(case, fake_bundle, no_sessions):
    breaker, pattern = BROKEN[case]
    breaker(fake_bundle)
    with pytest.raises(BundleError, match=pattern):
        load_bundle(fake_bundle)
    with pytest.raises(BundleError, match=pattern):
        Pipeline.load(fake_bundle, backend="onnxruntime")


def test_tokenizer_files_are_hashed(fake_bundle):
    (fake_bundle / "tokenizer").mkdir()
    (fake_bundle / "tokenizer" / "spiece.model").write_bytes(b"model")
    entry = {"file": "tokenizer/spiece.model", "bytes": 5, "sha256": sha(b"other")}
    edit_manifest(fake_bundle, _set(["tokenizer", "files"], {"spiece.model": entry}))
    with pytest.raises(BundleError, match=r"spiece\.model.*sha256"):
        load_bundle(fake_bundle)


def test_missing_bundle_and_demo(tmp_path, monkeypatch):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    from imagen.runtime import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "DEMO_BUNDLE", tmp_path / "no-demo")
    with pytest.raises(BundleError, match="no built-in demo bundle.*--bundle PATH"):
        Pipeline.load()


@pytest.mark.parametrize("source", ["demo", "bundle_fp32"])
def test_typed_manifest_writes_back_the_bytes_it_read(source, request):
    """export writes json.dumps(manifest.to_json(), indent=2); reading and writing again changes nothing."""
    path = DEMO_MANIFEST if source == "demo" else request.getfixturevalue(source) / "manifest.json"
    text = path.read_text(encoding="utf-8")
    assert json.dumps(Manifest.from_json(json.loads(text)).to_json(), indent=2) == text


# External data: the manifest's entries, and the locations inside an .onnx file


@pytest.mark.parametrize(
    "location,pattern",
    [("../w.data", "contains '..'"), ("/tmp/w.data", "absolute path"), ("link.data", "outside the bundle")],
)
def test_manifest_external_data_paths_must_stay_inside(tmp_path, location, pattern):
    root = make_bundle(tmp_path / "bundle")
    (tmp_path / "w.data").write_bytes(b"weights")
    (root / "link.data").symlink_to(tmp_path / "w.data")
    entry = {"file": location, "bytes": 7, "sha256": sha(b"weights")}
    edit_manifest(root, lambda m: m["stages"]["unet_1"].update(external_data=[entry]))
    with pytest.raises(BundleError, match=rf"stage unet_1 external data 0.*{pattern}"):
        load_bundle(root)


@pytest.mark.parametrize("location", ["../outside.bin", "ABSOLUTE", "link.bin"])
def test_onnx_external_data_leaving_the_model_folder_is_refused(tmp_path, location):
    pytest.importorskip("onnx")
    from imagen.runtime.backends import OnnxRuntimeBackend
    from imagen.runtime.contract import StageSignature, TensorSpec

    folder = tmp_path / "bundle"
    location = str(tmp_path / "outside.bin") if location == "ABSOLUTE" else location
    external_data_model(folder, location)
    shutil.copy(folder / "w.bin", tmp_path / "outside.bin")
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    stage = StageSignature("unet_0", (TensorSpec("x", "float32", (4,)),), (TensorSpec("y", "float32", (4,)),), 1, 1, 1)
    with pytest.raises(BackendError, match=r"onnxruntime cannot load .*m\.onnx \(stage unet_0\)"):
        OnnxRuntimeBackend(folder / "m.onnx", stage, threads=1)


# TensorRT engines: verified like the other files, and built for this TensorRT version and GPU


@pytest.fixture
def trt_bundle(tmp_path):
    return with_engines(make_bundle(tmp_path / "bundle"))


@pytest.fixture
def no_engines(monkeypatch):
    """No TensorRT engine may be deserialised and no onnxruntime session created."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("an engine or session was created")

    monkeypatch.setattr(tensorrt_module, "TensorRTBackend", refuse)
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _fake_gpu(monkeypatch, capability: str, version: str):
    monkeypatch.setattr(environment_module, "tensorrt_environment", lambda: (None, None, capability, version))


@pytest.mark.parametrize("capability,version", [("8.9", "10.3.0"), ("9.0", "10.0.1"), ("8.6", "8.6.1")])
def test_tensorrt_mismatch_names_both_and_says_rebuild(trt_bundle, no_engines, monkeypatch, capability, version):
    _fake_gpu(monkeypatch, capability, version)
    with pytest.raises(BundleError) as info:
        Pipeline.load(trt_bundle, backend="tensorrt")
    message = str(info.value)
    assert "compute capability 9.0 with TensorRT 10.3.0" in message
    assert f"compute capability {capability} and TensorRT {version}" in message
    assert "rebuild" in message and "imagen-export --tensorrt" in message


def test_tensorrt_engines_are_verified_before_deserialisation(trt_bundle, no_engines, monkeypatch):
    _fake_gpu(monkeypatch, "9.0", "10.3.0")
    plan = next((trt_bundle / "tensorrt").glob("*/unet_1.plan"))
    plan.write_bytes(plan.read_bytes()[:-2])
    with pytest.raises(BundleError, match=r"unet_1\.plan \(TensorRT engine unet_1\) has \d+ bytes.*expects"):
        Pipeline.load(trt_bundle, backend="tensorrt")
    plan.write_bytes(b"X" * (plan.stat().st_size + 2))
    with pytest.raises(BundleError, match=r"unet_1\.plan.*sha256 [0-9a-f]{64}, the manifest expects"):
        Pipeline.load(trt_bundle, backend="tensorrt")


def test_tensorrt_engine_paths_must_stay_inside(trt_bundle, no_engines, monkeypatch):
    _fake_gpu(monkeypatch, "9.0", "10.3.0")
    edit_manifest(trt_bundle, lambda m: m["tensorrt"]["engines"]["unet_0"].update(file="../unet_0.plan"))
    for backend in ("tensorrt", "onnxruntime"):  # checked even when the engines are not used
        with pytest.raises(BundleError, match=r"'\.\./unet_0\.plan' contains '\.\.'"):
            Pipeline.load(trt_bundle, backend=backend)


def test_auto_backend_falls_back_to_onnxruntime_on_a_mismatch(bundle_fp32, tmp_path, monkeypatch):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_fp32, root)
    with_engines(root, "9.0", "10.3.0")
    _fake_gpu(monkeypatch, "8.0", "10.3.0")
    monkeypatch.setattr(tensorrt_module, "TensorRTBackend", lambda *a, **k: pytest.fail("engine deserialised"))
    pipe = Pipeline.load(root, backend="auto", threads=1)
    assert pipe.backend_name == "onnxruntime"
    assert pipe("a red circle", steps=1, seed=0).info[0]["backend"] == "onnxruntime"


def _gpu_with_tensorrt() -> bool:
    try:
        from imagen.runtime.backends import tensorrt_environment

        tensorrt_environment()
    except Exception:  # noqa: BLE001 - any reason means no usable GPU here
        return False
    return True


@pytest.mark.skipif(not _gpu_with_tensorrt(), reason="needs an NVIDIA GPU with tensorrt and cuda-python")
def test_real_engines_from_another_tensorrt_version_are_refused_on_a_gpu(tiny_run, tmp_path):
    from imagen.export.bundle import export_bundle

    root = tmp_path / "bundle"
    export_bundle(tiny_run, root, tensorrt=True, max_batch=2)
    assert Pipeline.load(root, backend="tensorrt").backend_name == "tensorrt"
    edit_manifest(root, lambda m: m["tensorrt"].update(version="0.0.0"))
    with pytest.raises(BundleError, match=r"TensorRT 0\.0\.0.*rebuild them here with imagen-export --tensorrt"):
        Pipeline.load(root, backend="tensorrt")
