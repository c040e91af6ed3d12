"""imagen-export: ONNX checks, parity at FP32 and FP16, batch sizes, the manifest, atomicity."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from imagen.export import staging as staging_module
from imagen.export.bundle import export_bundle
from imagen.export.cli import main as export_cli
from imagen.export.errors import ExportError
from imagen.export.tensorrt import TensorRTUnavailable, tensorrt_target
from imagen.runtime.backends.feeds import engine_profile
from imagen.runtime.contract import TensorSpec, unet_signature

from runs import tiny_t5_folder, write_minimagen_directory

SCHEMA = Path(__file__).parent.parent / "docs" / "manifest.schema.json"


def manifest_of(bundle):
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("name", ["bundle_fp32", "bundle_fp16"])
def test_manifest_validates_and_hashes_match(name, request):
    import jsonschema

    bundle = request.getfixturevalue(name)
    manifest = manifest_of(bundle)
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    assert set(manifest["stages"]) == {"text_encoder", "unet_0", "unet_1"}
    for stage in manifest["stages"].values():
        data = (bundle / stage["file"]).read_bytes()
        assert len(data) == stage["bytes"]
        assert hashlib.sha256(data).hexdigest() == stage["sha256"]
        assert stage["flops"] > 0
    assert manifest["schedules"]["unet_0"]["timesteps"] == 30 and len(manifest["schedules"]["lowres"]["betas"]) == 30
    assert manifest["defaults"]["dynamic_thresholding_percentile"] == 0.9
    assert manifest["defaults"]["lowres_sample_noise_level"] == 0.2
    assert manifest["defaults"]["sr_strength"] == 1.0
    assert manifest["tokenizer"]["kind"] == "byte" and manifest["text"]["max_length"] == 24


@pytest.mark.parametrize("name,precision,tolerance", [("bundle_fp32", "fp32", 1e-5), ("bundle_fp16", "fp16", 1e-2)])
def test_parity_measured_at_export_is_within_tolerance(name, precision, tolerance, request):
    manifest = manifest_of(request.getfixturevalue(name))
    for stage_name, stage in manifest["stages"].items():
        expected = "fp32" if stage_name == "text_encoder" else precision
        assert stage["precision"] == expected
        parity = stage["parity"]
        print(stage_name, expected, parity["rel_error"])
        assert parity["passed"] and not parity["forced"]
        assert max(parity["rel_error"]) <= (1e-5 if expected == "fp32" else tolerance)


@pytest.mark.parametrize("name", ["bundle_fp32", "bundle_fp16"])
def test_every_stage_checks_and_runs_at_batch_1_2_5(name, request):
    bundle = request.getfixturevalue(name)
    manifest = manifest_of(bundle)
    rng = np.random.default_rng(0)
    for stage_name, stage in manifest["stages"].items():
        path = bundle / stage["file"]
        onnx.checker.check_model(str(path), full_check=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in stage["inputs"]]
        for batch in (1, 2, 5):
            feeds = {}
            for spec in stage["inputs"]:
                shape = [batch if d == "batch" else d for d in spec["shape"]]
                if spec["dtype"] == "int64":
                    feeds[spec["name"]] = np.ones(shape, np.int64)
                elif spec["dtype"] == "bool":
                    feeds[spec["name"]] = np.ones(shape, bool)
                else:
                    feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
            (out,) = session.run(None, feeds)
            expected = [batch if d == "batch" else d for d in stage["outputs"][0]["shape"]]
            assert list(out.shape) == expected and np.isfinite(out).all(), (stage_name, batch)


def test_signature_is_declared_once():
    """The Unet's inputs (names with their dtypes) are written in one source file: the contract."""
    root = Path(__file__).resolve().parents[1]
    sources = [
        p
        for folder in ("reference", "export", "runtime", "shapes", "bench", "imagen")
        for p in (root / folder).rglob("*.py")
    ]
    declaring = [
        p.relative_to(root).as_posix()
        for p in sources
        if re.search(r"[\"']lowres_noise_times[\"'],\s*[\"']float32[\"']", p.read_text())
    ]
    assert declaring == ["runtime/contract/signatures.py"]
    signature = unet_signature(1, 32, 24, 128, True, max_batch=4)
    assert signature.input_names == [
        "x",
        "time",
        "text_embeds",
        "text_mask",
        "text_keep",
        "lowres_cond_img",
        "lowres_noise_times",
    ]
    assert engine_profile(signature)["x"] == ((1, 3, 32, 32), (8, 3, 32, 32), (8, 3, 32, 32))
    assert signature.to_json()["batch"] == {"min": 1, "opt": 2, "max": 8}
    assert TensorSpec("x", "float32", ("batch", 3)).concrete(5) == (5, 3)


def test_existing_bundle_needs_force(bundle_fp32, tiny_run):
    before = (bundle_fp32 / "manifest.json").read_bytes()
    result = CliRunner().invoke(export_cli, ["--ckpt", str(tiny_run), "--out", str(bundle_fp32)])
    assert result.exit_code == 2 and "--force" in result.output
    assert (bundle_fp32 / "manifest.json").read_bytes() == before


def test_default_sampler_steps_and_sr_strength_are_checked(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ValueError, match="sampler must be one of"):
        export_bundle(tiny_run, out, sampler="euler")
    with pytest.raises(ValueError, match=r"at most the trained timesteps \(30\)"):
        export_bundle(tiny_run, out, sampler="dpmpp_2m", steps=31)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(export_cli, ["--ckpt", str(tiny_run), "--out", str(out), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output
    with pytest.raises(ValueError, match=r"sr_strength must be a number in \(0, 1\]"):
        export_bundle(tiny_run, out, sr_strength=0)
    result = CliRunner().invoke(export_cli, ["--ckpt", str(tiny_run), "--out", str(out), "--sr-strength", "1.5"])
    assert result.exit_code == 2 and "--sr-strength" in result.output
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_leaves_nothing_behind(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(staging_module, "measure_parity", lambda *a, **k: [0.5, 0.5])
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="parity"):
        export_bundle(tiny_run, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # With --force it is written and marked.
    manifest = export_bundle(tiny_run, out, force=True)
    assert manifest.stages["unet_0"].parity.forced is True


def test_failed_export_keeps_the_previous_bundle(bundle_fp32, tiny_run, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(bundle_fp32, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise ExportError("unet_1: simulated failure")

    calls = []
    real = staging_module.export_stage

    def fail_on_second_unet(module, signature, path, opset=18, **kwargs):
        calls.append(signature.name)
        if signature.name == "unet_1":
            broken()
        return real(module, signature, path, opset, **kwargs)

    monkeypatch.setattr(staging_module, "export_stage", fail_on_second_unet)
    with pytest.raises(ExportError, match="simulated"):
        export_bundle(tiny_run, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_tensorrt_missing_is_said_plainly_and_onnx_bundle_is_complete(tiny_run, tmp_path):
    try:
        tensorrt_target()
        pytest.skip("TensorRT and a GPU are present: the engine build is tested in test_tensorrt")
    except TensorRTUnavailable:
        pass
    messages = []
    manifest = export_bundle(tiny_run, tmp_path / "b", tensorrt=True, report=messages.append)
    assert manifest.tensorrt is None
    assert any("tensorrt: skipped" in m for m in messages)
    assert (tmp_path / "b" / "unet_1.onnx").is_file()


def test_minimagen_directory_exports(tmp_path):
    t5 = tiny_t5_folder(tmp_path)
    write_minimagen_directory(tmp_path / "training", t5)
    result = CliRunner().invoke(export_cli, ["--ckpt", str(tmp_path / "training"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--text-encoder" in result.output
    manifest = export_bundle(tmp_path / "training", tmp_path / "b", text_encoder=t5, max_batch=2)
    assert manifest.tokenizer.kind == "sentencepiece"
    spiece = manifest.tokenizer.files["spiece.model"]
    assert (tmp_path / "b" / spiece.file).stat().st_size == spiece.bytes
    assert manifest.max_length == 256 and manifest.schedules["unet_0"].timesteps == 25
    assert all(s.parity.passed for s in manifest.stages.values())
