"""Reading and verifying a bundle (docs/bundle.md) before any inference session exists.

`load_manifest(path)` checks, in this order, and raises BundleError naming the file and
the fix on the first problem: manifest.json parses; format and format_version; the
required keys, stages, schedules and tokenizer ids (types and ranges); every listed file
(stages, external data, tokenizer files, TensorRT engines) is a relative path inside the
bundle (no absolute paths, no `..`, no symlink resolving outside), exists and has the
listed size; the stage signatures are the ones this runtime feeds (names, dtypes, shapes,
text width, image sizes, low-res inputs); and finally every file's sha256 (read in 1 MB
chunks). Nothing is cached across bundles.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import BundleError
from .schedule import Schedule

FORMAT = "imagen-bundle"
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
REEXPORT = "re-export the bundle with imagen-export"
BATCH = "batch"
MAX_TOKEN_ID = 2**31 - 256  # token ids (byte + offset included) must fit int64 with room to spare


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints, or "batch"


@dataclass(frozen=True)
class StageSpec:
    """A stage's file and signature, as the manifest lists them."""

    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_min: int
    batch_opt: int
    batch_max: int
    precision: str = "fp32"
    image_size: int | None = None
    lowres_cond: bool = False

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


@dataclass
class Manifest:
    root: Path
    data: dict
    sha256: str  # of manifest.json's bytes
    stages: dict[str, StageSpec]
    schedules: dict[str, Schedule]
    image_sizes: list[int]
    channels: int
    max_length: int
    embed_dim: int
    defaults: dict
    files: list[Path] = field(default_factory=list)

    @property
    def short_sha(self) -> str:
        return self.sha256[:16]

    @property
    def unets(self) -> list[StageSpec]:
        return [self.stages[f"unet_{i}"] for i in range(len(self.image_sizes))]

    @property
    def max_batch(self) -> int:
        """Images per request: the text encoder's max batch, and half a Unet's (cond + uncond rows)."""
        return min([self.stages["text_encoder"].batch_max] + [u.batch_max // 2 for u in self.unets])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require(value, key: str, kind, where: str = MANIFEST):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{where}: {key} is missing or not a {getattr(kind, '__name__', kind)}; {REEXPORT}")
    return value


def _get(mapping: dict, key: str, kind, where: str = MANIFEST):
    return _require(mapping.get(key) if isinstance(mapping, dict) else None, key, kind, where)


def _finite_number(value) -> bool:
    """An int or float that is finite as a float (10**400 is an int that no float holds)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _inside(root: Path, relative, what: str) -> Path:
    """root / relative, refusing absolute paths, `..` and symlinks that leave the bundle."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{MANIFEST}: {what} has no file name; {REEXPORT}")
    if "\x00" in relative:
        raise BundleError(f"{MANIFEST}: {what} file {relative!r} contains a NUL character; {REEXPORT}")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise BundleError(
            f"{MANIFEST}: {what} file {relative!r} is an absolute path; bundle paths must be "
            f"relative to the bundle folder; {REEXPORT}"
        )
    if ".." in pure.parts:
        raise BundleError(
            f"{MANIFEST}: {what} file {relative!r} contains '..'; bundle paths must stay inside "
            f"the bundle folder; {REEXPORT}"
        )
    path = root / pure
    try:
        resolved = path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as error:  # symlink loops, names the OS refuses
        raise BundleError(f"{path}: cannot resolve ({error}); {REEXPORT}") from error
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(
            f"{path} ({what}) resolves to {resolved}, outside the bundle {root}; bundle files "
            f"must not link outside the bundle; {REEXPORT}"
        )
    return path


class _Files:
    """Collects the files to check: path checks and sizes now, hashes at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: list[tuple[Path, str, str]] = []

    def add(self, entry, what: str) -> Path:
        where = f"{MANIFEST} ({what})"
        entry = _require(entry, what, dict)
        path = _inside(self.root, entry.get("file"), what)
        size = _get(entry, "bytes", int, where)
        sha = _get(entry, "sha256", str, where)
        try:
            actual = path.stat().st_size if path.is_file() else None
        except (OSError, ValueError) as error:  # a name too long for the file system, say
            raise BundleError(f"{MANIFEST}: cannot read {what} file {path} ({error}); {REEXPORT}") from None
        if actual is None:
            raise BundleError(
                f"{path} ({what}) is missing from the bundle; copy the whole bundle folder or {REEXPORT}"
            )
        if actual != size:
            raise BundleError(
                f"{path} ({what}) has {actual} bytes, the manifest expects {size}: the file is "
                f"truncated or was replaced; copy it again or {REEXPORT}"
            )
        self.entries.append((path, sha.lower(), what))
        return path

    def verify_hashes(self) -> None:
        for path, expected, what in self.entries:
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{path} ({what}) has sha256 {actual}, the manifest expects {expected}: the file "
                    f"is corrupted or was replaced; copy it again or {REEXPORT}"
                )


def _tensor_specs(stage: str, entries) -> tuple[TensorSpec, ...]:
    where = f"{MANIFEST} (stage {stage})"
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{where}: inputs/outputs must be non-empty lists; {REEXPORT}")
    specs = []
    for entry in entries:
        name = _get(entry, "name", str, where)
        dtype = _get(entry, "dtype", str, where)
        shape = _get(entry, "shape", list, where)
        for d in shape:
            if not (d == BATCH or (isinstance(d, int) and not isinstance(d, bool) and d >= 1)):
                raise BundleError(
                    f"{where}: {name} has dimension {d!r}; expected a positive integer or 'batch'"
                )
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    return tuple(specs)


def expected_signature(
    index: int | None, image_size: int, channels: int, length: int, width: int, lowres: bool
) -> tuple[list[tuple], list[tuple]]:
    """(inputs, outputs) as (name, dtype, shape) that this runtime feeds (docs/bundle.md,
    Stage signatures)."""
    if index is None:
        return (
            [("input_ids", "int64", (BATCH, length)), ("attention_mask", "int64", (BATCH, length))],
            [("text_embeds", "float32", (BATCH, length, width))],
        )
    image = (BATCH, channels, image_size, image_size)
    inputs = [
        ("x", "float32", image),
        ("time", "float32", (BATCH,)),
        ("text_embeds", "float32", (BATCH, length, width)),
        ("text_mask", "bool", (BATCH, length)),
        ("text_keep", "bool", (BATCH,)),
    ]
    if lowres:
        inputs += [("lowres_cond_img", "float32", image), ("lowres_noise_times", "float32", (BATCH,))]
    return inputs, [("noise_pred", "float32", image)]


def _check_signature(stage: StageSpec, inputs: list[tuple], outputs: list[tuple], width: int) -> None:
    where = f"{stage.path.name} (stage {stage.name})"
    if stage.name != "text_encoder":
        embeds = [s for s in stage.inputs if s.name == "text_embeds"]
        if embeds and embeds[0].shape and embeds[0].shape[-1] != width:
            raise BundleError(
                f"{where} expects text_embeds of width {embeds[0].shape[-1]}, but the text encoder "
                f"produces width {width}: the Unets and the text encoder do not belong together; "
                f"{REEXPORT} from one run"
            )
    for kind, listed, wanted in (("inputs", stage.inputs, inputs), ("outputs", stage.outputs, outputs)):
        got = [(s.name, s.dtype, tuple(s.shape)) for s in listed]
        if [g[0] for g in got] != [w[0] for w in wanted]:
            lowres_note = ""
            if stage.name.startswith("unet_"):
                lowres_note = (
                    " (the base Unet takes no low-res inputs, super-resolution Unets take "
                    "lowres_cond_img and lowres_noise_times)"
                )
            raise BundleError(
                f"{where} has {kind} {[g[0] for g in got]}, this runtime expects "
                f"{[w[0] for w in wanted]}{lowres_note}; {REEXPORT}"
            )
        for g, w in zip(got, wanted, strict=False):
            if g != w:
                raise BundleError(
                    f"{where}: {kind[:-1]} {g[0]} is {g[1]} {list(g[2])}, this runtime expects "
                    f"{w[1]} {list(w[2])}; {REEXPORT}"
                )


def _stage(name: str, entry, files: _Files) -> StageSpec:
    where = f"{MANIFEST} (stage {name})"
    entry = _require(entry, f"stages.{name}", dict)
    path = files.add(entry, f"stage {name}")
    for index, extra in enumerate(entry.get("external_data") or []):
        files.add(extra, f"stage {name} external data {index}")
    batch = _get(entry, "batch", dict, where)
    low, opt, high = (_get(batch, k, int, where) for k in ("min", "opt", "max"))
    if not 1 <= low <= high:
        raise BundleError(f"{where}: batch min {low} / max {high} must satisfy 1 <= min <= max; {REEXPORT}")
    return StageSpec(
        name,
        path,
        _tensor_specs(name, entry.get("inputs")),
        _tensor_specs(name, entry.get("outputs")),
        low,
        opt,
        high,
        entry.get("precision", "fp32"),
        entry.get("image_size"),
        bool(entry.get("lowres_cond", False)),
    )


def _bundle_root(path) -> Path:
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not path.exists():
        raise BundleError(f"{path} does not exist; pass the folder written by imagen-export")
    if not path.is_dir():
        raise BundleError(
            f"{path} is not a bundle folder; pass the folder written by imagen-export (it holds {MANIFEST})"
        )
    return path


def _check_default_sampling(defaults: dict, schedules: dict, unets: int, manifest_path: Path) -> None:
    """defaults.sampler names a sampler; defaults.steps is null, an integer, or {"unet_i": n},
    each within the Unet's timesteps; defaults.sr_strength, when present, is in (0, 1]."""
    from .samplers import SAMPLERS

    sampler = defaults.get("sampler", "ddpm")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise BundleError(f"{manifest_path}: defaults.sampler {sampler!r} is not one of {', '.join(SAMPLERS)}; "
                          f"{REEXPORT}")
    steps = defaults.get("steps")
    per_unet = steps if isinstance(steps, dict) else {f"unet_{i}": steps for i in range(unets)}
    for name, value in per_unet.items():
        total = schedules[name].num_timesteps if name in schedules else None
        if value is None and total is not None:
            continue
        if total is None or isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= total:
            raise BundleError(f"{manifest_path}: defaults.steps {steps!r} is not null, an integer in [1, "
                              f"timesteps] or {{\"unet_i\": n}} per Unet; {REEXPORT}")
    strength = defaults.get("sr_strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise BundleError(f"{manifest_path}: defaults.sr_strength {strength!r} is not a number in (0, 1]; "
                          f"{REEXPORT}")


def load_manifest(path, *, tensorrt_engines: bool = False) -> Manifest:
    """Reads and verifies the bundle at `path` (a folder, or its manifest.json); BundleError if unusable.

    TensorRT engine files are checked (path, size, sha256) only with `tensorrt_engines`;
    their paths are always checked to stay inside the bundle."""
    root = _bundle_root(path)
    manifest_path = root / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{root} has no {MANIFEST}; pass the folder written by imagen-export") from None
    except OSError as error:
        raise BundleError(f"cannot read {manifest_path}: {error}") from error
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # too deeply nested
        raise BundleError(
            f"{manifest_path} is not valid JSON ({error}); the bundle is damaged, {REEXPORT}"
        ) from None
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path} is not a JSON object; {REEXPORT}")
    if data.get("format") != FORMAT:
        raise BundleError(
            f"{manifest_path}: format is {data.get('format')!r}, not {FORMAT!r}; this is not an "
            "imagen bundle, pass the folder written by imagen-export"
        )
    version = data.get("format_version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise BundleError(
            f"{manifest_path}: format_version {version!r} is not supported by this runtime "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); {REEXPORT} of this version "
            "or install a matching imagen-cascade"
        )

    channels = _get(data, "channels", int)
    sizes = _get(data, "image_sizes", list)
    if (
        not sizes
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        or sizes != sorted(set(sizes))
    ):
        raise BundleError(
            f"{manifest_path}: image_sizes {sizes!r} must be increasing positive integers; {REEXPORT}"
        )
    text = _get(data, "text", dict)
    length, width = _get(text, "max_length", int), _get(text, "embed_dim", int)
    tokenizer = _get(data, "tokenizer", dict)
    kind = _get(tokenizer, "kind", str)
    if kind not in ("byte", "sentencepiece"):
        raise BundleError(
            f"{manifest_path}: tokenizer kind {kind!r} is unknown (byte, sentencepiece); {REEXPORT}"
        )
    for key in ("pad_id", "eos_id", "offset"):
        value = tokenizer.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_TOKEN_ID:
            raise BundleError(
                f"{manifest_path}: tokenizer.{key} is {value!r}; expected an integer in [0, {MAX_TOKEN_ID}); "
                f"{REEXPORT}"
            )
    defaults = _get(data, "defaults", dict)
    for key in ("guidance_scale", "dynamic_thresholding_percentile", "lowres_sample_noise_level"):
        value = defaults.get(key)
        if not _finite_number(value):
            raise BundleError(f"{manifest_path}: defaults.{key} is missing or not a number; {REEXPORT}")
    if (
        not 0 < defaults["dynamic_thresholding_percentile"] <= 1
        or not 0 <= defaults["lowres_sample_noise_level"] <= 1
    ):
        raise BundleError(
            f"{manifest_path}: defaults out of range (percentile in (0, 1], noise level in [0, 1]); "
            f"{REEXPORT}"
        )

    files = _Files(root)
    stages_entry = _get(data, "stages", dict)
    names = ["text_encoder"] + [f"unet_{i}" for i in range(len(sizes))]
    for name in names:
        if name not in stages_entry:
            raise BundleError(
                f"{manifest_path}: stage {name!r} is missing (a bundle with image_sizes {sizes} has "
                f"stages {', '.join(names)}); {REEXPORT}"
            )
    stages = {name: _stage(name, stages_entry[name], files) for name in names}
    for file_name, entry in (_get(tokenizer, "files", dict)).items():
        files.add(entry, f"tokenizer file {file_name}")
    trt = data.get("tensorrt")
    if trt is not None:
        trt = _require(trt, "tensorrt", dict)
        for name, entry in (_get(trt, "engines", dict)).items():
            if tensorrt_engines:
                files.add(entry, f"TensorRT engine {name}")
            else:
                _inside(
                    root,
                    _require(entry, f"tensorrt.engines.{name}", dict).get("file"),
                    f"TensorRT engine {name}",
                )

    schedules_entry = _get(data, "schedules", dict)
    schedules = {}
    for name in [f"unet_{i}" for i in range(len(sizes))] + (["lowres"] if len(sizes) > 1 else []):
        entry = schedules_entry.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("betas"), list):
            raise BundleError(f"{manifest_path}: schedules.{name} (with its betas) is missing; {REEXPORT}")
        try:
            schedules[name] = Schedule.from_manifest(entry)
        except BundleError as error:
            raise BundleError(f"{manifest_path}: schedules.{name}: {error}") from None

    _check_default_sampling(defaults, schedules, len(sizes), manifest_path)
    inputs, outputs = expected_signature(None, 0, channels, length, width, False)
    _check_signature(stages["text_encoder"], inputs, outputs, width)
    for index, size in enumerate(sizes):
        stage = stages[f"unet_{index}"]
        if stage.image_size is not None and stage.image_size != size:
            raise BundleError(
                f"{stage.path.name} (stage {stage.name}) has image_size {stage.image_size}, but "
                f"image_sizes[{index}] is {size}; {REEXPORT}"
            )
        if stage.lowres_cond != (index > 0):
            raise BundleError(
                f"{stage.path.name} (stage {stage.name}): lowres_cond is {stage.lowres_cond}; the "
                f"base Unet must have none and super-resolution Unets must have it; {REEXPORT}"
            )
        inputs, outputs = expected_signature(index, size, channels, length, width, index > 0)
        _check_signature(stage, inputs, outputs, width)

    files.verify_hashes()
    return Manifest(
        root=root,
        data=data,
        sha256=hashlib.sha256(raw).hexdigest(),
        stages=stages,
        schedules=schedules,
        image_sizes=list(sizes),
        channels=channels,
        max_length=length,
        embed_dim=width,
        defaults=dict(defaults),
        files=[p for p, _, _ in files.entries],
    )
