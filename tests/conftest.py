"""Shared fixtures: one tiny trained run and its bundles, made once per test session; the
hand-made bundle; and the opt-in `slow` marker.

Plain helpers live in modules that are not test modules: bundles.py (the hand-made bundle, fake
backends) and runs.py (training settings and inputs). pytest puts this folder on sys.path, so
tests import them as `from bundles import ...`."""

import os

import pytest

from runs import TINY

os.environ.setdefault("OMP_NUM_THREADS", "2")
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
