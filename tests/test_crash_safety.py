"""A process killed (SIGKILL) at the moments that matter leaves the previous complete
checkpoint or bundle, or none, and the next run cleans up and succeeds.

The kill is deterministic: a driver replaces `os.replace` with one that kills the process
right before (or right after) its n-th rename whose destination matches a pattern, then
runs the command's `main`.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from imagen.reference.checkpoint import latest_checkpoint, load_run

DRIVER = r"""
import os, re, signal, sys
target, n, when, module = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
real, count = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if re.search(target, os.fspath(dst)):
        count[0] += 1
        if count[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if count[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return
    real(src, dst, *args, **kwargs)
os.replace = replace
import importlib
sys.argv = [module] + sys.argv[5:]
importlib.import_module(module).main()
"""

TRAIN_ARGS = [
    "--image-sizes",
    "16,32",
    "--timesteps",
    "30",
    "--batch-size",
    "2",
    "--steps",
    "4",
    "--checkpoint-every",
    "2",
    "--val-every",
    "2",
    "--max-length",
    "16",
    "--sample-every",
    "0",
    "--quiet",
    "--threads",
    "1",
]


def _run(args: list[str], kill: tuple[str, int, str] | None = None, module: str = "imagen.reference.cli"):
    target, n, when = kill or ("^$", 0, "never")
    return subprocess.run(
        [sys.executable, "-c", DRIVER, target, str(n), when, module, *args], capture_output=True, text=True, timeout=600
    )


def _assert_checkpoint_complete_or_none(run: Path):
    folder = latest_checkpoint(run)
    if folder is None:
        return None
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "state.json",
    }
    loaded = load_run(run)  # every tensor reads back
    return json.loads((folder / "state.json").read_text())["step"], loaded


@pytest.mark.parametrize(
    "kill",
    [
        (r"checkpoints/step_", 1, "before"),  # first checkpoint complete in staging, not yet renamed
        (r"checkpoints/latest$", 1, "before"),  # renamed, pointer not yet moved
        (r"checkpoints/step_", 2, "before"),  # second checkpoint staged; the first is latest
        (r"checkpoints/latest$", 2, "after"),  # pointer moved, old checkpoint not yet pruned
    ],
)
def test_training_killed_keeps_a_complete_checkpoint_and_resumes(tmp_path, kill):
    run = tmp_path / "run"
    killed = _run(["--out", str(run), *TRAIN_ARGS], kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-1000:]
    state = _assert_checkpoint_complete_or_none(run)
    expected_step = {
        (r"checkpoints/step_", 1): None,
        (r"checkpoints/latest$", 1): None,
        (r"checkpoints/step_", 2): 2,
        (r"checkpoints/latest$", 2): 4,
    }[kill[:2]]
    assert (state[0] if state else None) == expected_step
    resumed = _run(["--out", str(run), *TRAIN_ARGS, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _assert_checkpoint_complete_or_none(run)[0] == 4
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_training_killed_before_its_first_write_starts_again_with_resume(tmp_path):
    run = tmp_path / "run"
    killed = _run(["--out", str(run), *TRAIN_ARGS], (r"config\.json$", 1, "before"))
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "config.json").exists()
    resumed = _run(["--out", str(run), *TRAIN_ARGS, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _assert_checkpoint_complete_or_none(run)[0] == 4


def _bundle_files(bundle: Path) -> dict:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("n, when", [(1, "before"), (2, "before"), (2, "after")])
def test_export_killed_keeps_the_previous_bundle(tiny_run, bundle_fp32, tmp_path, n, when):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(bundle_fp32, out)
    before = _bundle_files(out)
    args = ["--ckpt", str(tiny_run), "--out", str(out), "--max-batch", "4", "--force", "--quiet"]
    # The publication renames: 1 moves the old bundle aside, 2 moves the new one in.
    killed = _run(args, (rf"{out.name}$|\.{out.name}\.old-", n, when), module="imagen.export.cli")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-1000:]
    if out.exists():  # before the swap, the old bundle; after it, the new one, complete
        files = _bundle_files(out)
        assert files == before or (n == 2 and when == "after" and set(files) == set(before))
    else:  # between the two renames: the old bundle, complete, waits beside it for the next run
        (aside,) = tmp_path.glob(f".{out.name}.old-*")
        assert _bundle_files(aside) == before
    again = _run(args, module="imagen.export.cli")
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    from imagen.runtime.contract import sha256_file

    for stage in manifest["stages"].values():
        assert sha256_file(out / stage["file"]) == stage["sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or aside folders left
    assert os.listdir(out)
