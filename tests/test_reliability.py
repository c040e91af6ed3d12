"""Hardening (docs/reliability.md): TensorRT mismatches without a GPU, nothing pickled, load
parameters, a soak test of one Pipeline under 8 threads, failing requests that leave the
pipeline healthy, and the four command lines' one-line errors and --force."""

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from imagen.runtime import Pipeline, load_bundle
from imagen.runtime import backends as backends_module
from imagen.runtime.errors import BackendError, BundleError, ParameterError, PromptError
from test_runtime import _sha, edit_manifest, make_bundle

PYTHON = sys.executable


# 3. External data: the manifest's entries, and the locations inside an .onnx file


@pytest.mark.parametrize("location,pattern", [("../w.data", "contains '..'"), ("/tmp/w.data", "absolute path"),
                                              ("link.data", "outside the bundle")])
def test_manifest_external_data_paths_must_stay_inside(tmp_path, location, pattern):
    root = make_bundle(tmp_path / "bundle")
    (tmp_path / "w.data").write_bytes(b"weights")
    (root / "link.data").symlink_to(tmp_path / "w.data")
    entry = {"file": location, "bytes": 7, "sha256": _sha(b"weights")}
    edit_manifest(root, lambda m: m["stages"]["unet_1"].update(external_data=[entry]))
    with pytest.raises(BundleError, match=rf"stage unet_1 external data 0.*{pattern}"):
        load_bundle(root)


@pytest.mark.parametrize("location", ["../outside.bin", "ABSOLUTE", "link.bin"])
def test_onnx_external_data_leaving_the_model_folder_is_refused(tmp_path, location):
    onnx = pytest.importorskip("onnx")
    from imagen.runtime.backends import OnnxRuntimeBackend
    from imagen.runtime.contract import StageSignature, TensorSpec
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path / "bundle"
    folder.mkdir()
    weights = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    shutil.copy(folder / "w.bin", tmp_path / "outside.bin")
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    location = str(tmp_path / "outside.bin") if location == "ABSOLUTE" else location
    model = onnx.load(folder / "m.onnx", load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, folder / "m.onnx")
    stage = StageSignature("unet_0", (TensorSpec("x", "float32", (4,)),), (TensorSpec("y", "float32", (4,)),), 1, 1, 1)
    with pytest.raises(BackendError, match=r"onnxruntime cannot load .*m\.onnx \(stage unet_0\)"):
        OnnxRuntimeBackend(folder / "m.onnx", stage, threads=1)


# 7. Long prompts: deterministic truncation reported in result.info, or an error in strict mode


def test_long_prompts_truncate_deterministically_and_say_so(tmp_path):
    from test_runtime import LENGTH, fake_pipeline

    pipe = fake_pipeline(make_bundle(tmp_path / "bundle"))
    head = "a" * (LENGTH - 1)
    result = pipe([head + "b", head + "c" * 50, "short"], steps=2, seed=3)
    assert [i["truncated"] for i in result.info] == [True, True, False]
    cut = pipe(head + "b", steps=2, seed=3)
    assert cut.info[0]["truncated"] is True
    for prompt in (head + "c" * 50, head + "d" * 500, head):  # the same tokens after the cut: the same image
        np.testing.assert_array_equal(pipe(prompt, steps=2, seed=3).array, cut.array)
    with pytest.raises(PromptError, match=rf"prompt 0 .* at most {LENGTH - 1}"):
        pipe(head + "b", steps=2, seed=3, strict=True)
    assert pipe(head, steps=2, seed=3, strict=True).info[0]["truncated"] is False


# 4. TensorRT engines built for another TensorRT version or compute capability


def _with_engines(root: Path, capability="9.0", version="10.3.0") -> Path:
    """The hand-made bundle plus a TensorRT section whose engines were 'built' for capability/version."""
    folder = root / "tensorrt" / f"sm{capability.replace('.', '')}-{version}"
    folder.mkdir(parents=True)
    engines = {}
    for name in ("text_encoder", "unet_0", "unet_1"):
        data = f"not really a plan: {name}".encode()
        (folder / f"{name}.plan").write_bytes(data)
        engines[name] = {"file": f"{folder.relative_to(root).as_posix()}/{name}.plan", "bytes": len(data),
                         "sha256": _sha(data)}
    trt = {"dir": folder.relative_to(root).as_posix(), "compute_capability": capability, "version": version,
           "engines": engines}
    edit_manifest(root, lambda m: m.update(tensorrt=trt))
    return root


@pytest.fixture
def trt_bundle(tmp_path):
    return _with_engines(make_bundle(tmp_path / "bundle"))


@pytest.fixture
def no_engines(monkeypatch):
    """No TensorRT engine may be deserialised and no onnxruntime session created."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("an engine or session was created")

    monkeypatch.setattr(backends_module, "TensorRTBackend", refuse)
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _fake_gpu(monkeypatch, capability: str, version: str):
    monkeypatch.setattr(backends_module, "tensorrt_environment", lambda: (None, None, capability, version))


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
    _with_engines(root, "9.0", "10.3.0")
    _fake_gpu(monkeypatch, "8.0", "10.3.0")
    monkeypatch.setattr(backends_module, "TensorRTBackend", lambda *a, **k: pytest.fail("engine deserialised"))
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


# 5. Nothing the project writes is pickled

PICKLE_SUFFIXES = {".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin", ".npy", ".npz"}


def _pickled(path: Path) -> bool:
    head = path.read_bytes()[:2]
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode, protocols 2-5


def test_nothing_written_is_pickled(tiny_run, bundle_fp32, bundle_fp16):
    files = [p for root in (tiny_run, bundle_fp32, bundle_fp16) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".onnx" for p in files)
    assert [p for p in files if p.suffix in PICKLE_SUFFIXES] == []
    assert [p for p in files if _pickled(p)] == []


def test_pickle_detector_sees_pickles(tmp_path):
    import pickle

    for protocol in range(2, 6):
        (tmp_path / f"p{protocol}").write_bytes(pickle.dumps({"a": 1}, protocol=protocol))
        assert _pickled(tmp_path / f"p{protocol}")


# 8. Load-time parameters


@pytest.mark.parametrize("kwargs,name", [({"threads": 0}, "threads"), ({"threads": -2}, "threads"),
                                         ({"threads": 1.5}, "threads"), ({"threads": True}, "threads"),
                                         ({"backend": "cuda"}, "backend")])
def test_load_parameters_raise_parameter_error_naming_them(tmp_path, kwargs, name):
    root = make_bundle(tmp_path / "bundle")
    with pytest.raises(ParameterError, match=rf"^{name} must be .*got") as info:
        Pipeline.load(root, **kwargs)
    assert info.value.parameter == name and isinstance(info.value, ValueError)


# 11. Soak: 8 threads, 200 requests, one Pipeline

SOAK_PROMPTS = [["a red circle"], ["a small blue square on the left"], ["two green triangles", "a yellow star"],
                ["Ünïcödé façade 🎨"], ["x" * 80], ["a big purple hexagon at the top", "a circle", "a square"]]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc")
def test_soak_eight_threads_two_hundred_requests_match_serial(bundle_fp32):
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    rng = random.Random(7)
    requests = []
    for index in range(200):
        if index % 25 == 24:  # a bad request now and then: it fails alone
            requests.append((("bell \x07",), 1, 0, 2))
            continue
        prompts = tuple(rng.choice(SOAK_PROMPTS))
        per_prompt = rng.randint(1, 4 // len(prompts))  # 1 to 4 images per request
        requests.append((prompts, per_prompt, rng.choice([0, 1, 2**40]), rng.choice([2, 3])))

    def call(key):
        prompts, per_prompt, seed, steps = key
        return pipe(list(prompts), num_images_per_prompt=per_prompt, seed=seed, steps=steps, sampler="ddim").array

    twins = {key: call(key) for key in dict.fromkeys(requests) if key[0] != ("bell \x07",)}  # serial
    assert len({t.tobytes() for t in twins.values()}) == len(twins)

    results, errors, lock = {}, [], threading.Lock()

    def worker(jobs):
        for index in jobs:
            try:
                array = call(requests[index])
            except PromptError:
                array = "PromptError"
            except BaseException as error:  # noqa: BLE001 - reported by the assertions below
                with lock:
                    errors.append((index, repr(error)))
                continue
            with lock:
                results[index] = array

    def run(indices, timeout):
        threads = [threading.Thread(target=worker, args=(indices[i::8],), daemon=True) for i in range(8)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.1, timeout - (time.monotonic() - start)))
        assert not any(t.is_alive() for t in threads), f"deadlock: threads still running after {timeout} s"

    run(list(range(40)), timeout=120)  # warm-up: every thread has run every stage
    rss_warm = _rss_bytes()
    results.clear()
    run(list(range(200)), timeout=300)
    rss_end = _rss_bytes()
    assert errors == []
    assert len(results) == 200
    for index, key in enumerate(requests):
        if key[0] == ("bell \x07",):
            assert isinstance(results[index], str) and results[index] == "PromptError"
        else:
            np.testing.assert_array_equal(results[index], twins[key], err_msg=f"request {index} {key}")
    assert rss_end <= 1.10 * rss_warm, f"resident memory grew from {rss_warm} to {rss_end} bytes"


# 12. A failing request does not affect the next ones


class _FailingSession:
    """Wraps an onnxruntime session; its `run` raises like onnxruntime does, `failures` times."""

    def __init__(self, session, failures=1):
        self.session, self.failures = session, failures

    def run(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated failure")
        return self.session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize("stage", ["text_encoder", "unet_0", "unet_1"])
def test_injected_backend_error_is_typed_and_the_next_request_is_unaffected(bundle_fp32, stage):
    fresh = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    want = fresh(["a red circle", "a blue square"], steps=3, seed=9).array
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    backend = pipe.backends[stage]
    backend.session = _FailingSession(backend.session)
    with pytest.raises(BackendError, match=rf"^{stage}: onnxruntime failed: .*simulated failure"):
        pipe(["a red circle", "a blue square"], steps=3, seed=9)
    np.testing.assert_array_equal(pipe(["a red circle", "a blue square"], steps=3, seed=9).array, want)


def test_bad_prompt_and_bad_parameter_do_not_affect_the_next_request(bundle_fp32):
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    want = pipe("a red circle", steps=2, seed=4).array
    with pytest.raises(PromptError):
        pipe(["a red circle", ""], steps=2, seed=4)
    with pytest.raises(ParameterError):
        pipe("a red circle", steps=2, seed=-4)
    with pytest.raises(BackendError):  # an arbitrary exception from inside a backend
        backend = pipe.backends["unet_0"]
        backend.session = _FailingSession(backend.session)
        pipe("a red circle", steps=2, seed=4)
    np.testing.assert_array_equal(pipe("a red circle", steps=2, seed=4).array, want)


# 13. Command lines: one line on stderr, non-zero exit, no traceback without --debug, --force


def _invoke(cli, args):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps stderr apart in result.stderr
    return runner.invoke(cli, [str(a) for a in args])


def _clis():
    from imagen.export.cli import main as export_cli
    from imagen.reference.cli import main as train_cli
    from imagen.runtime.cli import main as run_cli
    from imagen.shapes.cli import main as eval_cli

    return {"imagen-train": (train_cli, "imagen-train: error: "),
            "imagen-export": (export_cli, "imagen-export: error: "),
            "imagen-run": (run_cli, "error: "), "imagen-eval": (eval_cli, "error: ")}


@pytest.fixture
def broken(bundle_fp32, tmp_path):
    """Broken inputs for each command: a run directory, a bundle, a Unet file, a data folder."""
    bundle = tmp_path / "broken-bundle"
    shutil.copytree(bundle_fp32, bundle)
    onnx = bundle / "unet_1.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    run = tmp_path / "broken-run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps({"dim": "wide"}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text("not json\n")
    return {"bundle": bundle, "run": run, "unet": unet, "data": data}


CASES = {
    # command, arguments (T: tmp_path, B: a good bundle, X: broken inputs), words the line must hold
    "train bad path": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--dataset", T / "nowhere"], "not a folder"),
    "train bad option": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--batch-size", "0"], "batch_size"),
    "train bad option type": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--steps", "many"], "--steps"),
    "train unknown option": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--colour", "red"], "--colour"),
    "train bad sizes": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--image-sizes", "0,32"], "image_sizes"),
    "train broken unet file": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--unet", X["unet"], "--unet",
                                                               X["unet"]], "TypeError"),
    "train broken data": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--dataset", X["data"]], "no usable"),
    "export bad path": ("imagen-export", lambda T, B, X: ["--ckpt", T / "nope", "--out", T / "b"], "not a directory"),
    "export bad option": ("imagen-export", lambda T, B, X: ["--ckpt", T, "--max-batch", "0"], "--max-batch"),
    "export broken run": ("imagen-export", lambda T, B, X: ["--ckpt", X["run"], "--out", T / "b"], "config.json"),
    "run bad path": ("imagen-run", lambda T, B, X: ["a", "--bundle", T / "nope", "-o", T / "a.png"], "does not exist"),
    "run bad option": ("imagen-run", lambda T, B, X: ["a", "--bundle", B, "-o", T / "a.png", "--guidance", "-1"],
                       "guidance_scale must be"),
    "run bad option type": ("imagen-run", lambda T, B, X: ["a", "--bundle", B, "--seed", "x"], "--seed"),
    "run bad prompt": ("imagen-run", lambda T, B, X: ["bell \x07", "--bundle", B, "-o", T / "a.png"], "control"),
    "run broken bundle": ("imagen-run", lambda T, B, X: ["a", "--bundle", X["bundle"], "-o", T / "a.png"],
                          "unet_1.onnx"),
    "eval bad path": ("imagen-eval", lambda T, B, X: ["--bundle", T / "nope", "--n", "1"], "does not exist"),
    "eval bad option": ("imagen-eval", lambda T, B, X: ["--bundle", B, "--n", "0"], "--n"),
    "eval bad sampler": ("imagen-eval", lambda T, B, X: ["--bundle", B, "--n", "1", "--sampler", "euler"],
                         "is not one of"),
    "eval broken bundle": ("imagen-eval", lambda T, B, X: ["--bundle", X["bundle"], "--n", "1"], "unet_1.onnx"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_failure_is_one_line_without_traceback(case, bundle_fp32, broken, tmp_path):
    command, make_args, words = CASES[case]
    cli, prefix = _clis()[command]
    result = _invoke(cli, make_args(tmp_path, bundle_fp32, broken))
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix) and words in lines[0], lines[0]
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b").exists()


DEBUG = {  # module, arguments, the exception the traceback ends with
    "imagen-train": ("imagen.reference.cli", lambda T, X: ["--out", T / "r", "--unet", X["unet"], "--unet", X["unet"]],
                     "TypeError"),
    "imagen-export": ("imagen.export.cli", lambda T, X: ["--ckpt", X["run"], "--out", T / "b"], "CheckpointError"),
    "imagen-run": ("imagen.runtime.cli", lambda T, X: ["a", "--bundle", X["bundle"], "-o", T / "a.png"], "BundleError"),
    "imagen-eval": ("imagen.shapes.cli", lambda T, X: ["--bundle", X["bundle"], "--n", "1"], "BundleError"),
}


@pytest.mark.parametrize("command", list(DEBUG))
def test_cli_debug_shows_the_traceback(command, broken, tmp_path):
    module, make_args, exception = DEBUG[command]
    args = [str(a) for a in make_args(tmp_path, broken)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([PYTHON, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode != 0 and len(plain.stderr.splitlines()) == 1, plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([PYTHON, "-m", module, *args, "--debug"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and exception in debug.stderr, debug.stderr


def test_cli_usage_error_with_debug_keeps_clicks_message():
    cli, _ = _clis()["imagen-export"]
    result = _invoke(cli, ["--ckpt", "x", "--max-batch", "0", "--debug"])
    assert result.exit_code == 2 and "Usage:" in result.stderr and "--max-batch" in result.stderr


def test_cli_never_overwrites_without_force(bundle_fp32, tiny_run, tmp_path):
    clis = _clis()
    # imagen-train: a non-empty --out
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _invoke(clis["imagen-train"][0], ["--out", out, "--steps", "1"])
    assert result.exit_code != 0 and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # imagen-export: an existing bundle (or any existing folder)
    before = {p.name: p.read_bytes() for p in bundle_fp32.iterdir() if p.is_file()}
    result = _invoke(clis["imagen-export"][0], ["--ckpt", tiny_run, "--out", bundle_fp32])
    assert result.exit_code != 0 and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in bundle_fp32.iterdir() if p.is_file()} == before
    # imagen-run: an existing -o file, and an existing file in --out-dir
    png = tmp_path / "a.png"
    png.write_bytes(b"mine")
    result = _invoke(clis["imagen-run"][0], ["a", "--bundle", bundle_fp32, "-o", png, "--steps", "1"])
    assert result.exit_code != 0 and "--force" in result.stderr and png.read_bytes() == b"mine"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "000-a.png").write_bytes(b"mine")
    result = _invoke(clis["imagen-run"][0], ["a", "--bundle", bundle_fp32, "--out-dir", tmp_path / "imgs",
                                             "--steps", "1"])
    assert result.exit_code != 0 and "--force" in result.stderr
    assert (tmp_path / "imgs" / "000-a.png").read_bytes() == b"mine"
    # imagen-eval: an existing --grid
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"mine")
    args = ["--bundle", bundle_fp32, "--n", "2", "--steps", "1", "--batch-size", "2", "--threads", "1", "--quiet",
            "--grid", grid]
    result = _invoke(clis["imagen-eval"][0], args)
    assert result.exit_code != 0 and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert grid.read_bytes() == b"mine"
    forced = _invoke(clis["imagen-eval"][0], args + ["--force"])
    assert forced.exit_code == 0, forced.stderr
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_bundle(bundle_fp32).short_sha  # the bundle still verifies
