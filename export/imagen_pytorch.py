"""imagen-pytorch checkpoints (lucidrains/imagen-pytorch 2.1.0) -> this project's stages.

`ImagenTrainer.save` writes one torch file: `model` (the `Imagen` or `ElucidatedImagen` state dict,
Unet i under `unets.{i}.`), `ema` (the trainer's `EMA` wrappers, Unet i under `{i}.ema_model.`),
`version` (the package version), `steps` (int64, training steps per Unet; 0 = never trained), the
optimizers' states and, for a cascade built from `ImagenConfig`/`ElucidatedImagenConfig`, `imagen_type`
('original' or 'elucidated') and `imagen_params` (the config's fields as plain values). Without the
last two the user passes the config as a dict (`{"type": ..., "imagen": {...}}`, the layout of
imagen-pytorch's own CLI config file).

`read_imagen_pytorch` reads and checks the file with `torch.load(weights_only=True)` (nothing pickled
runs) and never imports imagen_pytorch: it resolves each Unet's constructor arguments as the cascade
builds them (the Unet class's defaults < UnetConfig's < the file's < `Imagen.cast_model_parameters`),
so that `imagen_pytorch.Unet(**stage.unet_params).load_state_dict(stage.state_dict)` rebuilds it, and
each stage's sampling settings as `Imagen.sample` / `ElucidatedImagen.sample` use them.
"""

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError

TESTED_VERSION = "2.1.0"  # the release whose sampling the runtime reproduces step for step
KINDS = {"original": "Imagen", "elucidated": "ElucidatedImagen"}
DEFAULT_T5_NAME = "google/t5-v1_1-base"

# Unet.__init__'s defaults for the arguments read here
UNET_DEFAULTS = dict(
    channels=3, channels_out=None, cond_on_text=True, lowres_cond=False, self_cond=False, cond_images_channels=0
)
UNET_DEFAULTS.update(max_text_len=256, cond_dim=None, learned_sinu_pos_emb_dim=16, init_cross_embed=True)
# UnetConfig's declared defaults, which win over the Unet's (text_embed_dim is replaced by the cascade's)
UNET_CONFIG_DEFAULTS = dict(cond_dim=None, channels=3, attn_dim_head=32, attn_heads=16)
# Imagen.__init__'s and ElucidatedImagen.__init__'s defaults for what their configs do not declare
COMMON_DEFAULTS = dict(
    text_encoder_name=DEFAULT_T5_NAME,
    text_embed_dim=None,
    channels=3,
    lowres_noise_schedule="linear",
    lowres_sample_noise_level=0.2,
    condition_on_text=True,
    auto_normalize_img=True,
    dynamic_thresholding=True,
    dynamic_thresholding_percentile=0.95,
    resize_mode="nearest",
    video=False,
)
IMAGEN_DEFAULTS = {**COMMON_DEFAULTS, "timesteps": 1000, "noise_schedules": "cosine", "pred_objectives": "noise"}
IMAGEN_DEFAULTS["cond_drop_prob"] = 0.1
KARRAS_FIELDS = ("num_sample_steps", "sigma_min", "sigma_max", "sigma_data", "rho")
CHURN_FIELDS = ("S_churn", "S_tmin", "S_tmax", "S_noise")
ELUCIDATED_DEFAULTS = {**COMMON_DEFAULTS, "cond_drop_prob": 0.1}
ELUCIDATED_DEFAULTS.update(num_sample_steps=32, sigma_min=0.002, sigma_max=80, sigma_data=0.5, rho=7)
ELUCIDATED_DEFAULTS.update(S_churn=80, S_tmin=0.05, S_tmax=50, S_noise=1.003)
# ImagenConfig's and ElucidatedImagenConfig's declared defaults, which win over the classes'
CONFIG_DEFAULTS = {
    "original": dict(video=False, timesteps=1000, noise_schedules="cosine", channels=3, cond_drop_prob=0.5),
    "elucidated": dict(video=False, channels=3, cond_drop_prob=0.5, num_sample_steps=32, sigma_min=0.002),
}
CONFIG_DEFAULTS["elucidated"].update(sigma_max=80, sigma_data=0.5, rho=7, S_churn=80, S_tmin=0.05, S_tmax=50)
CONFIG_DEFAULTS["elucidated"].update(S_noise=1.003)
NOISE_SCHEDULES = ("cosine", "linear")
OBJECTIVES = ("noise", "x_start", "v")


@dataclass(frozen=True)
class ContinuousSchedule:
    """`Imagen`'s GaussianDiffusionContinuousTimes for one Unet: `timesteps` steps over t in [1, 0],
    log-SNR from `noise_schedule`, the Unet predicting `pred_objective`."""

    noise_schedule: str
    timesteps: int
    pred_objective: str


@dataclass(frozen=True)
class KarrasSchedule:
    """`ElucidatedImagen`'s hyperparameters for one Unet (EDM, Karras et al. 2022, eq. 5 and alg. 2)."""

    num_sample_steps: int
    sigma_min: float
    sigma_max: float
    sigma_data: float
    rho: float
    S_churn: float
    S_tmin: float
    S_tmax: float
    S_noise: float


@dataclass(frozen=True)
class ImagenPytorchStage:
    """One Unet of the cascade: how to rebuild it, its weights, and how `sample()` drives it."""

    unet_number: int  # 1-based, as imagen-pytorch counts
    image_size: int
    unet_params: dict  # imagen_pytorch.Unet(**unet_params) builds it as the cascade did
    state_dict: dict  # name -> torch.Tensor, the Unet's own names
    steps: int  # training steps the trainer counted for this Unet
    schedule: ContinuousSchedule | KarrasSchedule
    dynamic_thresholding: bool
    dynamic_thresholding_percentile: float
    cond_drop_prob: float  # > 0: trained with text dropout, so guidance (cond_scale != 1) is allowed
    lowres_noise_schedule: str  # the augmentation schedule of the low-res image (super-resolution stages)
    lowres_sample_noise_level: float
    resize_mode: str  # F.interpolate mode between stages
    auto_normalize_img: bool  # images in [0, 1] outside, [-1, 1] inside

    @property
    def index(self) -> int:
        return self.unet_number - 1

    @property
    def lowres_cond(self) -> bool:
        return self.unet_params["lowres_cond"]

    @property
    def self_cond(self) -> bool:
        return self.unet_params["self_cond"]

    @property
    def channels(self) -> int:
        return self.unet_params["channels"]

    @property
    def cond_on_text(self) -> bool:
        return self.unet_params["cond_on_text"]

    @property
    def text_embed_dim(self) -> int | None:
        return self.unet_params["text_embed_dim"]

    @property
    def max_text_len(self) -> int:
        return self.unet_params["max_text_len"]


@dataclass(frozen=True)
class ImagenPytorchCheckpoint:
    path: Path
    kind: str  # 'original' (Imagen) or 'elucidated' (ElucidatedImagen)
    version: str
    weights: str  # 'ema' or 'model'
    params: dict  # the cascade's parameters, defaults filled in
    stages: tuple[ImagenPytorchStage, ...]

    @property
    def text_encoder_name(self) -> str:
        return self.params["text_encoder_name"]

    @property
    def condition_on_text(self) -> bool:
        return self.params["condition_on_text"]


def _load(path: Path) -> dict:
    """The file's object, with nothing pickled run (tensors memory-mapped where the format allows)."""
    import torch

    if not path.is_file():
        raise ExportError(f"{path} is not a file; pass the checkpoint that ImagenTrainer.save wrote")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), None)
        if detail is None:  # not a pickle at all; torch's message would suggest weights_only=False
            raise ExportError(f"cannot read {path}: not a file torch.save wrote, or a damaged one") from error
        raise ExportError(
            f"{path}: torch.load(weights_only=True) refuses it ({detail}). Checkpoints are read without running "
            "pickled code: load it where you trust it and save it again with only tensors and plain values "
            "(drop the extra objects passed to ImagenTrainer.save)"
        ) from error
    except Exception as error:  # zip, EOF and format errors come in many kinds; name the file
        raise ExportError(f"cannot read {path} as a torch checkpoint: {error}") from error
    if not isinstance(obj, dict) or not {"model", "version", "steps"} <= obj.keys():
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ExportError(
            f"{path} is not a checkpoint written by imagen-pytorch's ImagenTrainer.save (it needs model, version "
            f"and steps; found {found}); save the trainer with trainer.save(path)"
        )
    return obj


def _check_version(path: Path, version, allow_untested_version: bool) -> str:
    if str(version) == TESTED_VERSION:
        return TESTED_VERSION
    message = (
        f"{path} was saved by imagen-pytorch {version}; this project reproduces the sampling of {TESTED_VERSION} "
        "only, and other releases differ in it"
    )
    if not allow_untested_version:
        raise ExportError(
            message + ": load it in imagen-pytorch 2.1.0 and save it again, or pass allow_untested_version=True"
        )
    warnings.warn(message + "; exported anyway, check the images against imagen-pytorch's own", stacklevel=3)
    return str(version)


def _kind_and_params(path: Path, obj: dict, config: dict | None) -> tuple[str, dict]:
    """'original' or 'elucidated', and the config's fields: from the file, else from `config`."""
    if config is not None:
        if "imagen_params" in config:  # the checkpoint's own two keys
            kind, params = config.get("imagen_type"), config["imagen_params"]
        else:  # imagen-pytorch's CLI config file
            kind, params = config.get("type", "original"), config.get("imagen")
        where = "the config"
    elif "imagen_params" in obj:
        kind, params, where = obj.get("imagen_type"), obj["imagen_params"], str(path)
    else:
        raise ExportError(
            f"{path} has no imagen_params: the cascade was not built from ImagenConfig or ElucidatedImagenConfig. "
            'Pass --config with a JSON file {"type": "original" or "elucidated", "imagen": {...}} holding the '
            "parameters the cascade was built with (the layout of imagen-pytorch's CLI config)"
        )
    if kind not in KINDS:
        raise ExportError(f"{where}: imagen type is {kind!r}; supported: 'original' (Imagen), 'elucidated'")
    if not isinstance(params, dict) or not isinstance(params.get("unets"), (list, tuple)) or not params["unets"]:
        raise ExportError(f"{where}: the imagen parameters need a non-empty list 'unets' of Unet parameters")
    defaults = IMAGEN_DEFAULTS if kind == "original" else ELUCIDATED_DEFAULTS
    return kind, {**defaults, **CONFIG_DEFAULTS[kind], **params}


def _per_unet(params: dict, name: str, count: int) -> tuple:
    """imagen-pytorch's cast_tuple(value, count): one value for all, or exactly one per Unet."""
    value = params[name]
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
    if len(values) != count:
        raise ExportError(f"{name} has {len(values)} values for {count} Unets; give one, or one per Unet")
    return values


def _noise_schedules(params: dict, count: int) -> tuple:
    """Imagen pads its noise schedules with 'cosine' to two, then with 'linear' (imagen_pytorch.py:1886-1888)."""
    value = params["noise_schedules"]
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    values += ("cosine",) * max(0, 2 - len(values))
    return (values + ("linear",) * max(0, count - len(values)))[:count]


def _unet_weights(obj: dict, weights: str, index: int, unet_number: int, path: Path) -> dict:
    source = obj[weights]
    prefix = f"unets.{index}." if weights == "model" else f"{index}.ema_model."
    state = {key[len(prefix) :]: value for key, value in source.items() if key.startswith(prefix)}
    if "dummy_parameter" in state:
        raise ExportError(f"{path}: Unet {unet_number} is a NullUnet (a placeholder); export a cascade of real Unets")
    if not state:
        raise ExportError(f"{path}: {weights} holds no weights for Unet {unet_number} (no keys under {prefix!r})")
    return state


def _text_embed_dim(params: dict, state: dict, path: Path):
    if not params["condition_on_text"]:
        return None
    if params["text_embed_dim"] is not None:
        return params["text_embed_dim"]
    if "text_to_cond.weight" not in state:  # Imagen reads the T5 config; the weights say it as well
        raise ExportError(f"{path}: no text_embed_dim and no text_to_cond weights; give text_embed_dim in the config")
    return int(state["text_to_cond.weight"].shape[1])


def _unet_params(raw, index: int, cascade: dict, text_embed_dim, where: str) -> dict:
    """The Unet's constructor arguments after Imagen.cast_model_parameters (imagen_pytorch.py:1470)."""
    if not isinstance(raw, dict):
        raise ExportError(f"{where}: Unet {index + 1}'s parameters are {type(raw).__name__}, not a dict")
    if raw.get("is_null"):
        raise ExportError(f"{where}: Unet {index + 1} is a NullUnet (a placeholder); export a cascade of real Unets")
    if "dim" not in raw or "dim_mults" not in raw:
        raise ExportError(f"{where}: Unet {index + 1}'s parameters need dim and dim_mults (UnetConfig's required)")
    params = {**UNET_DEFAULTS, **UNET_CONFIG_DEFAULTS, **raw}
    params.update(
        lowres_cond=index > 0,
        cond_on_text=cascade["condition_on_text"],
        text_embed_dim=text_embed_dim,
        channels=cascade["channels"],
        channels_out=cascade["channels"],
    )
    if params["cond_images_channels"]:
        raise ExportError(
            f"{where}: Unet {index + 1} is conditioned on images (cond_images_channels "
            f"{params['cond_images_channels']}); this project exports text-to-image cascades without cond_images"
        )
    return params


def _check_shapes(params: dict, state: dict, unet_number: int, path: Path) -> None:
    """What the weights say about the parameters: the input channels (image, low-res image, self-condition)
    and the text widths. A mismatch means the parameters are not the ones the cascade was trained with."""
    conv = state.get("init_conv.convs.0.weight", state.get("init_conv.weight"))
    expected = params["channels"] * (1 + int(params["lowres_cond"]) + int(params["self_cond"]))
    found = {"input channels": (None if conv is None else int(conv.shape[1]), expected)}
    if params["cond_on_text"] and "text_to_cond.weight" in state:
        found["text_embed_dim"] = (int(state["text_to_cond.weight"].shape[1]), params["text_embed_dim"])
    if "null_text_embed" in state:
        found["max_text_len"] = (int(state["null_text_embed"].shape[1]), params["max_text_len"])
        found["cond_dim"] = (int(state["null_text_embed"].shape[2]), params["cond_dim"] or params["dim"])
    for name, (got, want) in found.items():
        if got != want:
            raise ExportError(
                f"{path}: Unet {unet_number}'s weights have {name} {got}, its parameters give {want} "
                "(channels, lowres_cond, self_cond, text_embed_dim, max_text_len, cond_dim); pass the parameters "
                "the cascade was trained with"
            )


def _schedule(kind: str, params: dict, index: int, count: int) -> ContinuousSchedule | KarrasSchedule:
    if kind == "original":
        timesteps = _per_unet(params, "timesteps", count)[index]
        noise_schedule = _noise_schedules(params, count)[index]
        objective = _per_unet(params, "pred_objectives", count)[index]
        if noise_schedule not in NOISE_SCHEDULES or objective not in OBJECTIVES:
            raise ExportError(
                f"Unet {index + 1}: noise schedule {noise_schedule!r}, objective {objective!r}; supported: "
                f"{', '.join(NOISE_SCHEDULES)} and {', '.join(OBJECTIVES)}"
            )
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ExportError(f"Unet {index + 1}: timesteps is {timesteps!r}; it must be a positive integer")
        return ContinuousSchedule(noise_schedule, timesteps, objective)
    values = {name: _per_unet(params, name, count)[index] for name in (*KARRAS_FIELDS, *CHURN_FIELDS)}
    if not isinstance(values["num_sample_steps"], int) or values["num_sample_steps"] < 2:
        raise ExportError(f"Unet {index + 1}: num_sample_steps is {values['num_sample_steps']!r}; at least 2")
    return KarrasSchedule(**values)


def read_imagen_pytorch(
    path: str | Path,
    config: dict | None = None,
    *,
    use_ema: bool = True,
    allow_untested_version: bool = False,
    allow_untrained: bool = False,
) -> ImagenPytorchCheckpoint:
    """Reads and checks an ImagenTrainer checkpoint; ExportError says what is wrong and what to do.

    `config` stands in for a file without `imagen_params` (or overrides it): imagen-pytorch's CLI config
    layout `{"type": ..., "imagen": {...}}` or the file's own `{"imagen_type": ..., "imagen_params": ...}`.
    `use_ema` takes the EMA weights (what ImagenTrainer.sample uses), else the trained ones. A Unet the
    trainer never stepped is refused unless `allow_untrained`; a file of another imagen-pytorch release
    unless `allow_untested_version` (then a warning)."""
    path = Path(path)
    obj = _load(path)
    version = _check_version(path, obj["version"], allow_untested_version)
    kind, params = _kind_and_params(path, obj, config)
    where = "the config" if config is not None else str(path)
    if params["video"]:
        raise ExportError(f"{where}: a video cascade (Unet3D); this project exports image cascades (2-D Unets)")
    weights = "ema" if use_ema else "model"
    if weights not in obj:
        raise ExportError(
            f"{path} holds no EMA weights (the trainer ran with use_ema=False); export the trained weights instead"
        )
    count = len(params["unets"])
    image_sizes = params.get("image_sizes")
    image_sizes = tuple(image_sizes) if isinstance(image_sizes, (list, tuple)) else (image_sizes,)
    if len(image_sizes) != count or not all(isinstance(size, int) and size > 0 for size in image_sizes):
        raise ExportError(
            f"{where}: image_sizes is {params.get('image_sizes')!r}; give one size for each of {count} Unets"
        )
    if params["lowres_noise_schedule"] not in NOISE_SCHEDULES:
        raise ExportError(
            f"{where}: lowres_noise_schedule is {params['lowres_noise_schedule']!r}; supported: cosine, linear"
        )
    steps = obj["steps"].tolist() if hasattr(obj["steps"], "tolist") else obj["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
        raise ExportError(
            f"{path}: steps is {obj['steps']!r}, not the trainer's count per Unet; save it with ImagenTrainer"
        )
    if len(steps) != count:
        raise ExportError(f"{path}: the trainer counted steps for {len(steps)} Unets, the parameters give {count}")
    first_state = _unet_weights(obj, weights, 0, 1, path)
    params["text_embed_dim"] = _text_embed_dim(params, first_state, path)
    thresholding = _per_unet(params, "dynamic_thresholding", count)
    stages = []
    for index, raw in enumerate(params["unets"]):
        unet_number = index + 1
        unet_params = _unet_params(raw, index, params, params["text_embed_dim"], where)
        state = first_state if index == 0 else _unet_weights(obj, weights, index, unet_number, path)
        _check_shapes(unet_params, state, unet_number, path)
        if steps[index] == 0 and not allow_untrained:
            raise ExportError(
                f"{path}: Unet {unet_number} was never trained (the trainer's steps is 0); train it, or export the "
                "cascade up to the Unet before it"
            )
        stages.append(
            ImagenPytorchStage(
                unet_number=unet_number,
                image_size=image_sizes[index],
                unet_params=unet_params,
                state_dict=state,
                steps=steps[index],
                schedule=_schedule(kind, params, index, count),
                dynamic_thresholding=bool(thresholding[index]),
                dynamic_thresholding_percentile=float(params["dynamic_thresholding_percentile"]),
                cond_drop_prob=float(params["cond_drop_prob"]),
                lowres_noise_schedule=params["lowres_noise_schedule"],
                lowres_sample_noise_level=float(params["lowres_sample_noise_level"]),
                resize_mode=params["resize_mode"],
                auto_normalize_img=bool(params["auto_normalize_img"]),
            )
        )
    return ImagenPytorchCheckpoint(path, kind, version, weights, params, tuple(stages))
