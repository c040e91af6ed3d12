"""imagen-pytorch checkpoints: what `read_imagen_pytorch` reads from tiny `Imagen` and `ElucidatedImagen`
cascades that imagen-pytorch 2.1.0 trained and saved itself (tests/imagen_pytorch_tiny.py), held against
what imagen-pytorch's own loader makes of the same files; and every file it refuses, by the error's words.

Against imagen-pytorch: the cascade's settings as `load_imagen_from_checkpoint` builds them, the Unet
constructor arguments as the cascade passed them (`Unet._locals`), the defaults of its classes, and each
Unet rebuilt from the reader's parameters and weights, loaded strictly, giving the same output as
imagen-pytorch's Unet to the bit (measured: 0.0). The cascades are made in a child process (about 30 s
on 2 cores); without imagen-pytorch installed the tests skip. imagen-pytorch 2.1.0 beside the CPU torch:
`pip install --no-deps imagen-pytorch==2.1.0` and `pip install accelerate beartype datasets einops
ema-pytorch kornia pytorch-warmup torch==2.13.0` (its torchvision from PyPI needs a CUDA torch and breaks
transformers' imports beside the CPU one).
"""

import fractions
import json

import pytest
import torch
from imagen_pytorch_tiny import IMAGE_SIZES, MAX_TEXT_LEN, TRAIN_STEPS, missing_packages

from imagen.export import imagen_pytorch as reader
from imagen.export.errors import ExportError
from imagen.export.imagen_pytorch import TESTED_VERSION, ContinuousSchedule, KarrasSchedule, read_imagen_pytorch

TRAINING_ONLY = ("loss_type", "P_mean", "P_std")  # config fields that sampling never reads
LOG_SNR = {"alpha_cosine_log_snr": "cosine", "beta_linear_log_snr": "linear"}  # imagen-pytorch's function names

pytestmark = pytest.mark.skipif(
    bool(missing_packages()), reason=f"imagen-pytorch 2.1.0 is not installed (missing: {missing_packages()})"
)


@pytest.fixture(scope="module")
def tiny(imagen_pytorch_files):
    files = imagen_pytorch_files
    return dict(imagen=files["imagen"], elucidated=files["elucidated"], facts=json.loads(files["facts"].read_text()))


def plain(value):
    """As JSON holds it: tuples become lists."""
    return json.loads(json.dumps(value))


def saved_copy(tiny, tmp_path, name="imagen", change=None):
    """The tiny checkpoint without its optimizer states, changed by `change(obj)`, saved in tmp_path."""
    obj = torch.load(tiny[name], map_location="cpu", weights_only=True)
    obj = {key: value for key, value in obj.items() if not key.startswith("optim")}
    if change is not None:
        change(obj)
    path = tmp_path / f"{name}.pt"
    torch.save(obj, path)
    return path


def check_unets_against_upstream(checkpoint, facts):
    for stage, upstream in zip(checkpoint.stages, facts["unets"], strict=True):
        print(f"Unet {stage.unet_number}: rebuilt vs imagen-pytorch max abs {upstream['max_abs_difference']:.1e}")
        assert upstream["max_abs_difference"] == 0.0 and upstream["output_scale"] > 1e-4
        assert plain(stage.unet_params) == plain(upstream["locals"])
        assert stage.steps == TRAIN_STEPS and stage.lowres_cond == (stage.index > 0)
        assert (stage.text_embed_dim, stage.max_text_len, stage.channels) == (facts["text_embed_dim"], MAX_TEXT_LEN, 3)


def check_cascade_settings(checkpoint, facts):
    assert [s.image_size for s in checkpoint.stages] == facts["image_sizes"] == list(IMAGE_SIZES)
    assert [s.dynamic_thresholding for s in checkpoint.stages] == facts["dynamic_thresholding"]
    for stage in checkpoint.stages:
        assert stage.dynamic_thresholding_percentile == facts["dynamic_thresholding_percentile"]
        assert stage.lowres_sample_noise_level == facts["lowres_sample_noise_level"]
        assert stage.lowres_noise_schedule == LOG_SNR[facts["lowres_noise_schedule"]]
        assert stage.cond_drop_prob == facts["cond_drop_prob"]
        assert (stage.resize_mode, stage.auto_normalize_img) == ("nearest", True)


# --- the cascades as imagen-pytorch builds them


def test_imagen_matches_imagen_pytorch(tiny):
    checkpoint = read_imagen_pytorch(tiny["imagen"])
    facts = tiny["facts"]["imagen.pt"]
    assert (checkpoint.kind, checkpoint.version, checkpoint.weights) == ("original", TESTED_VERSION, "ema")
    assert checkpoint.text_encoder_name == "google/t5-v1_1-base" and checkpoint.condition_on_text
    check_cascade_settings(checkpoint, facts)
    check_unets_against_upstream(checkpoint, facts)
    schedules = [s.schedule for s in checkpoint.stages]
    assert all(isinstance(s, ContinuousSchedule) for s in schedules)
    assert [s.noise_schedule for s in schedules] == [LOG_SNR[name] for name in facts["noise_schedules"]]
    assert [s.timesteps for s in schedules] == facts["timesteps"] == [20, 10]
    assert [s.pred_objective for s in schedules] == facts["pred_objectives"] == ["noise", "v"]
    assert [s.self_cond for s in checkpoint.stages] == [True, True]


def test_elucidated_imagen_matches_imagen_pytorch(tiny):
    checkpoint = read_imagen_pytorch(tiny["elucidated"])
    facts = tiny["facts"]["elucidated.pt"]
    assert (checkpoint.kind, checkpoint.version, checkpoint.weights) == ("elucidated", TESTED_VERSION, "ema")
    check_cascade_settings(checkpoint, facts)
    check_unets_against_upstream(checkpoint, facts)
    for stage, hparams in zip(checkpoint.stages, facts["hparams"], strict=True):
        assert isinstance(stage.schedule, KarrasSchedule)
        assert vars(stage.schedule) == {k: v for k, v in hparams.items() if k not in ("P_mean", "P_std")}
    assert [s.schedule.S_churn for s in checkpoint.stages] == [40, 0]
    assert [s.self_cond for s in checkpoint.stages] == [True, False]


def test_defaults_are_imagen_pytorchs(tiny):
    """The defaults filled in here, read from imagen-pytorch's signatures and config classes."""
    upstream = tiny["facts"]["defaults"]
    assert plain(reader.UNET_DEFAULTS) == {k: upstream["Unet"][k] for k in reader.UNET_DEFAULTS}
    assert plain(reader.UNET_CONFIG_DEFAULTS) == {k: upstream["UnetConfig"][k] for k in reader.UNET_CONFIG_DEFAULTS}
    kinds = {
        "original": ("Imagen", "ImagenConfig", reader.IMAGEN_DEFAULTS),
        "elucidated": ("ElucidatedImagen", "ElucidatedImagenConfig", reader.ELUCIDATED_DEFAULTS),
    }
    for kind, (cls, config, defaults) in kinds.items():
        own = {k: v for k, v in defaults.items() if k != "video"}  # video is a config field only
        assert plain(own) == {k: upstream[cls][k] for k in own}
        applied = {**defaults, **reader.CONFIG_DEFAULTS[kind]}  # what the reader fills in for a config
        config_defaults = {k: v for k, v in upstream[config].items() if k not in TRAINING_ONLY}
        assert plain({k: applied[k] for k in config_defaults}) == config_defaults


def test_ema_or_trained_weights(tiny):
    obj = torch.load(tiny["imagen"], map_location="cpu", weights_only=True)
    ema, trained = read_imagen_pytorch(tiny["imagen"]), read_imagen_pytorch(tiny["imagen"], use_ema=False)
    assert trained.weights == "model"
    differ = 0
    for e, t in zip(ema.stages, trained.stages, strict=True):
        assert e.state_dict.keys() == t.state_dict.keys()
        for key, value in e.state_dict.items():
            assert torch.equal(value, obj["ema"][f"{e.index}.ema_model.{key}"])
            assert torch.equal(t.state_dict[key], obj["model"][f"unets.{t.index}.{key}"])
            differ += not torch.equal(value, t.state_dict[key])
    assert differ > 0  # the EMA lags the trained weights after two steps


# --- what the reader refuses, and the ways past it


def test_config_stands_in_for_missing_params(tiny, tmp_path):
    obj = torch.load(tiny["imagen"], map_location="cpu", weights_only=True)
    stripped = saved_copy(tiny, tmp_path, change=lambda o: [o.pop("imagen_type"), o.pop("imagen_params")])
    with pytest.raises(ExportError, match="--config"):
        read_imagen_pytorch(stripped)
    expected = read_imagen_pytorch(tiny["imagen"])
    for config in (
        {"type": "original", "imagen": plain(obj["imagen_params"])},  # imagen-pytorch's CLI config file
        {"imagen_type": "original", "imagen_params": plain(obj["imagen_params"])},
    ):
        checkpoint = read_imagen_pytorch(stripped, config)
        assert [plain(s.unet_params) for s in checkpoint.stages] == [plain(s.unet_params) for s in expected.stages]
        assert [s.schedule for s in checkpoint.stages] == [s.schedule for s in expected.stages]


def test_missing_ema(tiny, tmp_path):
    path = saved_copy(tiny, tmp_path, change=lambda o: o.pop("ema"))
    with pytest.raises(ExportError, match="no EMA weights"):
        read_imagen_pytorch(path)
    assert read_imagen_pytorch(path, use_ema=False).weights == "model"


def test_other_version(tiny, tmp_path):
    path = saved_copy(tiny, tmp_path, change=lambda o: o.update(version="1.26.3"))
    with pytest.raises(ExportError, match=r"1\.26\.3.*2\.1\.0"):
        read_imagen_pytorch(path)
    with pytest.warns(UserWarning, match="1.26.3"):
        assert read_imagen_pytorch(path, allow_untested_version=True).version == "1.26.3"


def test_untrained_unet(tiny, tmp_path):
    path = saved_copy(tiny, tmp_path, change=lambda o: o.update(steps=torch.tensor([TRAIN_STEPS, 0])))
    with pytest.raises(ExportError, match="Unet 2 was never trained"):
        read_imagen_pytorch(path)
    assert [s.steps for s in read_imagen_pytorch(path, allow_untrained=True).stages] == [TRAIN_STEPS, 0]


def change_unet(index, **changes):
    def change(obj):
        unets = list(obj["imagen_params"]["unets"])
        unets[index] = {**unets[index], **changes}
        obj["imagen_params"] = {**obj["imagen_params"], "unets": unets}

    return change


def null_unet_weights(ema):
    """Unet 2's EMA weights as a NullUnet's (its one parameter)."""
    return {**{k: v for k, v in ema.items() if not k.startswith("1.")}, "1.ema_model.dummy_parameter": torch.zeros(1)}


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("cond images", change_unet(1, cond_images_channels=3), "conditioned on images"),
        ("video", lambda o: o["imagen_params"].update(video=True), "video cascade"),
        ("null unet params", lambda o: o["imagen_params"]["unets"].__setitem__(1, {"is_null": True}), "NullUnet"),
        ("null unet weights", lambda o: o.update(ema=null_unet_weights(o["ema"])), "NullUnet"),
        ("imagen type", lambda o: o.update(imagen_type="video"), "imagen type is 'video'"),
        ("pickled object", lambda o: o.update(note=fractions.Fraction(1, 3)), "weights_only.*fractions.Fraction"),
        ("self_cond", change_unet(0, self_cond=False), "input channels 6, its parameters give 3"),
        ("max_text_len", change_unet(1, max_text_len=8), "max_text_len 16, its parameters give 8"),
        ("image sizes", lambda o: o["imagen_params"].update(image_sizes=[8]), "image_sizes"),
        ("timesteps", lambda o: o["imagen_params"].update(timesteps=[20, 10, 5]), "timesteps has 3 values"),
        ("objective", lambda o: o["imagen_params"].update(pred_objectives="eps"), "objective 'eps'"),
        ("not the trainer's", lambda o: o.pop("steps"), "ImagenTrainer.save"),
    ],
)
def test_refused(tiny, tmp_path, name, change, words):
    path = saved_copy(tiny, tmp_path, change=change)
    with pytest.raises(ExportError, match=words):
        read_imagen_pytorch(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ExportError, match="not a file"):
        read_imagen_pytorch(tmp_path / "absent.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ExportError, match="cannot read .*not a file torch.save wrote"):
        read_imagen_pytorch(tmp_path / "text.pt")
    torch.save({"unets.0.final_conv.weight": torch.zeros(1)}, tmp_path / "state_dict.pt")
    with pytest.raises(ExportError, match="ImagenTrainer.save"):
        read_imagen_pytorch(tmp_path / "state_dict.pt")
