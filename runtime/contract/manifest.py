"""The manifest, typed: one frozen dataclass per JSON object (`Manifest`, `StageEntry`, ...),
read with `from_json` (a BundleError naming the field and the fix) and written with
`to_json` (what export writes, key for key).

Reading checks the type and range of each field on its own; whether files exist, their
sizes and hashes, and whether the signatures are the ones this runtime feeds is
verification (`imagen.runtime.bundle`).
"""

from dataclasses import dataclass, field

from ..errors import BundleError, ParameterError
from .entries import (
    FileEntry,
    Parity,
    ScheduleEntry,
    Source,
    TensorRTEntry,
    json_error,
    json_field,
    json_object,
)
from .sampling import SamplingEntry
from .settings import check_sampler, check_sr_strength, check_steps, is_int, is_number
from .signatures import (
    BATCH,
    FORMAT,
    FORMAT_VERSION,
    LOWRES,
    MANIFEST,
    MAX_TOKEN_ID,
    PREPROCESS_MODES,
    REEXPORT,
    SUPPORTED_VERSIONS,
    TOKENIZER_KINDS,
    StageSignature,
    TensorSpec,
    stage_names,
    unet_name,
)


def _tensor_specs(entries, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(entries, list) or not entries:
        raise json_error(where, "must be a non-empty list")
    specs = []
    for entry in entries:
        entry = json_object(entry, where)
        name, dtype = json_field(entry, "name", str, f"{where}."), json_field(entry, "dtype", str, f"{where}.")
        shape = json_field(entry, "shape", list, f"{where}.")
        for d in shape:
            if not (d == BATCH or (is_int(d) and d >= 1)):
                raise json_error(f"{where} {name}", f"has dimension {d!r}; expected a positive integer or {BATCH!r}")
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    return tuple(specs)


@dataclass(frozen=True)
class StageEntry:
    """One stage: its ONNX file (and external data), precision and signature, plus what export measured."""

    name: str
    file: FileEntry
    precision: str
    signature: StageSignature
    parity: Parity | None = None
    flops: int | None = None
    external_data: tuple[FileEntry, ...] = ()
    image_size: int | None = None  # Unets only
    lowres_cond: bool | None = None  # Unets only: true for super-resolution Unets
    sampling: SamplingEntry | None = None  # Unets only; absent: sampled as format 1 bundles are

    @classmethod
    def from_json(cls, name: str, entry) -> "StageEntry":
        where = f"stages.{name}"
        entry = json_object(entry, where)
        file = FileEntry.from_json(entry, f"stage {name}")
        extra = entry.get("external_data") or []
        if not isinstance(extra, list):
            raise json_error(f"{where}.external_data", "must be a list")
        batch = json_object(entry.get("batch"), f"{where}.batch")
        low, opt, high = (json_field(batch, k, int, f"{where}.batch.") for k in ("min", "opt", "max"))
        if not 1 <= low <= high:
            raise json_error(f"{where}.batch", f"min {low} / max {high} must satisfy 1 <= min <= max")
        inputs, outputs = (
            _tensor_specs(entry.get("inputs"), f"{where}.inputs"),
            _tensor_specs(entry.get("outputs"), f"{where}.outputs"),
        )
        parity = entry.get("parity")
        return cls(
            name=name,
            file=file,
            precision=json_field(entry, "precision", str, f"{where}.", "fp32"),
            signature=StageSignature(name, inputs, outputs, low, opt, high),
            parity=Parity(**parity)
            if isinstance(parity, dict) and set(parity) == set(Parity.__annotations__)
            else None,
            flops=entry.get("flops") if is_int(entry.get("flops")) else None,
            external_data=tuple(FileEntry.from_json(e, f"stage {name} external data {i}") for i, e in enumerate(extra)),
            image_size=json_field(entry, "image_size", int, f"{where}.", None),
            lowres_cond=json_field(entry, "lowres_cond", bool, f"{where}.", None),
            sampling=None
            if entry.get("sampling") is None
            else SamplingEntry.from_json(name, entry["sampling"], lowres=name != unet_name(0)),
        )

    @property
    def how_sampled(self) -> SamplingEntry:
        """The stage's sampling entry, or the defaults when it has none."""
        return self.sampling or SamplingEntry()

    def to_json(self) -> dict:
        out = {**self.file.to_json(), "precision": self.precision, **self.signature.to_json()}
        if self.parity is not None:
            out["parity"] = self.parity.to_json()
        if self.flops is not None:
            out["flops"] = self.flops
        if self.external_data:
            out["external_data"] = [e.to_json() for e in self.external_data]
        if self.image_size is not None:
            out["image_size"] = self.image_size
        if self.lowres_cond is not None:
            out["lowres_cond"] = self.lowres_cond
        if self.sampling is not None:
            out["sampling"] = self.sampling.to_json()
        return out


@dataclass(frozen=True)
class TokenizerEntry:
    """`byte` (UTF-8 bytes + offset, ByT5's convention) or `sentencepiece` (files: spiece.model)."""

    kind: str
    pad_id: int = 0
    eos_id: int = 1
    offset: int = 0
    max_length: int | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    extra_ids: int = 0  # sentencepiece: T5's <extra_id_0> ... are the last ids of the vocabulary
    preprocess: str = "none"  # PREPROCESS_MODES: DeepFloyd IF lower-cases and strips, or cleans captions

    @classmethod
    def from_json(cls, entry) -> "TokenizerEntry":
        entry = json_object(entry, "tokenizer")
        kind = json_field(entry, "kind", str, "tokenizer.")
        if kind not in TOKENIZER_KINDS:
            raise json_error("tokenizer", f"kind {kind!r} is unknown ({', '.join(TOKENIZER_KINDS)})")
        ids = {}
        for key, default in (("pad_id", 0), ("eos_id", 1), ("offset", 3 if kind == "byte" else 0)):
            value = entry.get(key, default)
            if not is_int(value) or not 0 <= value < MAX_TOKEN_ID:
                raise json_error(f"tokenizer.{key}", f"is {value!r}; expected an integer in [0, {MAX_TOKEN_ID})")
            ids[key] = value
        files = json_field(entry, "files", dict, "tokenizer.", {})
        extra_ids = entry.get("extra_ids", 0)
        if not is_int(extra_ids) or not 0 <= extra_ids < MAX_TOKEN_ID:
            raise json_error("tokenizer.extra_ids", f"is {extra_ids!r}; expected an integer in [0, {MAX_TOKEN_ID})")
        preprocess = entry.get("preprocess", "none")
        if preprocess not in PREPROCESS_MODES:
            modes = ", ".join(PREPROCESS_MODES)
            raise json_error("tokenizer.preprocess", f"is {preprocess!r}; expected one of {modes}")
        return cls(
            kind,
            **ids,
            max_length=entry.get("max_length") if is_int(entry.get("max_length")) else None,
            files={name: FileEntry.from_json(e, f"tokenizer file {name}") for name, e in files.items()},
            extra_ids=extra_ids,
            preprocess=preprocess,
        )

    def to_json(self) -> dict:
        out = {"kind": self.kind}
        if self.max_length is not None:
            out["max_length"] = self.max_length
        out.update(pad_id=self.pad_id, eos_id=self.eos_id, offset=self.offset)
        out["files"] = {name: e.to_json() for name, e in self.files.items()}
        if self.extra_ids:
            out["extra_ids"] = self.extra_ids
        if self.preprocess != "none":
            out["preprocess"] = self.preprocess
        return out


@dataclass(frozen=True)
class Defaults:
    """The settings a request takes when it leaves them out. `guidance_scale` and `steps` may give
    each Unet its own ({"unet_i": value}, DeepFloyd IF's 7 and 4)."""

    guidance_scale: float | dict
    dynamic_thresholding_percentile: float
    lowres_sample_noise_level: float
    sampler: str = "ddpm"
    steps: int | dict | None = None  # None: every timestep; an int for all Unets; {"unet_i": n}
    sr_strength: float | None = None  # absent in bundles written before it: 1.0

    @classmethod
    def from_json(cls, entry) -> "Defaults":
        entry = json_object(entry, "defaults")
        numbers = {
            k: json_field(entry, k, float, "defaults.")
            for k in ("dynamic_thresholding_percentile", "lowres_sample_noise_level")
        }
        guidance = entry.get("guidance_scale")
        if isinstance(guidance, dict):
            if not all(is_number(v) and v >= 0 for v in guidance.values()):
                raise json_error("defaults.guidance_scale", "must map Unet names to numbers >= 0")
        else:
            numbers["guidance_scale"] = json_field(entry, "guidance_scale", float, "defaults.")
        if (
            not 0 < numbers["dynamic_thresholding_percentile"] <= 1
            or not 0 <= numbers["lowres_sample_noise_level"] <= 1
        ):
            raise json_error("defaults", "out of range (percentile in (0, 1], noise level in [0, 1])")
        defaults = cls(
            **{"guidance_scale": guidance, **numbers},
            sampler=entry.get("sampler", "ddpm"),
            steps=entry.get("steps"),
            sr_strength=entry.get("sr_strength"),
        )
        try:
            check_sampler(defaults.sampler)
            check_sr_strength(1.0 if defaults.sr_strength is None else defaults.sr_strength)
        except ParameterError as error:
            raise json_error(f"defaults.{error.parameter}", f"{error.value!r} is not {error.limit}") from None
        return defaults

    def steps_per_unet(self, timesteps: list[int]) -> tuple[int, ...]:
        """The default steps of each Unet (a Unet left out of {"unet_i": n}, or null, runs every timestep)."""
        names = [unet_name(i) for i in range(len(timesteps))]
        per_unet = self.steps if isinstance(self.steps, dict) else dict.fromkeys(names, self.steps)
        try:
            if not set(per_unet) <= set(names):
                raise ParameterError("steps", "", self.steps)
            return tuple(check_steps(per_unet.get(name), total) for name, total in zip(names, timesteps))
        except ParameterError:
            raise json_error(
                "defaults.steps",
                f'{self.steps!r} is not null, an integer in [1, timesteps] or {{"unet_i": n}} per Unet',
            ) from None

    def guidance_per_unet(self, unets: int) -> float | tuple[float, ...]:
        """The default guidance scale: one number, or one per Unet (every Unet named)."""
        if not isinstance(self.guidance_scale, dict):
            return self.guidance_scale
        names = [unet_name(i) for i in range(unets)]
        if set(self.guidance_scale) != set(names):
            raise json_error("defaults.guidance_scale", f"must name every Unet ({', '.join(names)}) or be one number")
        return tuple(float(self.guidance_scale[name]) for name in names)

    def to_json(self) -> dict:
        out = {
            "guidance_scale": self.guidance_scale,
            "dynamic_thresholding_percentile": self.dynamic_thresholding_percentile,
            "lowres_sample_noise_level": self.lowres_sample_noise_level,
            "sampler": self.sampler,
            "steps": self.steps,
        }
        if self.sr_strength is not None:
            out["sr_strength"] = self.sr_strength
        return out


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed. `producer` and `source` are informative and kept as read."""

    channels: int
    image_sizes: tuple[int, ...]
    max_length: int
    embed_dim: int
    tokenizer: TokenizerEntry
    schedules: dict[str, ScheduleEntry]
    defaults: Defaults
    stages: dict[str, StageEntry]
    tensorrt: TensorRTEntry | None = None
    producer: dict | None = None
    source: Source | None = None
    format_version: int | None = None  # None: the lowest version that says everything (`required_version`)

    @classmethod
    def from_json(cls, data) -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError(f"{MANIFEST} is not a JSON object; {REEXPORT}")
        if data.get("format") != FORMAT:
            raise BundleError(
                f"{MANIFEST}: format is {data.get('format')!r}, not {FORMAT!r}; this is not an "
                "imagen bundle, pass the folder written by imagen-export"
            )
        version = data.get("format_version")
        if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
            raise BundleError(
                f"{MANIFEST}: format_version {version!r} is not supported by this runtime (supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}); {REEXPORT} of this version or install a "
                "matching imagen-cascade"
            )
        sizes = json_field(data, "image_sizes", list, "")
        if not sizes or not all(is_int(s) and s >= 1 for s in sizes) or sizes != sorted(set(sizes)):
            raise json_error("image_sizes", f"{sizes!r} must be increasing positive integers")
        text = json_object(data.get("text"), "text")
        names = stage_names(len(sizes))
        stages = json_object(data.get("stages"), "stages")
        for name in names:
            if name not in stages:
                raise json_error(
                    "stages",
                    f"stage {name!r} is missing (a bundle with image_sizes {sizes} has stages {', '.join(names)})",
                )
        schedules = json_object(data.get("schedules"), "schedules")
        stage_entries = {name: StageEntry.from_json(name, stages[name]) for name in names}
        # a stage sampled from a per-step table (continuous time) has no discrete schedule
        discrete = [name for name in names[1:] if stage_entries[name].how_sampled.time == "discrete"]
        schedule_names = discrete + ([LOWRES] if any(name != unet_name(0) for name in discrete) else [])
        tensorrt = data.get("tensorrt")
        manifest = cls(
            channels=json_field(data, "channels", int, ""),
            image_sizes=tuple(sizes),
            max_length=json_field(text, "max_length", int, "text."),
            embed_dim=json_field(text, "embed_dim", int, "text."),
            tokenizer=TokenizerEntry.from_json(data.get("tokenizer")),
            schedules={name: ScheduleEntry.from_json(name, schedules.get(name)) for name in schedule_names},
            defaults=Defaults.from_json(data.get("defaults")),
            stages=stage_entries,
            tensorrt=None if tensorrt is None else TensorRTEntry.from_json(tensorrt),
            producer=data.get("producer") if isinstance(data.get("producer"), dict) else None,
            source=Source.from_json(data.get("source")),
            format_version=version,
        )
        if manifest.required_version > version:
            raise json_error(
                "format_version",
                f"is {version}, but the manifest uses fields of format {manifest.required_version} (a stage's sampling "
                "entry, a prompt preprocessing, a schedule's alphas_cumprod or a guidance scale per Unet)",
            )
        return manifest

    @property
    def required_version(self) -> int:
        """1, unless a field that format 1 runtimes do not read is used: then FORMAT_VERSION, so that
        they refuse the bundle instead of sampling it as format 1."""
        newer = (
            any(stage.sampling is not None and not stage.sampling.is_default for stage in self.stages.values())
            or self.tokenizer.preprocess != "none"
            or any(schedule.alphas_cumprod is not None for schedule in self.schedules.values())
            or isinstance(self.defaults.guidance_scale, dict)
        )
        return FORMAT_VERSION if newer else 1

    def to_json(self) -> dict:
        out = {"format": FORMAT, "format_version": self.format_version or self.required_version}
        if self.producer is not None:
            out["producer"] = self.producer
        if self.source is not None:
            out["source"] = self.source.to_json()
        out.update(
            channels=self.channels,
            image_sizes=list(self.image_sizes),
            text={"max_length": self.max_length, "embed_dim": self.embed_dim},
            tokenizer=self.tokenizer.to_json(),
            schedules={name: s.to_json() for name, s in self.schedules.items()},
            defaults=self.defaults.to_json(),
            stages={name: s.to_json() for name, s in self.stages.items()},
            tensorrt=None if self.tensorrt is None else self.tensorrt.to_json(),
        )
        return out

    @property
    def unets(self) -> list[StageEntry]:
        return [self.stages[unet_name(i)] for i in range(len(self.image_sizes))]
