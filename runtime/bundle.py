"""Verifying a bundle (docs/bundle.md) before any inference session exists.

`load_bundle(path)` reads manifest.json into the typed `Manifest` (imagen.runtime.contract),
then checks, raising BundleError that names the file and the fix on the first problem:
every listed file (stages, external data, tokenizer files, TensorRT engines) is a relative
path inside the bundle (no absolute paths, no `..`, no symlink resolving outside), exists
and has the listed size; the stage signatures are the ones this runtime feeds (the
contract's `text_encoder_signature` and `unet_signature`); the defaults fit the schedules;
and last every file's sha256 (read in 1 MB chunks). TensorRT engines are hashed only when
they will be used (`tensorrt_engines`, or `Bundle.verify_engines`). Nothing is cached across
bundles.
"""

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from .contract import (
    MANIFEST,
    REEXPORT,
    TEXT_ENCODER,
    FileEntry,
    Manifest,
    StageEntry,
    StageSignature,
    sha256_file,
    text_encoder_signature,
    unet_signature,
)
from .contract.sampling import TABLE_SAMPLERS
from .contract.settings import Settings, check_guidance_per_unet, check_sr_strength
from .errors import BundleError, ParameterError
from .samplers import spaced_timesteps
from .schedule import Schedule


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, typed manifest, schedules and default settings."""

    root: Path
    manifest: Manifest
    sha256: str  # of manifest.json's bytes
    schedules: dict[str, Schedule]
    default_settings: Settings
    files: tuple[Path, ...]  # every file whose size and sha256 were checked

    @property
    def short_sha(self) -> str:
        return self.sha256[:16]

    @property
    def stages(self) -> dict[str, StageEntry]:
        return self.manifest.stages

    @property
    def unets(self) -> list[StageEntry]:
        return self.manifest.unets

    @property
    def timesteps(self) -> list[int]:
        """Each Unet's schedule length: the most steps it can take."""
        return [
            self.schedules[stage.name].num_timesteps if stage.how_sampled.steps is None else stage.how_sampled.steps
            for stage in self.unets
        ]

    def walked_timesteps(self, settings: Settings) -> list[list[int]]:
        """The timesteps each Unet walks under `settings` (a super-resolution Unet keeps the last
        sr_strength share; a stage sampled from a per-step table walks its rows, in order)."""
        out = []
        for index, (stage, total, steps) in enumerate(zip(self.unets, self.timesteps, settings.steps, strict=True)):
            sampling, strength = stage.how_sampled, settings.sr_strength if index > 0 else 1.0
            table = None if sampling.steps is None else list(range(sampling.steps))
            out.append(table or spaced_timesteps(total, steps, strength, sampling.spacing, sampling.steps_offset))
        return out

    @property
    def max_batch(self) -> int:
        """Images per request: the text encoder's max batch, and half a Unet's (cond + uncond rows)."""
        encoder = self.manifest.stages[TEXT_ENCODER].signature.batch_max
        return min([encoder] + [stage.signature.batch_max // 2 for stage in self.unets])

    def path(self, entry: FileEntry) -> Path:
        """A listed file's path (checked to stay inside the bundle when it was loaded)."""
        return self.root / PurePosixPath(entry.file.replace("\\", "/"))

    def verify_engines(self) -> "Bundle":
        """This bundle with its TensorRT engines' paths, sizes and hashes checked too."""
        checks = _FileChecks(self.root)
        for name, entry in (self.manifest.tensorrt.engines if self.manifest.tensorrt else {}).items():
            checks.add(entry, f"TensorRT engine {name}")
        checks.verify_hashes()
        return replace(self, files=self.files + checks.paths)


def _inside(root: Path, relative: str, what: str) -> Path:
    """root / relative, refusing absolute paths, `..` and symlinks that leave the bundle."""
    if "\x00" in relative:
        raise BundleError(f"{MANIFEST}: {what} file {relative!r} contains a NUL character; {REEXPORT}")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise BundleError(
            f"{MANIFEST}: {what} file {relative!r} is an absolute path; bundle paths must be relative to the bundle "
            f"folder; {REEXPORT}"
        )
    if ".." in pure.parts:
        raise BundleError(
            f"{MANIFEST}: {what} file {relative!r} contains '..'; bundle paths must stay inside the bundle folder; "
            f"{REEXPORT}"
        )
    path = root / pure
    try:
        resolved = path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as error:  # symlink loops, names the OS refuses
        raise BundleError(f"{path}: cannot resolve ({error}); {REEXPORT}") from error
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(
            f"{path} ({what}) resolves to {resolved}, outside the bundle {root}; bundle files must not link outside "
            f"the bundle; {REEXPORT}"
        )
    return path


class _FileChecks:
    """The bundle's files: path and size checks as they are added, hashes at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: list[tuple[Path, str, str]] = []

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(path for path, _, _ in self.entries)

    def add(self, entry: FileEntry, what: str) -> Path:
        path = _inside(self.root, entry.file, what)
        try:
            actual = path.stat().st_size if path.is_file() else None
        except (OSError, ValueError) as error:  # a name too long for the file system, say
            raise BundleError(f"{MANIFEST}: cannot read {what} file {path} ({error}); {REEXPORT}") from None
        if actual is None:
            raise BundleError(f"{path} ({what}) is missing from the bundle; copy the whole bundle folder or {REEXPORT}")
        if actual != entry.bytes:
            raise BundleError(
                f"{path} ({what}) has {actual} bytes, the manifest expects {entry.bytes}: the file is truncated or "
                f"was replaced; copy it again or {REEXPORT}"
            )
        self.entries.append((path, entry.sha256.lower(), what))
        return path

    def verify_hashes(self) -> None:
        for path, expected, what in self.entries:
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{path} ({what}) has sha256 {actual}, the manifest expects {expected}: the file is corrupted or "
                    f"was replaced; copy it again or {REEXPORT}"
                )


def _check_signature(stage: StageEntry, expected: StageSignature, width: int) -> None:
    """The stage's listed signature has the names, dtypes and shapes this runtime feeds."""
    where = f"{stage.file.file} (stage {stage.name})"
    listed = stage.signature
    embeds = [s for s in listed.inputs if s.name == "text_embeds"]
    is_unet = stage.name != TEXT_ENCODER
    if is_unet and embeds and embeds[0].shape and embeds[0].shape[-1] != width:
        raise BundleError(
            f"{where} expects text_embeds of width {embeds[0].shape[-1]}, but the text encoder produces width "
            f"{width}: the Unets and the text encoder do not belong together; {REEXPORT} from one run"
        )
    for kind, got, wanted in (
        ("inputs", listed.inputs, expected.inputs),
        ("outputs", listed.outputs, expected.outputs),
    ):
        if [s.name for s in got] != [s.name for s in wanted]:
            note = ""
            if is_unet:
                note = (
                    " (the base Unet takes no low-res inputs, super-resolution Unets take lowres_cond_img and "
                    "lowres_noise_times)"
                )
            raise BundleError(
                f"{where} has {kind} {[s.name for s in got]}, this runtime expects {[s.name for s in wanted]}{note}; "
                f"{REEXPORT}"
            )
        for g, w in zip(got, wanted, strict=True):
            if (g.dtype, tuple(g.shape)) != (w.dtype, tuple(w.shape)):
                raise BundleError(
                    f"{where}: {kind[:-1]} {g.name} is {g.dtype} {list(g.shape)}, this runtime expects {w.dtype} "
                    f"{list(w.shape)}; {REEXPORT}"
                )


def _check_stages(manifest: Manifest) -> None:
    length, width = manifest.max_length, manifest.embed_dim
    encoder = manifest.stages[TEXT_ENCODER]
    _check_signature(encoder, text_encoder_signature(length, width, encoder.signature.batch_max), width)
    times = {stage.how_sampled.time for stage in manifest.unets}
    if len(times) > 1:
        raise BundleError(
            f"{MANIFEST}: the Unets are sampled in different kinds of time ({', '.join(sorted(times))}); one "
            f"request's sampler walks every Unet, {REEXPORT}"
        )
    modes = {stage.how_sampled.unconditional for stage in manifest.unets}
    if len(modes) > 1:
        raise BundleError(
            f"{MANIFEST}: the Unets take their unconditional rows in different ways ({', '.join(sorted(modes))}); "
            f"one cascade conditions every Unet alike, {REEXPORT}"
        )
    for index, (stage, size) in enumerate(zip(manifest.unets, manifest.image_sizes, strict=True)):
        where = f"{stage.file.file} (stage {stage.name})"
        if stage.image_size is not None and stage.image_size != size:
            raise BundleError(
                f"{where} has image_size {stage.image_size}, but image_sizes[{index}] is {size}; {REEXPORT}"
            )
        if bool(stage.lowres_cond) != (index > 0):
            raise BundleError(
                f"{where}: lowres_cond is {bool(stage.lowres_cond)}; the base Unet must have none and "
                f"super-resolution Unets must have it; {REEXPORT}"
            )
        sampling = stage.how_sampled
        expected = unet_signature(
            index,
            size,
            length,
            width,
            index > 0,
            stage.signature.batch_max // 2,
            manifest.channels,
            null_text=sampling.unconditional == "null_text",
            learned_variance=sampling.variance == "learned_range",
            self_cond=sampling.self_cond,
            prediction=sampling.prediction,
        )
        _check_signature(stage, expected, width)


def check_settings_fit(manifest: Manifest, settings: Settings) -> None:
    """ParameterError unless the settings can sample this bundle: a stage sampled from a per-step table
    (imagen-pytorch's continuous time or Karras sigmas) takes only its own sampler, its table's number
    of steps and no sr_strength; a discrete stage any sampler but those."""
    for index, stage in enumerate(manifest.unets):
        sampling = stage.how_sampled
        if sampling.sampler is None:
            if settings.sampler in TABLE_SAMPLERS.values():
                raise ParameterError(
                    "sampler", "a sampler over a discrete schedule (ddpm, ddim, dpmpp_2m, ...)", settings.sampler
                )
            continue
        if settings.sampler != sampling.sampler:
            raise ParameterError(
                "sampler",
                f"{sampling.sampler} (this bundle's Unets are sampled in {sampling.time} time)",
                settings.sampler,
            )
        if settings.steps[index] != sampling.steps:
            raise ParameterError(
                "steps",
                f"{sampling.steps} for {stage.name} (its steps are fixed by the bundle's per-step table; "
                "imagen-export --steps N writes another)",
                settings.steps[index],
            )
        if index > 0 and settings.sr_strength != 1:
            raise ParameterError(
                "sr_strength",
                f"1 for {stage.name} (a {sampling.time}-time stage starts from noise)",
                settings.sr_strength,
            )


def _default_settings(manifest: Manifest, timesteps: list[int]) -> Settings:
    """The bundle's defaults as Settings, checked as a request's values are."""
    defaults = manifest.defaults
    steps = defaults.steps_per_unet(timesteps)
    try:
        settings = Settings(
            sampler=defaults.sampler,
            steps=steps,
            guidance_scale=check_guidance_per_unet(defaults.guidance_per_unet(len(timesteps)), len(timesteps)),
            sr_strength=check_sr_strength(1.0 if defaults.sr_strength is None else defaults.sr_strength),
        )
        check_settings_fit(manifest, settings)
        return settings
    except ParameterError as error:
        raise BundleError(
            f"{MANIFEST}: defaults.{error.parameter} {error.value!r} is not {error.limit}; {REEXPORT}"
        ) from None


def _schedules(manifest: Manifest) -> dict[str, Schedule]:
    schedules = {}
    for name, entry in manifest.schedules.items():
        try:
            schedules[name] = Schedule(entry.betas, entry.alphas_cumprod)
        except BundleError as error:
            raise BundleError(f"{MANIFEST}: schedules.{name}: {error}") from None
    return schedules


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


def read_manifest(path) -> tuple[Path, bytes, Manifest]:
    """(bundle folder, manifest.json's bytes, the typed manifest); reading only, no file is checked."""
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
        raise BundleError(f"{manifest_path} is not valid JSON ({error}); the bundle is damaged, {REEXPORT}") from None
    try:
        return root, raw, Manifest.from_json(data)
    except BundleError as error:
        raise BundleError(f"{root}: {error}") from None


def load_bundle(path, *, tensorrt_engines: bool = False) -> Bundle:
    """Reads and verifies the bundle at `path` (a folder, or its manifest.json); BundleError if unusable.

    TensorRT engine files are checked (path, size, sha256) only with `tensorrt_engines`; their
    paths are always checked to stay inside the bundle."""
    root, raw, manifest = read_manifest(path)
    checks = _FileChecks(root)
    for name, stage in manifest.stages.items():
        checks.add(stage.file, f"stage {name}")
        for index, extra in enumerate(stage.external_data):
            checks.add(extra, f"stage {name} external data {index}")
    for name, entry in manifest.tokenizer.files.items():
        checks.add(entry, f"tokenizer file {name}")
    for name, entry in (manifest.tensorrt.engines if manifest.tensorrt else {}).items():
        if tensorrt_engines:
            checks.add(entry, f"TensorRT engine {name}")
        else:
            _inside(root, entry.file, f"TensorRT engine {name}")
    schedules = _schedules(manifest)
    _check_stages(manifest)
    timesteps = [
        schedules[stage.name].num_timesteps if stage.how_sampled.steps is None else stage.how_sampled.steps
        for stage in manifest.unets
    ]
    default_settings = _default_settings(manifest, timesteps)
    checks.verify_hashes()
    return Bundle(root, manifest, hashlib.sha256(raw).hexdigest(), schedules, default_settings, checks.paths)
