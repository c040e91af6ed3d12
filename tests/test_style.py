"""The habits of STYLE.md that a machine can check: every file formatted and linted by ruff (with
`imagen` first-party), and no source file so long that a reader cannot hold it in their head."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("imagen", "reference", "export", "runtime", "shapes", "bench", "tests", "tools")
MAX_LINES = 450


def _ruff(*args: str) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return subprocess.run([ruff, *args, *FOLDERS], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_format_leaves_every_file_as_it_is():
    done = _ruff("format", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_check_passes():
    done = _ruff("check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_source_file_is_over_the_limit():
    long = {
        path.relative_to(ROOT).as_posix(): lines
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        if (lines := path.read_text().count("\n")) > MAX_LINES
    }
    assert long == {}, f"split these files (over {MAX_LINES} lines): {long}"
