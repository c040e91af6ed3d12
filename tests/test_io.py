"""One atomic write (imagen/_io.py): the previous file or the new one, never a temporary file
left behind; the usual permissions under the process umask, which no module ever sets."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imagen._io import atomic_save, atomic_save_folder, atomic_write

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
    modules = [
        "imagen._io",
        "imagen._cli",
        "imagen.reference.checkpoint",
        "imagen.reference.cli",
        "imagen.runtime.cli",
        "imagen.shapes.cli",
    ]
    done = subprocess.run([sys.executable, "-c", NO_UMASK_CALLS, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == []


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
    done = subprocess.run(
        [sys.executable, "-c", PERMISSIONS, oct(umask), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
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
