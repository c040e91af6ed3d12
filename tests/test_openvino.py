"""The OpenVINO backend and the CPU engine choice (runtime/backends/openvino.py, choice.py): OpenVINO
FP32 against ONNX Runtime (1e-5), bf16 within the quality gate, typed feed errors, threads, the
compiled-model cache and a damaged blob, `--precision fp32` bit for bit with the stored images,
`auto`'s mixed engines, the info, PNG and /readyz fields, and the command lines' errors. The choice
rules themselves are in test_cpu_choice.py.

Tests that run OpenVINO skip without it; bf16 ones skip on CPUs without native bf16. Every test
keeps its caches in a temporary IMAGEN_CACHE_DIR."""

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagen.runtime import Pipeline, load_bundle
from imagen.runtime.backends import GATE, OnnxRuntimeBackend, choice, machine
from imagen.runtime.cli import main as run_cli
from imagen.runtime.errors import BackendError, SignatureError
from imagen.runtime.pipeline import DEMO_BUNDLE

from golden import CALLS, digest, machine_key, stored
from threads import failures_in_threads

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
NATIVE_BF16 = machine.native_bf16(machine.cpu_flags(), ())
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed: pip install '.[openvino]'")
needs_bf16 = pytest.mark.skipif(
    not (HAS_OPENVINO and NATIVE_BF16), reason="needs openvino and a CPU with native bf16 (avx512_bf16 or amx_bf16)"
)
DIGESTS = stored(Path(__file__).parent / "data" / "golden_images.json")
PROMPTS = ["a small red circle on the left", "a large blue square at the top"]


@pytest.fixture(scope="module", autouse=True)
def cache_root(module_cache_root):
    return module_cache_root


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO_BUNDLE)


def _feeds(bundle, name, batch, seed=0):
    stage = bundle.stages[name]
    if name in [unet.name for unet in bundle.unets]:
        return choice.measurement_feeds(bundle, stage, batch, seed)
    return stage.signature.sample_inputs(batch, np.random.default_rng(seed))


def _openvino(bundle, name, precision="fp32", cache_dir=None):
    from imagen.runtime.backends import OpenVINOBackend

    stage = bundle.stages[name]
    return OpenVINOBackend(bundle.path(stage.file), stage.signature, precision, 2, cache_dir=cache_dir)


def _onnxruntime(bundle, name):
    stage = bundle.stages[name]
    return OnnxRuntimeBackend(bundle.path(stage.file), stage.signature, None, 2)


# --- the backend -------------------------------------------------------------------------------


@needs_openvino
def test_openvino_fp32_equals_onnxruntime_within_1e_5(demo):
    for name in demo.stages:
        ours, theirs = _openvino(demo, name), _onnxruntime(demo, name)
        for batch in (demo.stages[name].signature.batch_opt, 3):  # compiled at load, and on first use
            feeds = _feeds(demo, name, batch)
            output = demo.stages[name].signature.output_names[0]
            got, want = ours.run(feeds)[output], theirs.run(feeds)[output]
            error = choice.relative_error(got, want)
            print(f"{name} batch {batch}: OpenVINO FP32 vs ONNX Runtime relative error {error:.2e}")
            assert got.dtype == np.float32 and got.shape == want.shape and error <= 1e-5


@needs_bf16
def test_bf16_unets_are_within_the_gate_and_really_bf16(demo):
    """The real measurement (`choice.measured`: OpenVINO bf16 against ONNX Runtime FP32 at batch 2 and
    16): within GATE, and above 1e-4, which an engine that silently ran FP32 would not reach."""
    entry, when = choice.measured(demo, 2)
    for name, error in entry["gate"].items():
        row = entry["timings"][name]
        print(f"{name}: bf16 relative error {error:.2e}; seconds {row} ({when})")
        assert 1e-4 < error <= GATE and row["batch"] == [2, 16]
    assert set(entry["gate"]) == {"unet_0", "unet_1"}


@needs_openvino
def test_feed_errors_are_typed_and_a_closed_backend_refuses(demo):
    backend, feeds = _openvino(demo, "unet_0"), _feeds(demo, "unet_0", 2)
    bad = [
        ({k: v for k, v in feeds.items() if k != "time"}, "missing ['time']"),
        ({**feeds, "x": feeds["x"].astype(np.float64)}, "input x must be float32, got float64"),
        (_feeds(demo, "unet_0", 17), "batch 17 is outside [1, 16]"),
        ({**feeds, "x": feeds["x"][:, :, :16]}, "dimension 2 must be 32, got 16"),
        ([feeds], "feeds must be a dict"),
    ]
    for wrong, fragment in bad:
        with pytest.raises(SignatureError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            backend.run(wrong)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.run(feeds)


@needs_openvino
def test_threads_sharing_a_backend_get_the_results_of_serial_calls(demo, tmp_path, monkeypatch):
    """Four threads, two batch sizes: each result equals the serial call's, bit for bit (one infer
    request per thread and compiled size). With room for one compiled size, switching sizes drops
    and reloads them and the results stay the same."""
    from imagen.runtime.backends import openvino

    backend = _openvino(demo, "unet_1", cache_dir=tmp_path)
    feeds = [_feeds(demo, "unet_1", 2 + 2 * (index % 2), seed=index) for index in range(4)]
    serial = [backend.run(f)["noise_pred"] for f in feeds]

    def work(index):
        for _ in range(2):
            if not np.array_equal(backend.run(feeds[index])["noise_pred"], serial[index]):
                return "differs from the serial call"
        return None

    assert failures_in_threads(work) == []
    monkeypatch.setattr(openvino, "MAX_SHAPES", 1)
    for index in (1, 0, 1):
        np.testing.assert_array_equal(backend.run(feeds[index])["noise_pred"], serial[index])
        assert list(backend._shapes) == [len(feeds[index]["x"])]


def _blobs(folder: Path) -> dict:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.glob("*.blob")}


@needs_openvino
def test_second_load_imports_the_cached_model_and_a_damaged_blob_is_compiled_again(demo, tmp_path):
    from imagen.runtime.backends.openvino import read_blob

    folder = tmp_path / "compiled"
    first = _openvino(demo, "unet_1", cache_dir=folder)
    feeds = _feeds(demo, "unet_1", 2)
    want = first.run(feeds)["noise_pred"]
    blobs = _blobs(folder)
    assert len(blobs) == 1  # batch 2, compiled at load
    again = _openvino(demo, "unet_1", cache_dir=folder)
    assert _blobs(folder) == blobs  # imported: nothing compiled or written
    np.testing.assert_array_equal(again.run(feeds)["noise_pred"], want)
    for path in folder.glob("*.blob"):
        path.chmod(0o644)  # OpenVINO writes its blobs read-only
        data = bytearray(path.read_bytes())
        data[len(data) // 3 : len(data) // 3 + 4096] = os.urandom(4096)
        path.write_bytes(bytes(data))
    survived = _openvino(demo, "unet_1", cache_dir=folder)  # OpenVINO alone would import it and give NaN
    np.testing.assert_array_equal(survived.run(feeds)["noise_pred"], want)
    assert all(read_blob(path) is not None for path in folder.glob("*.blob"))  # compiled again and replaced


@needs_openvino
def test_openvino_cache_folder_is_per_machine_and_bundle_and_never_in_the_bundle(demo, cache_root):
    from imagen.runtime.backends.openvino import openvino_cache_dir

    folder = openvino_cache_dir(demo.root)
    assert folder == cache_root / "openvino" / machine.machine_key() / demo.short_sha
    assert DEMO_BUNDLE.resolve() not in folder.resolve().parents


# --- the pipeline, the command lines and the servers ----------------------------------------------


@pytest.mark.skipif(DIGESTS is None, reason=f"no stored digests for this machine ({machine_key()})")
def test_precision_fp32_makes_the_stored_images_bit_for_bit(tmp_path):
    """imagen-run --precision fp32 on ONNX Runtime: the stored images (Pipeline.load's default, fp32, is
    held to them by test_golden_images.py)."""
    call = CALLS["defaults"]
    options = ["--seed", "7", "--sampler", "dpmpp_2m", "--steps", "25", "--sr-strength", "0.25", "--threads", "2"]
    args = [*call["prompts"], *options, "--out-dir", str(tmp_path), "--precision", "fp32", "--verbose", "--quiet"]
    result = CliRunner().invoke(run_cli, args)
    assert result.exit_code == 0, result.output
    assert "engine: onnxruntime fp32 (--precision fp32: the exact path)" in result.stderr
    images = [Image.open(path) for path in sorted(tmp_path.glob("*.png"))]
    assert digest(np.stack([np.asarray(image) for image in images])) == DIGESTS["defaults"]
    assert {(image.text["backend"], image.text["precision"]) for image in images} == {("onnxruntime", "fp32")}


@needs_openvino
def test_openvino_pipeline_info_png_and_readyz(tmp_path):
    from imagen.runtime import encode_png

    pipe = Pipeline.load(backend="openvino", precision="fp32", threads=2)
    exact = Pipeline.load(threads=2)
    result, reference = pipe(PROMPTS, seed=7, steps=[4, 2]), exact(PROMPTS, seed=7, steps=[4, 2])
    difference = np.abs(result.array.astype(np.int16) - reference.array.astype(np.int16))
    print(f"OpenVINO FP32 vs ONNX Runtime uint8: max {difference.max()}, share equal {np.mean(difference == 0):.4f}")
    assert difference.max() <= 2 and np.mean(difference == 0) >= 0.99
    assert [(i["backend"], i["precision"]) for i in result.info] == [("openvino", "fp32")] * 2
    text = Image.open(io.BytesIO(encode_png(result.array[0], result.info[0]))).text
    assert (text["backend"], text["precision"]) == ("openvino", "fp32")
    if importlib.util.find_spec("fastapi") is None:
        return
    from fastapi.testclient import TestClient

    from imagen.runtime.serve import ServeConfig, create_app

    with TestClient(create_app(pipe, ServeConfig(warmup=False))) as client:
        body = client.get("/readyz").json()
    assert (body["backend"], body["precision"], body["quality_gate"]) == ("openvino", "fp32", None)
    assert body["engine"] == "openvino fp32 (asked for)"


@needs_bf16
def test_bf16_pipeline_reports_its_gate_and_stays_near_fp32():
    pipe = Pipeline.load(backend="openvino", precision="bf16", threads=2)
    assert (pipe.backend_name, pipe.precision) == ("openvino", "bf16")
    gate = pipe.choice.gate
    assert gate["threshold"] == GATE and gate["passed"] and set(gate["rel_error"]) == {"unet_0", "unet_1"}
    result = pipe(PROMPTS, seed=7, steps=[8, 4])
    reference = Pipeline.load(threads=2)(PROMPTS, seed=7, steps=[8, 4])
    difference = np.abs(result.array.astype(np.int16) - reference.array.astype(np.int16))
    print(f"bf16 vs FP32 uint8: mean {difference.mean():.2f}, max {difference.max()} (gate {gate['rel_error']})")
    assert difference.mean() <= 4 and result.info[0]["precision"] == "bf16"


MIXED = ("onnxruntime>openvino/openvino", "fp32>bf16/bf16")


@needs_bf16
def test_auto_splits_the_base_unet_by_timestep_and_runs_the_super_resolution_unet_in_bf16(monkeypatch):
    """precision auto where bf16 is measured faster: the text encoder on ONNX Runtime FP32, the base
    Unet on ONNX Runtime FP32 for timesteps >= 3/4 T (bit for bit the exact pipeline's) and on OpenVINO
    bf16 below, the super-resolution Unet on OpenVINO bf16; the info and the PNG say so."""
    from imagen.runtime import encode_png
    from imagen.runtime.backends import OpenVINOBackend, SplitBackend

    monkeypatch.setattr(choice, "decide", lambda entry, calls: (True, "measured faster (forced by the test)"))
    pipe = Pipeline.load(precision="auto", threads=2)
    exact = Pipeline.load(threads=2)
    assert (pipe.backend_name, pipe.precision) == MIXED and pipe.choice.gate["bf16_unets"] == ["unet_0", "unet_1"]
    assert isinstance(pipe.backends["unet_1"], OpenVINOBackend)
    assert isinstance(pipe.backends["text_encoder"], OnnxRuntimeBackend)
    split = pipe.backends["unet_0"]
    assert isinstance(split, SplitBackend) and split.switch == 187.5
    assert isinstance(split.noisy, OnnxRuntimeBackend) and isinstance(split.rest, OpenVINOBackend)
    assert pipe.warmup_steps == (2, 1) and exact.warmup_steps == (1, 1)  # a server's warm-up runs both engines
    feeds = _feeds(pipe.bundle, "text_encoder", 2)
    encoders = (pipe.backends["text_encoder"], exact.backends["text_encoder"])
    np.testing.assert_array_equal(*(encoder.run(feeds)["text_embeds"] for encoder in encoders))
    feeds = _feeds(pipe.bundle, "unet_0", 2)
    for time, bit_for_bit in ((249.0, True), (188.0, True), (187.0, False), (0.0, False)):
        feeds["time"] = np.full_like(feeds["time"], time)
        ours, theirs = split.run(feeds)["noise_pred"], exact.backends["unet_0"].run(feeds)["noise_pred"]
        assert np.array_equal(ours, theirs) == bit_for_bit, time
        assert choice.relative_error(ours, theirs) <= GATE
    result = pipe(PROMPTS, seed=7, steps=[8, 4])
    assert [(i["backend"], i["precision"]) for i in result.info] == [MIXED] * 2
    text = Image.open(io.BytesIO(encode_png(result.array[0], result.info[0]))).text
    assert (text["backend"], text["precision"]) == MIXED
    reference = exact(PROMPTS, seed=7, steps=[8, 4])
    difference = np.abs(result.array.astype(np.int16) - reference.array.astype(np.int16))
    print(f"auto vs FP32 uint8: mean {difference.mean():.2f}, max {difference.max()}")
    assert 0 < difference.mean() <= 4
    pipe.close()
    for engine in (split.noisy, split.rest):  # closing the pipeline closed both
        with pytest.raises(BackendError, match="was closed"):
            engine.run(feeds)


def test_command_lines_refuse_bad_precisions_in_one_line(tmp_path):
    from imagen.runtime.serve.cli import main as serve_cli
    from imagen.shapes.cli import main as eval_cli

    out = tmp_path / "x.png"
    cases = [
        (run_cli, ["a", "-o", str(out), "--backend", "onnxruntime", "--precision", "bf16"], "error: precision must"),
        (run_cli, ["a", "-o", str(out), "--precision", "fp16"], "error: Invalid value for '--precision'"),
        (eval_cli, ["--n", "1", "--backend", "tensorrt", "--precision", "bf16"], "error: precision must be fp32 or"),
        (serve_cli, ["--backend", "onnxruntime", "--precision", "bf16"], "imagen-serve: error: precision must"),
    ]
    for cli, args, start in cases:
        result = CliRunner().invoke(cli, args)
        line = (result.stderr or result.output).strip()
        assert result.exit_code == 2 and "\n" not in line and line.startswith(start), line
    assert not out.exists()


def test_servers_take_precision_as_a_checked_field():
    from imagen.runtime.serve.config import RAY, ArgumentError, ServeConfig, parse_options

    assert ServeConfig().precision == "fp32"
    assert parse_options((ServeConfig,), {"precision": "fp32"}, RAY) == [{"precision": "fp32"}]
    with pytest.raises(ArgumentError, match="precision: must be one of auto, fp32, bf16, got 'half'"):
        parse_options((ServeConfig,), {"precision": "half"}, RAY)
