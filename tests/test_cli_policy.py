"""One error policy for the four command lines (imagen/_cli.py) and one atomic write (imagen/_io.py).

The commands' inner functions are replaced by fakes that raise, so no test trains, exports or
samples: what is checked is only what the command line makes of a failure.
"""

import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from imagen.runtime.errors import BundleError

from imagen._io import atomic_save, atomic_save_folder, atomic_write

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
    "OSError": (FileNotFoundError(2, "No such file or directory", "x.png"), 2,
                "error: [Errno 2] No such file or directory: 'x.png'"),
    "ImagenError": (BundleError("manifest.json is missing"), 2, "error: manifest.json is missing"),
    "unexpected": (RuntimeError("boom\nsecond line"), 1,
                   "error: unexpected RuntimeError: boom second line (rerun with --debug for the traceback)"),
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
    line, = result.stderr.splitlines()  # click's wording of the message varies between versions
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
    assert result.stderr == ("imagen-train: error: Invalid value: expected comma-separated integers, got '32,x' "
                             "(see imagen-train --help)\n")


@pytest.mark.parametrize("name", ["imagen-export", "imagen-run", "imagen-eval"])
def test_sampler_and_backend_choices_are_the_runtimes_lists(name, monkeypatch):
    from imagen.runtime.backends import BACKENDS
    from imagen.runtime.samplers import SAMPLERS

    main, args, prefix, calls = _command(monkeypatch, name, AssertionError("must not run"))
    choices = {p.name: tuple(getattr(p.type, "choices", ())) for p in main.params}
    assert choices["sampler"] == tuple(SAMPLERS)
    if name != "imagen-export":
        assert choices["backend"] == tuple(BACKENDS)
    result = _invoke(main, [*args, "--sampler", "euler"])
    assert result.exit_code == 2 and calls == [] and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"{prefix}error: Invalid value for '--sampler': 'euler' is not one of ")
    assert all(f"'{sampler}'" in result.stderr for sampler in SAMPLERS)


# The process umask: imported modules must never set it, and atomic writes must honour it.

NO_UMASK_CALLS = """
import importlib, json, os, sys
calls, umask = [], os.umask
def spy(mask):
    calls.append(mask)
    return umask(mask)
os.umask = spy
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(calls))
"""


def test_importing_never_sets_the_umask():
    """Setting it, even to read it, changes it for every thread of the host process for a moment."""
    modules = ["imagen._io", "imagen._cli", "imagen.reference.checkpoint", "imagen.reference.cli",
               "imagen.runtime.cli", "imagen.shapes.cli"]
    done = subprocess.run([sys.executable, "-c", NO_UMASK_CALLS, *modules], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == []


def test_io_and_cli_helpers_import_neither_numpy_nor_torch():
    """`imagen/` is installed with the runtime; the helpers must load before anything heavy."""
    script = "import sys, imagen._io, imagen._cli; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-2000:]


PERMISSIONS = """
import json, os, sys
from pathlib import Path
from imagen._io import atomic_save, atomic_save_folder, atomic_write
from imagen.runtime.cli import write_png
from PIL import Image
os.umask(int(sys.argv[1], 8))  # after the imports: a umask read at import time would be stale
folder = Path(sys.argv[2])
atomic_write(folder / "a.json", "{}")
atomic_save(folder / "b.bin", lambda tmp: tmp.write_bytes(b"x"))
info = dict(prompt="p", seed=0, sampler="ddim", steps=[1], sr_strength=1.0, guidance_scale=1.0, bundle_sha="0")
write_png(Image.new("RGB", (2, 2)), folder / "c.png", info, force=False)
atomic_save_folder(folder / "d", lambda staging: (staging / "e").write_text("e"))
print(json.dumps({p.name: p.stat().st_mode & 0o777 for p in sorted(folder.rglob("*"))}))
"""


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_usual_permissions(umask, tmp_path):
    done = subprocess.run([sys.executable, "-c", PERMISSIONS, oct(umask), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    file, folder = 0o666 & ~umask, 0o777 & ~umask
    assert json.loads(done.stdout) == {"a.json": file, "b.bin": file, "c.png": file, "d": folder, "e": file}


# Atomic writes: the previous file or the new one, never a temporary file left behind.


def test_atomic_write_writes_text_as_utf8_and_bytes_as_is(tmp_path):
    atomic_write(tmp_path / "sub" / "a.txt", "température")
    atomic_write(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "sub" / "a.txt").read_bytes() == "température".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.bin", "sub"]


def _half_write(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise OSError(28, "No space left on device")


def _interrupted_write(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise KeyboardInterrupt


def test_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("previous")
    with pytest.raises(OSError, match="No space left"):
        atomic_save(target, _half_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(target, _interrupted_write)
    assert os.listdir(tmp_path) == ["state.json"] and target.read_text() == "previous"


def test_failed_rename_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write(target, b"new")
    assert os.listdir(tmp_path) == ["model.safetensors"] and target.read_bytes() == b"previous"


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "latest"
    payloads = [f"writer {i} ".encode() * 5000 for i in range(8)]
    errors = []

    def write(payload):
        try:
            for _ in range(20):
                atomic_write(target, payload)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert target.read_bytes() in payloads and os.listdir(tmp_path) == ["latest"]


def test_folder_is_replaced_whole_or_kept(tmp_path):
    target = tmp_path / "text_encoder"
    atomic_save_folder(target, lambda staging: (staging / "config.json").write_text("old"))
    with pytest.raises(OSError):
        atomic_save_folder(target, lambda staging: _half_write(staging / "config.json"))
    assert os.listdir(tmp_path) == ["text_encoder"] and os.listdir(target) == ["config.json"]
    assert (target / "config.json").read_text() == "old"
    atomic_save_folder(target, lambda staging: (staging / "tokenizer.json").write_text("new"))
    assert os.listdir(tmp_path) == ["text_encoder"] and os.listdir(target) == ["tokenizer.json"]


def test_folder_whose_rename_fails_is_put_back(tmp_path, monkeypatch):
    target = tmp_path / "text_encoder"
    target.mkdir()
    (target / "config.json").write_text("old")
    real, into_target = os.replace, []

    def refuse_the_new_folder(src, dst):  # the old folder moves aside, the new one cannot move in
        if Path(dst) == target:
            into_target.append(src)
            if len(into_target) == 1:
                raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_folder)
    with pytest.raises(PermissionError):
        atomic_save_folder(target, lambda staging: (staging / "config.json").write_text("new"))
    assert len(into_target) == 2  # the refused new folder, then the old one put back
    assert os.listdir(tmp_path) == ["text_encoder"] and (target / "config.json").read_text() == "old"
