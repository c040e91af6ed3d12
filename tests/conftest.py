"""Shared fixtures: one tiny trained run and its bundles, made once per test session; the
hand-made bundle; and the opt-in `slow` marker.

Plain helpers live in modules that are not test modules: bundles.py (the hand-made bundle, fake
backends) and runs.py (training settings and inputs). pytest puts this folder on sys.path, so
tests import them as `from bundles import ...`."""

import os
import tempfile

import pytest

from runs import TINY

os.environ.setdefault("OMP_NUM_THREADS", "2")
# the engine choices and compiled models `--backend auto` caches go to a folder of this run, not ~/.cache
os.environ.setdefault("IMAGEN_CACHE_DIR", tempfile.mkdtemp(prefix="imagen-test-cache-"))
SLOW = "IMAGEN_SLOW"


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run only when IMAGEN_SLOW=1 is set."""
    if os.environ.get(SLOW) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow: run it with {SLOW}=1 python -m pytest ...")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from imagen.reference.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(out=str(out), dataset="shapes", **TINY))
    return out


@pytest.fixture(scope="session")
def bundle_fp32(tiny_run, tmp_path_factory):
    from imagen.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(tiny_run, out, max_batch=4)
    return out


@pytest.fixture(scope="session")
def bundle_fp16(tiny_run, tmp_path_factory):
    from imagen.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp16"
    export_bundle(tiny_run, out, fp16=True, max_batch=4)
    return out


@pytest.fixture
def fake_bundle(tmp_path):
    """The hand-made bundle (bundles.make_bundle) in a fresh folder."""
    from bundles import make_bundle

    return make_bundle(tmp_path / "bundle")


@pytest.fixture(scope="session")
def imagen_pytorch_files(tmp_path_factory):
    """The tiny imagen-pytorch cascades (imagen_pytorch_tiny.py), made once: `imagen`, `elucidated` (the
    checkpoints), `facts` (what imagen-pytorch's own loader makes of them) and `t5`, a tiny T5 folder of
    their text width. Made in a child process; callers skip when imagen-pytorch is not installed."""
    from imagen_pytorch_tiny import EMBED_DIM, write_tiny_imagen_pytorch

    from runs import tiny_t5_folder

    root = tmp_path_factory.mktemp("imagen_pytorch")
    imagen, elucidated, facts = write_tiny_imagen_pytorch(root / "checkpoints")
    return dict(root=root, imagen=imagen, elucidated=elucidated, facts=facts, t5=tiny_t5_folder(root, EMBED_DIM))


@pytest.fixture(scope="session")
def imagen_pytorch_bundles(imagen_pytorch_files):
    """Both cascades exported (FP32, EMA weights, max batch 2): the Imagen one by README's imagen-pytorch
    commands as written (--fp16 left out), then README's imagen-run command on it; the ElucidatedImagen
    one by `export_bundle`. {"imagen": folder, "elucidated": folder}."""
    from click.testing import CliRunner
    from imagen_pytorch_sample import readme_commands

    from imagen.export.bundle import export_bundle
    from imagen.export.cli import main as export_main
    from imagen.runtime.cli import main as run_main

    files = imagen_pytorch_files
    export, run = readme_commands(files, files["root"])
    assert export[0] == "imagen-export" and run[0] == "imagen-run"
    result = CliRunner().invoke(export_main, [*export[1:], "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(run_main, run[1:])
    assert result.exit_code == 0, result.output
    assert (files["root"] / "panda.png").is_file()
    out = {"imagen": files["root"] / "bundle-imagen", "elucidated": files["root"] / "bundle-elucidated"}
    export_bundle(files["elucidated"], out["elucidated"], text_encoder=files["t5"], ema=True, max_batch=2)
    return out


@pytest.fixture(scope="module")
def module_cache_root(tmp_path_factory):
    """A fresh per-user cache folder (IMAGEN_CACHE_DIR) for the module that asks for it, so nothing
    a test measures or compiles is written under ~/.cache or read from another module's."""
    from imagen.runtime.backends import machine

    folder, before = tmp_path_factory.mktemp("cache"), os.environ.get(machine.CACHE_VARIABLE)
    os.environ[machine.CACHE_VARIABLE] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(machine.CACHE_VARIABLE, None)
    else:
        os.environ[machine.CACHE_VARIABLE] = before
