"""One error policy for the four command lines (imagen/_cli.py): one line on stderr, an exit
status that names the kind of failure (2 user error, 1 unexpected, 130 interrupted), the
traceback only with --debug, and no output overwritten without --force.

The first tests replace the commands' inner functions by fakes that raise, so nothing trains,
exports or samples: what is checked is only what the command line makes of a failure. The
others run the commands on broken inputs and on the tiny exported bundle.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from imagen.runtime import load_bundle
from imagen.runtime.errors import BundleError

PYTHON = sys.executable

# command: (module, the function its main calls, arguments that reach it, the prefix of its lines)
CLIS = {
    "imagen-train": ("imagen.reference.cli", "train", ["--out", "run"], "imagen-train: "),
    "imagen-export": ("imagen.export.cli", "export_bundle", ["--ckpt", "run", "--out", "bundle"], "imagen-export: "),
    "imagen-run": ("imagen.runtime.cli", "_run", ["a red circle"], ""),
    "imagen-eval": ("imagen.shapes.cli", "_run", [], ""),
}

# failure: (exception raised inside the command, exit status, the line after the prefix)
FAILURES = {
    "ValueError": (ValueError("steps must be positive"), 2, "error: steps must be positive"),
    "OSError": (
        FileNotFoundError(2, "No such file or directory", "x.png"),
        2,
        "error: [Errno 2] No such file or directory: 'x.png'",
    ),
    "ImagenError": (BundleError("manifest.json is missing"), 2, "error: manifest.json is missing"),
    "unexpected": (
        RuntimeError("boom\nsecond line"),
        1,
        "error: unexpected RuntimeError: boom second line (rerun with --debug for the traceback)",
    ),
    "interrupt": (KeyboardInterrupt(), 130, "interrupted"),
}


def _invoke(main, args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)  # nothing escaped to click
    return result


def _command(monkeypatch, name, error):
    """The command's click `main`, with its inner function replaced by one that raises `error`."""
    module_name, inner, args, prefix = CLIS[name]
    module = importlib.import_module(module_name)
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise error

    monkeypatch.setattr(module, inner, fail)
    return module.main, args, prefix, calls


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("name", list(CLIS))
def test_same_failure_same_status_and_one_line(name, failure, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    error, status, line = FAILURES[failure]
    if name == "imagen-export" and failure == "interrupt":
        line = "interrupted; nothing was written"
    main, args, prefix, calls = _command(monkeypatch, name, error)
    result = _invoke(main, args)
    assert len(calls) == 1
    assert (result.exit_code, result.stderr) == (status, prefix + line + "\n")
    assert result.stdout == ""


@pytest.mark.parametrize("name", list(CLIS))
def test_usage_error_is_one_line_exit_2_before_the_command_runs(name, monkeypatch):
    main, args, prefix, calls = _command(monkeypatch, name, AssertionError("must not run"))
    result = _invoke(main, [*args, "--colour", "red"])
    assert result.exit_code == 2 and calls == []
    (line,) = result.stderr.splitlines()  # click's wording of the message varies between versions
    assert line.startswith(f"{prefix}error: No such option") and "--colour" in line
    assert line.endswith(f" (see {name} --help)")


@pytest.mark.parametrize("failure", ["ValueError", "unexpected", "interrupt"])
@pytest.mark.parametrize("name", list(CLIS))
def test_debug_adds_the_traceback_and_keeps_the_status(name, failure, monkeypatch):
    error, status, _ = FAILURES[failure]
    main, args, prefix, _ = _command(monkeypatch, name, error)
    plain = _invoke(main, args)
    debug = _invoke(main, [*args, "--debug"])
    assert "Traceback" not in plain.stderr
    assert debug.exit_code == plain.exit_code == status
    lines = debug.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any(line.startswith(type(error).__name__) for line in lines[1:-1])  # where the traceback ends
    assert lines[-1] == plain.stderr.strip()


def test_debug_keeps_clicks_full_usage_message(monkeypatch):
    main, args, _, _ = _command(monkeypatch, "imagen-run", AssertionError("must not run"))
    result = _invoke(main, [*args, "--steps", "many", "--debug"])
    assert result.exit_code == 2 and "Usage: imagen-run" in result.stderr and "'many'" in result.stderr


def test_export_error_is_a_user_error(monkeypatch):
    from imagen.export.onnx_export import ExportError

    assert not issubclass(ExportError, ValueError | OSError)  # exit 2 comes from imagen-export's own list
    main, args, prefix, _ = _command(monkeypatch, "imagen-export", ExportError("parity check failed: unet_0"))
    result = _invoke(main, args)
    assert (result.exit_code, result.stderr) == (2, "imagen-export: error: parity check failed: unet_0\n")


def test_training_interrupted_says_where_it_saved(monkeypatch):
    from imagen.reference.train import TrainingInterrupted

    message = "interrupted at step 12; the checkpoint is saved, continue with --resume"
    main, args, _, _ = _command(monkeypatch, "imagen-train", TrainingInterrupted(message))
    result = _invoke(main, args)
    assert (result.exit_code, result.stderr) == (130, f"imagen-train: {message}\n")


def test_bad_integer_list_is_a_usage_error(monkeypatch):
    main, args, _, calls = _command(monkeypatch, "imagen-train", AssertionError("must not run"))
    result = _invoke(main, [*args, "--image-sizes", "32,x"])
    assert result.exit_code == 2 and calls == []
    assert result.stderr == (
        "imagen-train: error: Invalid value: expected comma-separated integers, got '32,x' (see imagen-train --help)\n"
    )


@pytest.mark.parametrize("name", ["imagen-export", "imagen-run", "imagen-eval"])
def test_sampler_and_backend_choices_are_the_runtimes_lists(name, monkeypatch):
    from imagen.runtime.backends import BACKENDS
    from imagen.runtime.contract import SAMPLER_NAMES as SAMPLERS

    main, args, prefix, calls = _command(monkeypatch, name, AssertionError("must not run"))
    choices = {p.name: tuple(getattr(p.type, "choices", ())) for p in main.params}
    assert choices["sampler"] == tuple(SAMPLERS)
    if name != "imagen-export":
        assert choices["backend"] == tuple(BACKENDS)
    result = _invoke(main, [*args, "--sampler", "euler"])
    assert result.exit_code == 2 and calls == [] and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"{prefix}error: Invalid value for '--sampler': 'euler' is not one of ")
    assert all(f"'{sampler}'" in result.stderr for sampler in SAMPLERS)


# The commands on broken inputs: one line on stderr, non-zero exit, no traceback without --debug, --force


def _invoke_unchecked(cli, args):
    """Like _invoke, without its check: the tests below assert on what escaped themselves."""
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

    return {
        "imagen-train": (train_cli, "imagen-train: error: "),
        "imagen-export": (export_cli, "imagen-export: error: "),
        "imagen-run": (run_cli, "error: "),
        "imagen-eval": (eval_cli, "error: "),
    }


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
    "train broken unet file": (
        "imagen-train",
        lambda T, B, X: ["--out", T / "r", "--unet", X["unet"], "--unet", X["unet"]],
        "TypeError",
    ),
    "train broken data": ("imagen-train", lambda T, B, X: ["--out", T / "r", "--dataset", X["data"]], "no usable"),
    "export bad path": ("imagen-export", lambda T, B, X: ["--ckpt", T / "nope", "--out", T / "b"], "not a directory"),
    "export bad option": ("imagen-export", lambda T, B, X: ["--ckpt", T, "--max-batch", "0"], "--max-batch"),
    "export broken run": ("imagen-export", lambda T, B, X: ["--ckpt", X["run"], "--out", T / "b"], "config.json"),
    "export unets of a run": (
        "imagen-export",
        lambda T, B, X: ["--ckpt", X["run"], "--out", T / "b", "--unets", "1"],
        "--unets applies to MinImagen",
    ),
    "run bad path": ("imagen-run", lambda T, B, X: ["a", "--bundle", T / "nope", "-o", T / "a.png"], "does not exist"),
    "run bad option": (
        "imagen-run",
        lambda T, B, X: ["a", "--bundle", B, "-o", T / "a.png", "--guidance", "-1"],
        "guidance_scale must be",
    ),
    "run bad option type": ("imagen-run", lambda T, B, X: ["a", "--bundle", B, "--seed", "x"], "--seed"),
    "run bad prompt": ("imagen-run", lambda T, B, X: ["bell \x07", "--bundle", B, "-o", T / "a.png"], "control"),
    "run broken bundle": (
        "imagen-run",
        lambda T, B, X: ["a", "--bundle", X["bundle"], "-o", T / "a.png"],
        "unet_1.onnx",
    ),
    "eval bad path": ("imagen-eval", lambda T, B, X: ["--bundle", T / "nope", "--n", "1"], "does not exist"),
    "eval bad option": ("imagen-eval", lambda T, B, X: ["--bundle", B, "--n", "0"], "--n"),
    "eval bad sampler": (
        "imagen-eval",
        lambda T, B, X: ["--bundle", B, "--n", "1", "--sampler", "euler"],
        "is not one of",
    ),
    "eval broken bundle": ("imagen-eval", lambda T, B, X: ["--bundle", X["bundle"], "--n", "1"], "unet_1.onnx"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_failure_is_one_line_without_traceback(case, bundle_fp32, broken, tmp_path):
    command, make_args, words = CASES[case]
    cli, prefix = _clis()[command]
    result = _invoke_unchecked(cli, make_args(tmp_path, bundle_fp32, broken))
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix) and words in lines[0], lines[0]
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b").exists()


DEBUG = {  # module, arguments, the exception the traceback ends with
    "imagen-train": (
        "imagen.reference.cli",
        lambda T, X: ["--out", T / "r", "--unet", X["unet"], "--unet", X["unet"]],
        "TypeError",
    ),
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
    debug = subprocess.run(
        [PYTHON, "-m", module, *args, "--debug"], capture_output=True, text=True, env=env, timeout=300
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and exception in debug.stderr, debug.stderr


def test_cli_usage_error_with_debug_keeps_clicks_message():
    cli, _ = _clis()["imagen-export"]
    result = _invoke_unchecked(cli, ["--ckpt", "x", "--max-batch", "0", "--debug"])
    assert result.exit_code == 2 and "Usage:" in result.stderr and "--max-batch" in result.stderr


def test_cli_never_overwrites_without_force(bundle_fp32, tiny_run, tmp_path):
    clis = _clis()
    # imagen-train: a non-empty --out
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _invoke_unchecked(clis["imagen-train"][0], ["--out", out, "--steps", "1"])
    assert result.exit_code != 0 and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # imagen-export: an existing bundle (or any existing folder)
    before = {p.name: p.read_bytes() for p in bundle_fp32.iterdir() if p.is_file()}
    result = _invoke_unchecked(clis["imagen-export"][0], ["--ckpt", tiny_run, "--out", bundle_fp32])
    assert result.exit_code != 0 and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in bundle_fp32.iterdir() if p.is_file()} == before
    # imagen-run: an existing -o file, and an existing file in --out-dir
    png = tmp_path / "a.png"
    png.write_bytes(b"mine")
    result = _invoke_unchecked(clis["imagen-run"][0], ["a", "--bundle", bundle_fp32, "-o", png, "--steps", "1"])
    assert result.exit_code != 0 and "--force" in result.stderr and png.read_bytes() == b"mine"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "000-a.png").write_bytes(b"mine")
    result = _invoke_unchecked(
        clis["imagen-run"][0], ["a", "--bundle", bundle_fp32, "--out-dir", tmp_path / "imgs", "--steps", "1"]
    )
    assert result.exit_code != 0 and "--force" in result.stderr
    assert (tmp_path / "imgs" / "000-a.png").read_bytes() == b"mine"
    # imagen-eval: an existing --grid
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"mine")
    args = [
        "--bundle",
        bundle_fp32,
        "--n",
        "2",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--grid",
        grid,
    ]
    result = _invoke_unchecked(clis["imagen-eval"][0], args)
    assert result.exit_code != 0 and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert grid.read_bytes() == b"mine"
    forced = _invoke_unchecked(clis["imagen-eval"][0], args + ["--force"])
    assert forced.exit_code == 0, forced.stderr
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_bundle(bundle_fp32).short_sha  # the bundle still verifies
