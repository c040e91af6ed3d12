"""imagen-train: the run directory, loading it back, resume, data sets, the text encoder, MinImagen
directories; and no pickles: `.pth` files are read with weights_only, nothing written is a pickle."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from imagen.reference.checkpoint import CheckpointError, load_run
from imagen.reference.cli import main as train_cli
from imagen.reference.data import DataError, FolderData
from imagen.reference.minimagen import load_minimagen_run
from imagen.reference.text_encoder import TextEncoder
from imagen.reference.train import TrainConfig, train

from runs import TINY, tiny_t5_folder, write_minimagen_directory


def test_run_directory_is_complete(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["format"] == "imagen-run" and len(config["unets"]) == 2
    assert config["unets"][1]["lowres_cond"] is True
    for name in (
        "config.json",
        "best.safetensors",
        "log.jsonl",
        "text_encoder/model.safetensors",
        "text_encoder/imagen_tokenizer.json",
        "checkpoints/latest",
    ):
        assert (tiny_run / name).is_file(), name
    latest = tiny_run / "checkpoints" / (tiny_run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_0000006"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"):
        assert (latest / name).is_file(), name
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in log) and "val_loss" in log[2]
    assert not list(tiny_run.rglob("*.tmp")) and not list(tiny_run.rglob("*.partial"))


def test_run_loads_back_with_identical_weights_and_outputs(tiny_run):
    run = load_run(tiny_run, "latest")
    latest = tiny_run / "checkpoints" / (tiny_run / "checkpoints" / "latest").read_text().strip()
    saved = load_file(latest / "model.safetensors")
    for key, value in run.imagen.unets.state_dict().items():
        assert torch.equal(value, saved[f"unets.{key}"]), key
    again = load_run(tiny_run, "latest")
    embeds, mask = run.text_encoder.encode(["a small red circle on the left"])
    embeds2, mask2 = again.text_encoder.encode(["a small red circle on the left"])
    assert torch.equal(embeds, embeds2) and torch.equal(mask, mask2)
    a = run.imagen.sample(embeds, mask, noise=np.random.default_rng(0))
    b = again.imagen.sample(embeds2, mask2, noise=np.random.default_rng(0))
    assert torch.equal(a, b)
    for weights in ("best", "ema"):
        assert load_run(tiny_run, weights).weights == weights


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    settings = dict(TINY, steps=4, checkpoint_every=2, val_every=2)
    whole = []
    train(TrainConfig(out=str(tmp_path / "whole"), **settings), log=whole.append)
    first, second = [], []
    train(TrainConfig(out=str(tmp_path / "split"), **dict(settings, steps=2)), log=first.append)
    train(TrainConfig(out=str(tmp_path / "split"), **dict(settings, steps=4), resume=True), log=second.append)
    assert [r["step"] for r in first + second] == [1, 2, 3, 4]
    losses_whole = [r["loss"] for r in whole]
    losses_split = [r["loss"] for r in first + second]
    print("uninterrupted", losses_whole, "resumed", losses_split)
    np.testing.assert_allclose(losses_split, losses_whole, rtol=1e-6)
    a = load_file(tmp_path / "whole/checkpoints/step_0000004/model.safetensors")
    b = load_file(tmp_path / "split/checkpoints/step_0000004/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_existing_run_is_not_overwritten(tiny_run):
    result = CliRunner().invoke(train_cli, ["--out", str(tiny_run), "--steps", "1"])
    assert result.exit_code != 0
    assert "--resume" in result.output and "--force" in result.output
    assert (tiny_run / "best.safetensors").is_file()


def test_cli_rejects_bad_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(train_cli, ["--out", str(tmp_path / "r"), "--batch-size", "0"])
    assert result.exit_code == 2 and "batch_size" in result.output
    result = runner.invoke(train_cli, ["--out", str(tmp_path / "r2"), "--dataset", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a folder" in result.output


def test_folder_data_skips_and_counts_bad_rows(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"file": "ok.png", "caption": "a red square"},
        {"file": "missing.png", "caption": "gone"},
        {"file": "ok.png", "caption": "  "},
        {"file": "broken.png", "caption": "broken"},
        {"file": "../outside.png", "caption": "escape"},
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    data = FolderData(tmp_path, 16)
    assert len(data) == 2
    assert data.skipped == {"missing file": 2, "empty caption": 1, "bad manifest line": 1}
    image, caption = data[0]
    assert image.shape == (3, 16, 16) and caption == "a red square"
    assert torch.allclose(image[0], torch.ones(16, 16))
    assert data[1] is None and data.skipped["unreadable image"] == 1
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"file": "missing.png", "caption": "x"}))
    with pytest.raises(DataError, match="no usable rows"):
        FolderData(tmp_path, 16)


def test_text_encoder_zeroes_masked_positions_and_round_trips(tmp_path):
    encoder = TextEncoder.tiny(seed=3, max_length=16)
    embeds, mask = encoder.encode(["a", "a much longer prompt"])
    assert embeds.shape == (2, 16, 128)
    assert mask.sum(1).tolist() == [2, 16]
    assert torch.all(embeds[0, 2:] == 0) and embeds[0, :2].abs().sum() > 0
    encoder.save(tmp_path / "te")
    loaded = TextEncoder.from_folder(tmp_path / "te")
    assert torch.equal(loaded.encode(["a", "a much longer prompt"])[0], embeds)
    with pytest.raises(ValueError, match="config.json"):
        TextEncoder.from_folder(tmp_path)


@pytest.fixture(scope="module")
def minimagen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("minimagen")
    t5 = tiny_t5_folder(root)
    write_minimagen_directory(root / "training", t5)
    return root / "training", t5


def test_minimagen_directory_loads_strictly_and_samples(minimagen_dir):
    directory, t5 = minimagen_dir
    with pytest.raises(CheckpointError, match="--text-encoder"):
        load_minimagen_run(directory, None)
    run = load_minimagen_run(directory, t5)
    assert run.imagen.image_sizes == (16, 32) and run.imagen.unets[1].lowres_cond
    assert run.text_encoder.tokenizer.kind == "sentencepiece" and run.text_encoder.max_length == 256
    embeds, mask = run.text_encoder.encode(["a red circle on the left"])
    images = run.imagen.sample(embeds, mask, noise=np.random.default_rng(0))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_pickled_pth_is_refused(tmp_path):
    import datetime
    import pickle

    from imagen.reference.minimagen import read_pth

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": datetime.date(2020, 1, 1)}))  # needs pickle's globals
    with pytest.raises(CheckpointError, match="weights_only"):
        read_pth(path)


# Nothing the project writes (runs, bundles) is pickled

PICKLE_SUFFIXES = {".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin", ".npy", ".npz"}


def _pickled(path: Path) -> bool:
    head = path.read_bytes()[:2]
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode, protocols 2-5


def test_nothing_written_is_pickled(tiny_run, bundle_fp32, bundle_fp16):
    files = [p for root in (tiny_run, bundle_fp32, bundle_fp16) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".onnx" for p in files)
    assert [p for p in files if p.suffix in PICKLE_SUFFIXES] == []
    assert [p for p in files if _pickled(p)] == []


def test_pickle_detector_sees_pickles(tmp_path):
    import pickle

    for protocol in range(2, 6):
        (tmp_path / f"p{protocol}").write_bytes(pickle.dumps({"a": 1}, protocol=protocol))
        assert _pickled(tmp_path / f"p{protocol}")
