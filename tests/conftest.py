"""Shared fixtures: one tiny trained run and its bundles, made once per test session."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = dict(image_sizes=(16, 32), timesteps=30, batch_size=4, steps=6, checkpoint_every=3, val_every=3,
            val_batches=1, sample_every=0, max_length=24, seed=0, progress=False,
            unet_overrides={"layer_attns": (False, True), "layer_cross_attns": (False, True)})


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
