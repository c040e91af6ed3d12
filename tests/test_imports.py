"""What each package may import: the runtime neither torch, transformers, onnx, nor anything
from imagen.reference or imagen.export (DESIGN.md); the helpers in imagen/ neither NumPy nor torch."""

import importlib.util
import subprocess
import sys
from pathlib import Path

PYTHON = sys.executable
ROOT = Path(__file__).parent.parent


def test_runtime_imports_no_torch_transformers_onnx_reference_or_export():
    code = (
        "import imagen.runtime, imagen.runtime.cli, sys; from imagen.runtime import Pipeline; "
        "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers','onnx') "
        "or m.startswith(('imagen.reference','imagen.export'))]; print(bad)"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_runtime_sources_do_not_mention_forbidden_imports():
    for path in (ROOT / "runtime").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                words = stripped.replace(",", " ").split()
                assert not any(
                    w in ("torch", "transformers", "onnx")
                    or w.startswith(("torch.", "onnx.", "imagen.reference", "imagen.export"))
                    for w in words
                ), (path.name, line)
            assert "assert " not in stripped or stripped.startswith("#"), (path.name, line)


def test_io_and_cli_helpers_import_neither_numpy_nor_torch():
    """`imagen/` is installed with the runtime; the helpers must load before anything heavy."""
    script = "import sys, imagen._io, imagen._cli; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-2000:]


def test_ray_is_imported_only_by_the_ray_serve_app():
    """`imagen.runtime.serve` and its modules never import Ray; `imagen.runtime.serve.ray` does, and no torch."""
    modules = ["imagen.runtime", "imagen.runtime.cli", "imagen.runtime.serve", "imagen.runtime.serve.engine"]
    modules += ["imagen.runtime.serve.batching", "imagen.runtime.serve.cli"]
    modules += ["imagen.runtime.batch.cli", "imagen.runtime.batch.job", "imagen.runtime.batch.generate"]
    if importlib.util.find_spec("fastapi") is not None:
        modules += ["imagen.runtime.serve.api", "imagen.runtime.serve.app", "imagen.runtime.serve.schema"]
    loaded = "import sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}))"
    done = subprocess.run([PYTHON, "-c", f"import {', '.join(modules)}; {loaded}"], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-2000:]
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        return
    done = subprocess.run([PYTHON, "-c", f"import imagen.runtime.serve.ray; {loaded}"], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "['ray']"), done.stderr[-2000:]
