"""Every command the README shows runs as written (the set-up commands run in .ci/run)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_commands_run_as_written(tmp_path):
    commands = _block_after("## The commands")
    assert [c.split()[0] for c in commands] == ["imagen-train", "imagen-export", "imagen-run", "imagen-eval"]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in commands:
        done = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    assert (tmp_path / "square.png").stat().st_size > 0


def test_readme_embedding_example_runs(tmp_path, bundle_fp32):
    text = README.read_text(encoding="utf-8").split("## Embedding the runtime", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"bundles/tiny"', repr(str(bundle_fp32)))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "circle.png").stat().st_size > 0


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / "runtime" / "demo" / "manifest.json").is_file(),
    reason="the demo bundle is not in this checkout",
)
def test_readme_setup_command_makes_an_image_with_the_demo_bundle(tmp_path):
    line = _block_after("## Set up")[0]
    run = line.split("&&")[-1].strip()
    assert run.startswith("imagen-run ")
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        shlex.split(run),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "circle.png").stat().st_size > 0
