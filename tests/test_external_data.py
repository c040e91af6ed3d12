"""Stages with ONNX external data (docs/bundle.md, External data), forced on the tiny run with
threshold 0: the round trip, the FP16 conversion, the loader's refusals; and the manifest's
`source`, which names the run without the exporting machine's paths."""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from imagen.export import cli as cli_module
from imagen.export.bundle import export_bundle, run_source
from imagen.export.errors import ExportError
from imagen.export.external_data import EXTERNAL_DATA_THRESHOLD, external_data_files
from imagen.export.fp16 import convert_fp16
from imagen.runtime import Pipeline, load_bundle
from imagen.runtime.contract import run_config_sha256
from imagen.runtime.errors import BundleError

from bundles import external_data_model

PROMPTS = ["a small red circle on the left", "a large blue square at the top"]


@pytest.fixture(scope="module")
def bundle_external(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "external"
    export_bundle(tiny_run, out, max_batch=4, external_data_threshold=0)
    return out


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def referenced_locations(path: Path) -> set[str]:
    """The external data locations of a model's initializers and constant attributes."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return {
        e.value
        for t in tensors
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def test_threshold_zero_lists_every_file_each_stage_reads(bundle_external, bundle_fp32):
    manifest = manifest_of(bundle_external)
    listed = {"manifest.json"}
    for name, stage in manifest["stages"].items():
        files = [entry["file"] for entry in stage.get("external_data", [])]
        assert files == [f"{name}.onnx.data"], name
        assert referenced_locations(bundle_external / stage["file"]) == set(files), name
        onnx.checker.check_model(str(bundle_external / stage["file"]), full_check=True)
        for entry in stage["external_data"]:
            data = (bundle_external / entry["file"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
        listed |= {stage["file"], *files}
    assert {p.name for p in bundle_external.iterdir()} == listed  # nothing unlisted beside them
    inline = manifest_of(bundle_fp32)
    assert all("external_data" not in stage for stage in inline["stages"].values())
    assert not list(bundle_fp32.glob("*.data"))


def test_external_data_bundle_generates_the_same_image(bundle_external, bundle_fp32):
    results = []
    for bundle in (bundle_fp32, bundle_external):
        pipe = Pipeline.load(bundle, backend="onnxruntime", threads=2)
        results.append(pipe(PROMPTS, steps=4, sampler="ddim", seed=11).array)
    inline, external = results
    assert inline.dtype == np.uint8 and inline.shape == (2, 32, 32, 3)
    assert np.array_equal(inline, external)


def _move_out(bundle: Path, data: Path) -> None:
    outside = bundle.parent / "outside.data"
    shutil.move(data, outside)
    data.symlink_to(outside)


def _rename_to_parent(bundle: Path, data: Path) -> None:
    shutil.copy(data, bundle.parent / "x")  # the same bytes: only the path is wrong
    manifest = manifest_of(bundle)
    manifest["stages"]["unet_0"]["external_data"][0]["file"] = "../x"
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _flip_one_byte(bundle: Path, data: Path) -> None:
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


TAMPERING = {
    "missing": (lambda bundle, data: data.unlink(), r"unet_0\.onnx\.data \(stage unet_0 external data 0\) is missing"),
    "truncated": (
        lambda bundle, data: os.truncate(data, data.stat().st_size - 1),
        r"unet_0\.onnx\.data \(stage unet_0 external data 0\) has \d+ bytes, the manifest expects",
    ),
    "altered": (
        _flip_one_byte,
        r"unet_0\.onnx\.data \(stage unet_0 external data 0\) has sha256 [0-9a-f]{64}, "
        r"the manifest expects",
    ),
    "renamed to ../x": (_rename_to_parent, r"stage unet_0 external data 0 file '\.\./x' contains '\.\.'"),
    "symlink out": (
        _move_out,
        r"unet_0\.onnx\.data \(stage unet_0 external data 0\) resolves to .*outside\.data, "
        r"outside the bundle",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_external_data_is_a_bundle_error_naming_the_file(bundle_external, tmp_path, case):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_external, bundle)
    load_bundle(bundle)  # intact, the copy loads
    tamper, message = TAMPERING[case]
    tamper(bundle, bundle / "unet_0.onnx.data")
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_fp16_conversion_keeps_external_data_beside_the_model(bundle_fp32, tmp_path):
    """The FP16 file's data is named `<model>.onnx.data` (not onnx's default, a fresh UUID), and
    storing it outside changes no output bit."""
    source = bundle_fp32 / "unet_0.onnx"
    outside, inside = tmp_path / "outside" / "unet_0.onnx", tmp_path / "inside" / "unet_0.onnx"
    outside.parent.mkdir(), inside.parent.mkdir()
    assert convert_fp16(source, outside, external_data_threshold=0) == [outside, Path(f"{outside}.data")]
    assert convert_fp16(source, inside) == [inside]
    assert sorted(p.name for p in outside.parent.iterdir()) == ["unet_0.onnx", "unet_0.onnx.data"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in outside.parent.iterdir()}
    assert modes["unet_0.onnx.data"] == modes["unet_0.onnx"]  # not the 0600 of a temporary file
    assert referenced_locations(outside) == {"unet_0.onnx.data"}
    onnx.checker.check_model(str(outside), full_check=True)
    signature = load_bundle(bundle_fp32).stages["unet_0"].signature
    feeds = signature.sample_inputs(3, np.random.default_rng(5), timesteps=30)
    outputs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (outside, inside)
    ]
    assert outputs[0].dtype == np.float32 and np.isfinite(outputs[0]).all()
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("location", ["../w.bin", "ABSOLUTE", "missing.bin"])
def test_external_data_outside_the_model_folder_fails_the_export(tmp_path, location):
    location = str(tmp_path / "w.bin") if location == "ABSOLUTE" else location
    path = external_data_model(tmp_path / "stage", location)
    shutil.move(tmp_path / "stage" / "w.bin", tmp_path / "w.bin")
    with pytest.raises(ExportError, match=r"m\.onnx: tensor w reads external data .*, which is not a file inside"):
        external_data_files(path)


def test_external_data_files_are_named_by_the_model_not_guessed(tmp_path):
    path = external_data_model(tmp_path / "stage", "weights.bin")
    (tmp_path / "stage" / "w.bin").rename(tmp_path / "stage" / "weights.bin")
    assert external_data_files(path) == [tmp_path / "stage" / "weights.bin"]


def test_threshold_and_source_path_options_reach_the_export(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli_module, "export_bundle", lambda ckpt, out, options, **kwargs: calls.append(options))
    runner = CliRunner()
    base = ["--ckpt", str(tmp_path), "--out", str(tmp_path / "b"), "--quiet"]
    assert runner.invoke(cli_module.main, base).exit_code == 0
    forced = base + ["--external-data-threshold", "0", "--record-source-path"]
    assert runner.invoke(cli_module.main, forced).exit_code == 0
    assert [(c.external_data_threshold, c.record_source_path) for c in calls] == [
        (EXTERNAL_DATA_THRESHOLD, False),
        (0, True),
    ]
    assert EXTERNAL_DATA_THRESHOLD == int(2**31 * 0.9)
    assert runner.invoke(cli_module.main, base + ["--external-data-threshold", "-1"]).exit_code == 2
    with pytest.raises(ValueError, match="external_data_threshold"):
        export_bundle(tmp_path, tmp_path / "b", external_data_threshold=-1)
    assert not (tmp_path / "b").exists()


def test_manifest_names_the_run_and_no_file_names_this_machine(bundle_fp32, bundle_external, tiny_run):
    config = (tiny_run / "config.json").read_bytes()
    expected = {"name": "tiny", "config_sha256": hashlib.sha256(config).hexdigest(), "weights": "latest"}
    repo = Path(__file__).resolve().parent.parent
    for bundle in (bundle_fp32, bundle_external):
        assert manifest_of(bundle)["source"] == expected
        for file in bundle.iterdir():
            raw = file.read_bytes()  # the run's folder, and the exporter's stack traces (source paths)
            assert str(tiny_run.resolve().parent).encode() not in raw and str(repo).encode() not in raw, file.name


def test_source_path_is_recorded_only_on_request(tiny_run):
    path = str(tiny_run.resolve())
    assert run_source(tiny_run, "ema").to_json() == {
        "name": "tiny",
        "config_sha256": run_config_sha256(tiny_run),
        "weights": "ema",
    }
    assert run_source(tiny_run, "ema", record_path=True).to_json()["checkpoint"] == path


def test_minimagen_config_hash_is_its_parameter_files_in_sorted_order(tmp_path, tiny_run):
    params = tmp_path / "minimagen" / "parameters"
    params.mkdir(parents=True)
    files = {
        "unet_0_params_1.json": b'{"dim": 8}',
        "imagen_params_1.json": b'{"image_sizes": [16]}',
        "unet_1_params_1.json": b'{"dim": 4}',
    }
    for name, data in files.items():
        (params / name).write_bytes(data)
    expected = hashlib.sha256(b"".join(files[name] for name in sorted(files))).hexdigest()
    assert run_config_sha256(params.parent) == expected
    (params / "unet_1_params_1.json").write_bytes(b'{"dim": 5}')
    assert run_config_sha256(params.parent) != expected
