"""Cascades of any length and size: MinImagen training directories in each layout its training
script writes (and the broken ones, refused with a CheckpointError naming the file), a base
Unet trained alone exported as a one-Unet cascade, and a three-Unet cascade (16 -> 32 -> 64)
trained with imagen-train, exported and run, step for step against the reference."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from imagen.export.parity import relative_error
from imagen.reference.checkpoint import CheckpointError, load_run
from imagen.reference.imagen import cast_unet_config
from imagen.reference.images import to_uint8
from imagen.reference.minimagen import load_minimagen_run
from imagen.reference.text_encoder import TextEncoder
from imagen.reference.unet import Unet, UnetConfig

from runs import MINIMAGEN_PARAMS

STAMP = "20220816_165729"
WIDTH = 32  # the test T5's d_model
# MinImagen's parameters files hold every Unet argument, its defaults filled in (get_default_args).
UNET_DEFAULTS = dict(
    dim=128,
    dim_mults=[1, 2, 4],
    channels=3,
    channels_out=None,
    cond_dim=None,
    text_embed_dim=512,
    num_resnet_blocks=1,
    layer_attns=True,
    layer_cross_attns=True,
    attn_heads=8,
    lowres_cond=False,
    memory_efficient=False,
    attend_at_middle=False,
)
BASE = dict(dim=8, dim_mults=[1, 2], layer_attns=[False, True], layer_cross_attns=[False, True], attn_heads=2)
SUPER = dict(
    dim=8,
    dim_mults=[1, 2],
    num_resnet_blocks=[1, 2],
    layer_attns=False,
    layer_cross_attns=[False, True],
    attn_heads=2,
    memory_efficient=True,
)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5") / "t5"
    TextEncoder.tiny(seed=1, max_length=16, d_model=WIDTH).save(folder)
    return folder


def write_parameters(root, unets=(BASE, SUPER), stamp=STAMP, **imagen):
    """parameters/ as MinImagen's save_training_info writes it; state_dicts/ and tmp/ empty."""
    for sub in ("parameters", "state_dicts", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    params = {**MINIMAGEN_PARAMS, "image_sizes": MINIMAGEN_PARAMS["image_sizes"][: len(unets)], **imagen}
    (root / "parameters" / f"imagen_params_{stamp}.json").write_text(json.dumps(params, indent=4))
    for index, unet in enumerate(unets):
        (root / "parameters" / f"unet_{index}_params_{stamp}.json").write_text(json.dumps({**UNET_DEFAULTS, **unet}))
    (root / "parameters" / f"training_parameters_{stamp}.txt").write_text("--BATCH_SIZE=2\n--TIMESTEPS=25\n")
    return root


def save_weights(root, relative, index, seed, unet=None, width=WIDTH) -> dict:
    """A state dict of the Unet `index` (the keys and shapes MinImagen's Unet has), saved with torch.save."""
    config = UnetConfig.from_dict({**UNET_DEFAULTS, **(unet or (BASE, SUPER)[index]), "max_text_len": 256})
    torch.manual_seed(seed)
    state = Unet(cast_unet_config(config, index, width, 3)).state_dict()
    torch.save(state, root / relative)
    return state


def assert_weights(run, expected: list[dict]):
    assert len(run.imagen.unets) == len(expected)
    for unet, state in zip(run.imagen.unets, expected):
        loaded = unet.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_state_dicts_layout_loads_the_best_weights(tmp_path, t5):
    root = write_parameters(tmp_path / "training")
    expected = [save_weights(root, f"state_dicts/unet_{i}_state_{STAMP}.pth", i, seed=i) for i in range(2)]
    for i in range(2):  # tmp/ has the latest weights of both; state_dicts/ (best by validation loss) wins
        save_weights(root, f"tmp/unet_{i}_tmp.pth", i, seed=10 + i)
    run = load_minimagen_run(root, t5)
    assert run.imagen.image_sizes == (16, 32) and run.imagen.unets[1].lowres_cond
    assert [s.num_timesteps for s in run.imagen.noise_schedulers] == [25, 25]
    assert_weights(run, expected)
    assert run.config["train"]["minimagen"]["weights"] == [f"state_dicts/unet_{i}_state_{STAMP}.pth" for i in (0, 1)]


def test_tmp_layout_and_early_names(tmp_path, t5):
    """A training that stopped before its first validation has tmp/ only; early MinImagen wrote
    unet_N_<P>_percent.pth there and unet_N_state_<timestamp>[_epoch_E]_<loss>.pth per new best."""
    root = write_parameters(tmp_path / "tmp_only")
    expected = [save_weights(root, f"tmp/unet_{i}_tmp.pth", i, seed=i) for i in range(2)]
    assert_weights(load_minimagen_run(root, t5), expected)

    root = write_parameters(tmp_path / "early")
    save_weights(root, f"state_dicts/unet_0_state_{STAMP}_epoch_1_0.512.pth", 0, seed=1)
    best = save_weights(root, f"state_dicts/unet_0_state_{STAMP}_epoch_2_0.305.pth", 0, seed=2)
    save_weights(root, f"state_dicts/unet_0_state_{STAMP}_epoch_3_nan.pth", 0, seed=3)
    save_weights(root, "tmp/unet_1_50_percent.pth", 1, seed=4)
    latest = save_weights(root, "tmp/unet_1_100_percent.pth", 1, seed=5)
    run = load_minimagen_run(root, t5)
    assert_weights(run, [best, latest])
    assert run.config["train"]["minimagen"]["weights"][0].endswith("epoch_2_0.305.pth")


def test_newest_parameters_and_weights_win(tmp_path, t5):
    """Files of two trainings in one directory: the newest timestamp's parameters and weights."""
    old, new = "20220801_120000", "20220816_165729"
    root = write_parameters(tmp_path / "training", unets=(BASE,), stamp=old, image_sizes=[8])
    write_parameters(root, stamp=new)
    save_weights(root, f"state_dicts/unet_0_state_{old}.pth", 0, seed=1)
    expected = [save_weights(root, f"state_dicts/unet_{i}_state_{new}.pth", i, seed=2 + i) for i in range(2)]
    run = load_minimagen_run(root, t5)
    assert run.imagen.image_sizes == (16, 32)
    assert_weights(run, expected)


def test_unet_trained_alone_is_refused_until_its_partner_is_copied_in(tmp_path, t5):
    """only_train_unet_number=2: tmp/ holds unet 0's untrained starting weights, never used."""
    root = write_parameters(tmp_path / "sr_alone", only_train_unet_number=2)
    save_weights(root, "tmp/unet_0_tmp.pth", 0, seed=0)
    save_weights(root, "tmp/unet_1_tmp.pth", 1, seed=1)
    trained = save_weights(root, f"state_dicts/unet_1_state_{STAMP}.pth", 1, seed=2)
    with pytest.raises(CheckpointError) as error:
        load_minimagen_run(root, t5)
    message = str(error.value)
    print(f"\n{message}")
    assert f"{root}/state_dicts/unet_0_state_<timestamp>.pth is missing" in message
    assert "only_train_unet_number=2" in message and "Copy unet 0's state dict" in message
    assert "unets=" not in message  # no complete cascade without a base Unet
    base = save_weights(root, "state_dicts/unet_0_state_20220901_101010.pth", 0, seed=3)  # the fix
    assert_weights(load_minimagen_run(root, t5), [base, trained])


def test_base_trained_alone_loads_as_a_shorter_cascade(tmp_path, t5):
    root = write_parameters(tmp_path / "base_alone", only_train_unet_number=1)
    base = save_weights(root, f"state_dicts/unet_0_state_{STAMP}.pth", 0, seed=0)
    save_weights(root, "tmp/unet_1_tmp.pth", 1, seed=1)
    with pytest.raises(CheckpointError, match=re.escape("unet_1_state_<timestamp>.pth is missing")) as error:
        load_minimagen_run(root, t5)
    assert "unets=1" in str(error.value)
    run = load_minimagen_run(root, t5, unets=1)
    assert run.imagen.image_sizes == (16,)
    assert_weights(run, [base])
    with pytest.raises(CheckpointError, match="between 1 and 2"):
        load_minimagen_run(root, t5, unets=3)


def test_imagen_export_unets_takes_the_trained_part_of_a_cascade(tmp_path, t5):
    from imagen.export.cli import main as export_cli
    from imagen.runtime import load_bundle

    root = write_parameters(tmp_path / "base_alone", only_train_unet_number=1)
    save_weights(root, f"state_dicts/unet_0_state_{STAMP}.pth", 0, seed=0)
    out, common = tmp_path / "bundle", ["--ckpt", str(root), "--text-encoder", str(t5), "--max-batch", "1", "--quiet"]
    refused = CliRunner().invoke(export_cli, [*common, "--out", str(out)])
    assert refused.exit_code == 2 and "imagen-export --unets 1" in refused.output and not out.exists()
    assert CliRunner().invoke(export_cli, [*common, "--out", str(out), "--unets", "1"]).exit_code == 0
    assert load_bundle(out).manifest.image_sizes == (16,)
    too_many = CliRunner().invoke(export_cli, [*common, "--out", str(tmp_path / "b3"), "--unets", "3"])
    assert too_many.exit_code == 2 and "between 1 and 2" in too_many.output


def test_one_unet_cascade_exports_and_runs_like_the_reference(tmp_path, t5):
    """A base Unet trained as its own cascade (one parameters file) is complete: it exports and runs."""
    from imagen.export.bundle import export_bundle
    from imagen.runtime import Pipeline

    root = write_parameters(tmp_path / "training", unets=(BASE,))
    save_weights(root, f"state_dicts/unet_0_state_{STAMP}.pth", 0, seed=0)
    manifest = export_bundle(root, tmp_path / "bundle", text_encoder=t5, max_batch=1)
    assert manifest.image_sizes == (16,) and sorted(manifest.stages) == ["text_encoder", "unet_0"]
    pipe = Pipeline.load(tmp_path / "bundle", backend="onnxruntime", threads=1)
    ours = pipe(["a red circle"], seed=7, sampler="ddim", steps=4).array
    run = load_minimagen_run(root, t5)
    embeds, mask = run.text_encoder.encode(["a red circle"])
    theirs = to_uint8(
        run.imagen.sample(embeds, mask, sampler="ddim", steps=4, noise=np.random.Generator(np.random.PCG64(7)))
    ).numpy()
    assert ours.shape == (1, 16, 16, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def _broken(case, root):
    """Damages a complete two-Unet directory; returns the file name the error must name."""
    params = root / "parameters"
    if case == "missing params file":
        (params / f"imagen_params_{STAMP}.json").write_text(
            json.dumps({**MINIMAGEN_PARAMS, "image_sizes": [16, 32, 64]})
        )
        return f"unet_2_params_{STAMP}.json"
    if case == "extra params file":
        (params / f"imagen_params_{STAMP}.json").write_text(json.dumps({**MINIMAGEN_PARAMS, "image_sizes": [16]}))
        return f"unet_1_params_{STAMP}.json"
    if case == "extra weights":
        save_weights(root, f"state_dicts/unet_2_state_{STAMP}.pth", 1, seed=9)
        return f"unet_2_state_{STAMP}.pth"
    if case == "no weights":
        (root / "state_dicts" / f"unet_1_state_{STAMP}.pth").unlink()
        return "unet_1_state_<timestamp>.pth is missing"
    if case == "wrong shapes":
        save_weights(root, f"state_dicts/unet_1_state_{STAMP}.pth", 1, seed=9, unet={**SUPER, "dim": 16})
        return f"unet_1_state_{STAMP}.pth does not fit unet 1"
    if case in ("missing key", "unexpected key"):
        file = root / "state_dicts" / f"unet_0_state_{STAMP}.pth"
        state = torch.load(file, weights_only=True)
        if case == "missing key":
            state.pop("final_conv.bias")
        else:
            state["extra.weight"] = torch.zeros(1)
        torch.save(state, file)
        return f"unet_0_state_{STAMP}.pth does not fit unet 0"
    if case == "not a state dict":
        file = root / "state_dicts" / f"unet_0_state_{STAMP}.pth"
        torch.save({"model": torch.load(file, weights_only=True), "epoch": 3}, file)
        return f"unet_0_state_{STAMP}.pth is not a state dict of tensors"
    if case == "pickled":
        import datetime
        import pickle

        (root / "tmp" / "unet_0_tmp.pth").write_bytes(pickle.dumps({"w": datetime.date(2020, 1, 1)}))
        (root / "state_dicts" / f"unet_0_state_{STAMP}.pth").unlink()
        return "unet_0_tmp.pth: it is not a plain tensor state dict that loads with weights_only=True"
    if case == "unknown weights name":
        shutil.copy(root / "state_dicts" / f"unet_0_state_{STAMP}.pth", root / "state_dicts" / "unet_0_best.pth")
        return "unet_0_best.pth is not named as MinImagen names"
    if case == "unknown unet parameter":
        (params / f"unet_1_params_{STAMP}.json").write_text(json.dumps({**UNET_DEFAULTS, **SUPER, "heads": 4}))
        return f"unet_1_params_{STAMP}.json: unknown Unet parameters ['heads']"
    if case == "per-level mismatch":
        (params / f"unet_0_params_{STAMP}.json").write_text(
            json.dumps({**UNET_DEFAULTS, **BASE, "num_resnet_blocks": [1, 2, 3]})
        )
        return f"unet_0_params_{STAMP}.json: num_resnet_blocks has 3 entries"
    if case == "too few timesteps":
        (params / f"imagen_params_{STAMP}.json").write_text(json.dumps({**MINIMAGEN_PARAMS, "timesteps": 10}))
        return f"imagen_params_{STAMP}.json: the linear schedule needs timesteps > 20"
    if case == "bad only_train_unet_number":
        (params / f"imagen_params_{STAMP}.json").write_text(
            json.dumps({**MINIMAGEN_PARAMS, "only_train_unet_number": 3})
        )
        return f"imagen_params_{STAMP}.json gives only_train_unet_number 3"
    if case == "unreadable params":
        (params / f"imagen_params_{STAMP}.json").write_text("{not json")
        return f"cannot read {params}/imagen_params_{STAMP}.json"
    if case == "other text width":
        for i in range(2):
            save_weights(root, f"state_dicts/unet_{i}_state_{STAMP}.pth", i, seed=i, width=48)
        return f"unet_0_state_{STAMP}.pth was trained on text embeddings of width 48"
    if case == "declared text width":
        (params / f"imagen_params_{STAMP}.json").write_text(json.dumps({**MINIMAGEN_PARAMS, "text_embed_dim": 768}))
        return f"imagen_params_{STAMP}.json gives text_embed_dim 768"
    raise AssertionError(case)


BROKEN = [
    "missing params file",
    "extra params file",
    "extra weights",
    "no weights",
    "wrong shapes",
    "missing key",
    "unexpected key",
    "not a state dict",
    "pickled",
    "unknown weights name",
    "unknown unet parameter",
    "per-level mismatch",
    "too few timesteps",
    "bad only_train_unet_number",
    "unreadable params",
    "other text width",
    "declared text width",
]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_directory_names_the_file(case, tmp_path, t5):
    root = write_parameters(tmp_path / "training")
    for i in range(2):
        save_weights(root, f"state_dicts/unet_{i}_state_{STAMP}.pth", i, seed=i)
    load_minimagen_run(root, t5)  # complete before the damage
    expected = _broken(case, root)
    with pytest.raises(CheckpointError) as error:
        load_minimagen_run(root, t5)
    assert expected in str(error.value), str(error.value)


# A three-Unet cascade, 16 -> 32 -> 64, trained with imagen-train and exported (FP32).

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    from imagen.export.bundle import export_bundle
    from imagen.reference.cli import main as train_cli

    root = tmp_path_factory.mktemp("three")
    result = CliRunner().invoke(
        train_cli,
        [
            "--out",
            str(root / "run"),
            "--image-sizes",
            "16,32,64",
            "--unet",
            "BaseTest",
            "--unet",
            "SuperTest",
            "--unet",
            "SuperTest",
            "--schedule",
            "cosine",
            "--timesteps",
            "12",
            "--batch-size",
            "2",
            "--steps",
            "3",
            "--val-every",
            "3",
            "--checkpoint-every",
            "3",
            "--sample-every",
            "0",
            "--max-length",
            "16",
            "--seed",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = export_bundle(root / "run", root / "bundle", max_batch=2)
    torch.set_num_threads(2)
    return root / "run", root / "bundle", manifest


@pytest.fixture(scope="module")
def three_pipe(three):
    from imagen.runtime import Pipeline

    return Pipeline.load(three[1], backend="onnxruntime", threads=1)


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def both(run_dir, pipe, seed, **kwargs):
    """Reference and runtime, the same prompts, seed and settings: (final images, every step) each."""
    run = load_run(run_dir, "latest")
    ref_steps, ours = [], []
    embeds, mask = run.text_encoder.encode(PROMPTS)
    images = run.imagen.sample(
        embeds,
        mask,
        noise=np.random.Generator(np.random.PCG64(seed)),
        callback=lambda u, i, t, x: ref_steps.append((u, i, t, x.numpy().copy())),
        **kwargs,
    )
    result = pipe(PROMPTS, seed=seed, callback=lambda u, i, t, x: ours.append((u, i, t, x.copy())), **kwargs)
    return (result.array, to_uint8(images).numpy()), (ours, ref_steps)


def check_parity(label, finals, steps, expected_steps):
    (ours, theirs), (our_steps, ref_steps) = finals, steps
    assert [s[:3] for s in our_steps] == [s[:3] for s in ref_steps] and len(our_steps) == expected_steps
    errors = [relative_error(x, y) for (*_, x), (*_, y) in zip(our_steps, ref_steps)]
    worst = {u: max(e for (v, *_), e in zip(our_steps, errors) if v == u) for u in range(3)}
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    value, over_one = psnr(ours, theirs), float(np.mean(diff > 1))
    print(
        f"\n{label}: worst per-step rel error per Unet {worst}; uint8 max diff {diff.max()}, "
        f"fraction > 1 level {over_one:.4%}, PSNR {value:.1f} dB"
    )
    assert max(errors) <= 1e-4
    assert ours.shape == (2, 64, 64, 3) and over_one <= 0.001 and value >= 45.0


def test_three_unet_run_and_bundle(three):
    run_dir, bundle, manifest = three
    config = json.loads((run_dir / "config.json").read_text())
    assert [u["lowres_cond"] for u in config["unets"]] == [False, True, True]
    assert manifest.image_sizes == (16, 32, 64)
    assert sorted(manifest.stages) == ["text_encoder", "unet_0", "unet_1", "unet_2"]
    assert all(s.parity.passed for s in manifest.stages.values())


def test_three_unets_ddpm_every_step(three, three_pipe):
    finals, steps = both(three[0], three_pipe, 1234)
    check_parity("3 Unets, ddpm, all 12 steps each", finals, steps, 36)


@pytest.mark.parametrize("sampler,steps,eta,sr_strength", [("ddim", 5, 0.5, 1.0), ("dpmpp_2m", 5, 0.0, 0.6)])
def test_three_unets_samplers_every_step(sampler, steps, eta, sr_strength, three, three_pipe):
    finals, seen = both(three[0], three_pipe, 99, sampler=sampler, steps=steps, eta=eta, sr_strength=sr_strength)
    check_parity(
        f"3 Unets, {sampler} {steps} steps, eta {eta}, sr_strength {sr_strength}",
        finals,
        seen,
        steps + 2 * round(steps * sr_strength),
    )


def test_imagen_run_writes_the_three_unet_image(three, three_pipe, tmp_path):
    from PIL import Image

    from imagen.runtime.cli import main as run_cli

    png = tmp_path / "out.png"
    result = CliRunner().invoke(
        run_cli, ["a red circle", "--bundle", str(three[1]), "-o", str(png), "--seed", "5", "--steps", "4", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(png))
    assert image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image, three_pipe(["a red circle"], seed=5, steps=4).array[0])
