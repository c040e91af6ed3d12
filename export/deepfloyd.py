"""DeepFloyd IF in diffusers' format -> this project's stages.

An IF stage is a folder written by `IFPipeline.save_pretrained` (stage I, 64x64 from text) or
`IFSuperResolutionPipeline.save_pretrained` (stage II, 256x256 from stage I's output):
`model_index.json`, `unet/`, `scheduler/`, `image_noising_scheduler/` (stage II), and `text_encoder/`
+ `tokenizer/` (T5, in stage I). `read_if_folder` reads and checks the folder without loading
weights (`deepfloyd_onnx` loads and exports the stages). The semantics are diffusers' (`pipeline_if.py`,
`pipeline_if_superresolution.py`, `scheduling_ddpm.py`).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from imagen.runtime.contract import StageSignature, unet_signature

from .errors import ExportError

STAGE_1, STAGE_2 = "IFPipeline", "IFSuperResolutionPipeline"
MAX_LENGTH = 77  # IF's encode_prompt pads and truncates to 77 whatever the tokenizer's own length
# The pipelines' __call__ defaults: (steps, guidance_scale)
STAGE_DEFAULTS = {STAGE_1: (100, 7.0), STAGE_2: (50, 4.0)}
NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default augmentation timestep
SUPPORTED = {
    "beta_schedule": ("squaredcos_cap_v2", "linear"),
    "variance_type": ("learned_range", "fixed_small"),
    "prediction_type": ("epsilon",),
    "timestep_spacing": ("leading", "linspace", "trailing"),
}
# DDPMScheduler's own defaults (diffusers 0.42), for the keys an older scheduler_config.json omits
DDPM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


@dataclass(frozen=True)
class IFSchedule:
    """A DDPMScheduler's settings, as diffusers' `set_timesteps`, `step` and `add_noise` use them."""

    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    variance_type: str
    prediction_type: str
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float
    clip_sample: bool
    clip_sample_range: float
    timestep_spacing: str
    steps_offset: int

    def betas(self) -> tuple[float, ...]:
        """The betas exactly as DDPMScheduler holds them (float32; squaredcos_cap_v2 computed in
        float64 and then cast, as diffusers does)."""
        import torch
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )
        return tuple(scheduler.betas.to(torch.float32).tolist())


@dataclass(frozen=True)
class IFStage:
    """What the bundle needs of one IF folder; nothing here loads weights."""

    folder: Path
    pipeline_class: str  # STAGE_1 or STAGE_2
    image_size: int  # the Unet's sample_size
    channels: int  # image channels (3)
    in_channels: int  # the Unet's: channels, or 2 * channels with the low-res image beside x
    out_channels: int  # channels, or 2 * channels with the learned variance
    cross_attention_dim: int
    encoder_hid_dim: int | None  # the T5 width when the Unet projects it to cross_attention_dim
    schedule: IFSchedule
    noising_schedule: IFSchedule | None  # stage II: image_noising_scheduler
    noise_level: int | None  # stage II: the default augmentation timestep
    steps: int
    guidance_scale: float
    has_text_encoder: bool  # text_encoder/ and tokenizer/ are in the folder
    max_length: int = MAX_LENGTH
    clean_caption: bool = True  # both pipelines' default

    @property
    def lowres_cond(self) -> bool:
        return self.pipeline_class == STAGE_2

    @property
    def index(self) -> int:
        """The stage's place in the cascade: unet_0 for stage I, unet_1 for stage II."""
        return 1 if self.lowres_cond else 0

    @property
    def learned_variance(self) -> bool:
        return self.schedule.variance_type == "learned_range"

    @property
    def embed_dim(self) -> int:
        """The width of the text embeddings the Unet reads (T5's d_model)."""
        return self.encoder_hid_dim or self.cross_attention_dim

    def signature(self, max_batch: int, max_length: int = MAX_LENGTH) -> StageSignature:
        return unet_signature(
            self.index,
            self.image_size,
            max_length,
            self.embed_dim,
            self.lowres_cond,
            max_batch,
            self.channels,
            null_text=False,
            learned_variance=self.learned_variance,
        )


def _unsupported(where: Path, field: str, value, supported: str) -> ExportError:
    return ExportError(f"{where}: {field} is {value!r}; this project supports {supported}")


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise ExportError(f"{file.parent}: no {file.name}; {what}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"cannot read {file}: {error}") from error
    if not isinstance(data, dict):
        raise ExportError(f"{file} is not a JSON object; save the folder again with save_pretrained")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(file: Path, config: dict, field: str, ok: bool, supported: str) -> None:
    if not ok:
        raise _unsupported(file, field, config.get(field), supported)


def read_schedule(folder: Path, component: str, *, full: bool = True) -> IFSchedule:
    """The DDPMScheduler in `folder/component`. `full=False` checks only what `add_noise` reads (the
    betas), for the image noising scheduler."""
    file = folder / component / "scheduler_config.json"
    raw = _read_json(file, f"the folder needs its {component} as diffusers saves it")
    if raw.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise _unsupported(file, "_class_name", raw["_class_name"], "DDPMScheduler (IF's own scheduler)")
    config = {**DDPM_DEFAULTS, **raw}
    _check(file, config, "trained_betas", config["trained_betas"] is None, "null (betas from beta_schedule)")
    _check(file, config, "rescale_betas_zero_snr", config["rescale_betas_zero_snr"] is False, "false")
    timesteps = config["num_train_timesteps"]
    _check(file, config, "num_train_timesteps", _is_int(timesteps) and timesteps >= 2, "an integer of at least 2")
    fields = ("beta_schedule", *SUPPORTED) if full else ("beta_schedule",)
    for field in dict.fromkeys(fields):
        _check(file, config, field, config[field] in SUPPORTED[field], ", ".join(SUPPORTED[field]))
    start, end = config["beta_start"], config["beta_end"]
    if config["beta_schedule"] == "linear" and not (_is_number(start) and _is_number(end) and 0 < start <= end < 1):
        raise ExportError(
            f"{file}: beta_start is {start!r}, beta_end {end!r}; supported: 0 < beta_start <= beta_end < 1"
        )
    if full:
        for field in ("thresholding", "clip_sample"):
            _check(file, config, field, isinstance(config[field], bool), "true or false")
        if config["thresholding"]:
            ratio, max_value = config["dynamic_thresholding_ratio"], config["sample_max_value"]
            _check(file, config, "dynamic_thresholding_ratio", _is_number(ratio) and 0 < ratio <= 1, "(0, 1]")
            _check(file, config, "sample_max_value", _is_number(max_value) and max_value > 0, "a positive number")
        elif config["clip_sample"]:
            value = config["clip_sample_range"]
            _check(file, config, "clip_sample_range", _is_number(value) and value > 0, "a positive number")
        offset = config["steps_offset"]
        valid = _is_int(offset) and 0 <= offset < timesteps
        _check(file, config, "steps_offset", valid, f"an integer in [0, {timesteps})")
    return IFSchedule(**{name: config[name] for name in IFSchedule.__dataclass_fields__})


def _unet_facts(folder: Path, stage_2: bool) -> dict:
    """The Unet's sizes from unet/config.json; the settings that change its call are checked."""
    if not (folder / "unet").is_dir():
        raise ExportError(
            f"{folder}: no unet/ folder; an IF stage folder holds its Unet in unet/ as save_pretrained writes it"
        )
    file = folder / "unet" / "config.json"
    config = _read_json(file, "the Unet folder needs its config.json as save_pretrained writes it")
    _check(file, config, "_class_name", config.get("_class_name") == "UNet2DConditionModel", "UNet2DConditionModel")
    for field in ("sample_size", "in_channels", "out_channels", "cross_attention_dim"):
        if field not in config:
            raise ExportError(f"{file}: no {field}; save the Unet again with save_pretrained")
    size = config["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    _check(file, config, "sample_size", _is_int(size) and size > 0, "a positive integer (square images)")
    in_channels, out_channels = config["in_channels"], config["out_channels"]
    channels = in_channels // 2 if stage_2 else in_channels
    expected = "twice the image channels (x and the upscaled image)" if stage_2 else "the image channels"
    _check(
        file,
        config,
        "in_channels",
        _is_int(in_channels) and in_channels > 0 and (not stage_2 or in_channels % 2 == 0),
        expected,
    )
    _check(file, config, "out_channels", out_channels in (channels, 2 * channels), f"{channels} or {2 * channels}")
    class_embed = "timestep" if stage_2 else None
    _check(file, config, "class_embed_type", config.get("class_embed_type") == class_embed, repr(class_embed))
    _check(file, config, "addition_embed_type", config.get("addition_embed_type") in (None, "text"), "null or 'text'")
    hid_type = config.get("encoder_hid_dim_type")
    _check(file, config, "encoder_hid_dim_type", hid_type in (None, "text_proj"), "null or 'text_proj'")
    _check(file, config, "time_cond_proj_dim", config.get("time_cond_proj_dim") is None, "null")
    cross, hid = config["cross_attention_dim"], config.get("encoder_hid_dim")
    _check(file, config, "cross_attention_dim", _is_int(cross), "one integer for every block")
    _check(file, config, "encoder_hid_dim", hid is None or _is_int(hid), "null or an integer")
    return dict(
        image_size=size,
        channels=channels,
        in_channels=in_channels,
        out_channels=out_channels,
        cross_attention_dim=cross,
        encoder_hid_dim=hid,
    )


def _has_text_encoder(folder: Path, index: dict) -> bool:
    """model_index.json names a text encoder and tokenizer ([library, class], or [null, null] when left
    out) and their folders are there."""
    names = ("text_encoder", "tokenizer")
    return all(isinstance(index.get(n), list) and index[n][:1] != [None] and (folder / n).is_dir() for n in names)


def read_if_folder(path: str | Path) -> IFStage:
    """Reads and checks an IF stage folder (model_index.json, unet/, scheduler/ and, for stage II,
    image_noising_scheduler/); ExportError names the file, the field, its value and what is supported."""
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; pass an IF stage folder as IFPipeline.save_pretrained writes it")
    index_file = folder / "model_index.json"
    index = _read_json(
        index_file, "an IF stage folder is written by IFPipeline or IFSuperResolutionPipeline.save_pretrained"
    )
    pipeline_class = index.get("_class_name")
    _check(
        index_file, index, "_class_name", pipeline_class in STAGE_DEFAULTS, f"{STAGE_1} (stage I), {STAGE_2} (stage II)"
    )
    stage_2 = pipeline_class == STAGE_2
    unet = _unet_facts(folder, stage_2)
    schedule = read_schedule(folder, "scheduler")
    if schedule.variance_type == "learned_range" and unet["out_channels"] != 2 * unet["channels"]:
        raise ExportError(
            f"{folder}: scheduler variance_type is 'learned_range' but the Unet has out_channels "
            f"{unet['out_channels']}; learned_range needs {2 * unet['channels']} (noise and variance)"
        )
    noising = read_schedule(folder, "image_noising_scheduler", full=False) if stage_2 else None
    if noising is not None and NOISE_LEVEL >= noising.num_train_timesteps:
        raise ExportError(
            f"{folder}: image_noising_scheduler has {noising.num_train_timesteps} timesteps, fewer than "
            f"IF's default noise level {NOISE_LEVEL} needs"
        )
    steps, guidance = STAGE_DEFAULTS[pipeline_class]
    stage = IFStage(
        folder=folder,
        pipeline_class=pipeline_class,
        **unet,
        schedule=schedule,
        noising_schedule=noising,
        noise_level=NOISE_LEVEL if stage_2 else None,
        steps=steps,
        guidance_scale=guidance,
        has_text_encoder=_has_text_encoder(folder, index),
    )
    if stage.has_text_encoder:
        width = _read_json(folder / "text_encoder" / "config.json", "save the T5 encoder with save_pretrained").get(
            "d_model"
        )
        if width != stage.embed_dim:
            raise ExportError(
                f"{folder}: text_encoder has d_model {width!r}, the Unet reads text of width {stage.embed_dim} "
                "(encoder_hid_dim, else cross_attention_dim); pass the T5 encoder the Unet was trained with"
            )
    return stage


def check_if_cascade(stage_1: IFStage, stage_2: IFStage) -> None:
    """Stage I's output feeds stage II: the kinds, the text width and the channels must agree."""
    if stage_1.lowres_cond or not stage_2.lowres_cond:
        raise ExportError(
            f"stage I must be an {STAGE_1} folder and stage II an {STAGE_2} folder; got {stage_1.folder} "
            f"({stage_1.pipeline_class}) and {stage_2.folder} ({stage_2.pipeline_class})"
        )
    if stage_1.embed_dim != stage_2.embed_dim or stage_1.channels != stage_2.channels:
        raise ExportError(
            f"{stage_2.folder} reads text of width {stage_2.embed_dim} and {stage_2.channels} channels, "
            f"{stage_1.folder} gives {stage_1.embed_dim} and {stage_1.channels}: pass stages of one IF release"
        )
    if stage_2.image_size <= stage_1.image_size:
        raise ExportError(
            f"{stage_2.folder} makes {stage_2.image_size}x{stage_2.image_size} images, not larger than stage I's "
            f"{stage_1.image_size}: pass the super-resolution stage as stage II"
        )
