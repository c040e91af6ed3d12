"""The manifest's small records (files, parity, schedules, TensorRT engines, source) and the
field readers every record uses: each names the field it could not read and says what to do."""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BundleError
from .settings import is_int, is_number
from .signatures import MANIFEST, REEXPORT


def json_error(where: str, message: str) -> BundleError:
    return BundleError(f"{MANIFEST}: {where} {message}; {REEXPORT}")


JSON_KINDS = {
    int: ("an integer", is_int),
    float: ("a number", is_number),
    str: ("a string", None),
    dict: ("an object", None),
    list: ("a list", None),
    bool: ("true or false", None),
}


def json_field(mapping: dict, key: str, kind, where: str, default=...):
    """mapping[key] if it is of `kind`; `default` when the key is absent (if one is given)."""
    if default is not ... and key not in mapping:
        return default
    value = mapping.get(key)
    name, check = JSON_KINDS[kind]
    if not (check(value) if check else isinstance(value, kind)):
        raise json_error(f"{where}{key}", f"is missing or not {name}")
    return value


def json_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise json_error(where, "is missing or not an object")
    return value


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle: its path relative to the bundle folder, size and sha256."""

    file: str
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, entry, where: str) -> "FileEntry":
        entry = json_object(entry, where)
        file = entry.get("file")
        if not isinstance(file, str) or not file:
            raise json_error(where, "has no file name")
        return cls(file, json_field(entry, "bytes", int, f"{where}."), json_field(entry, "sha256", str, f"{where}."))

    def to_json(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Parity:
    """Relative error of the stage in ONNX Runtime against PyTorch, measured at export."""

    batch_sizes: list
    rel_error: list
    tolerance: float
    passed: bool
    forced: bool

    def to_json(self) -> dict:
        return {
            "batch_sizes": self.batch_sizes,
            "rel_error": self.rel_error,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "forced": self.forced,
        }


@dataclass(frozen=True)
class ScheduleEntry:
    """float64 betas; `kind` and `timesteps` say which recipe made them. `alphas_cumprod`, when
    present, is the cumulative product of 1 - beta as the model's own library takes it (diffusers:
    in float32, by torch's cumprod, whose rounding differs from a running product), used instead of
    the runtime's float64 product."""

    betas: tuple
    kind: str = "linear"
    timesteps: int | None = None
    alphas_cumprod: tuple | None = None

    @classmethod
    def from_json(cls, name: str, entry) -> "ScheduleEntry":
        where = f"schedules.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("betas"), list):
            raise json_error(where, "(with its betas) is missing")
        betas = entry["betas"]
        if not betas or not all(is_number(b) and 0 < b < 1 for b in betas):
            raise json_error(where, "betas must be a non-empty list of numbers in (0, 1)")
        kind = entry.get("kind", "linear")
        cumprod = entry.get("alphas_cumprod")
        if cumprod is not None and (
            not isinstance(cumprod, list)
            or len(cumprod) != len(betas)
            or not all(is_number(a) and 0 < a < 1 for a in cumprod)
            or any(b > a for a, b in zip(cumprod, cumprod[1:]))
        ):
            raise json_error(f"{where}.alphas_cumprod", "must be null or one non-increasing number in (0, 1) per beta")
        return cls(
            tuple(betas),
            kind if isinstance(kind, str) else "linear",
            entry.get("timesteps") if is_int(entry.get("timesteps")) else None,
            None if cumprod is None else tuple(cumprod),
        )

    def to_json(self) -> dict:
        out = {"kind": self.kind, "timesteps": self.timesteps, "betas": list(self.betas)}
        if self.alphas_cumprod is not None:
            out["alphas_cumprod"] = list(self.alphas_cumprod)
        return out


@dataclass(frozen=True)
class TensorRTEntry:
    """Engines built on and for one GPU kind and TensorRT version. What the build measured is optional
    (absent in bundles written before it, and written only when set): the GPU's name, whether the
    engines are version-compatible (runnable by the lean runtime of the same TensorRT version), and
    each engine's largest relative error against ONNX Runtime (CPU) with its tolerance."""

    dir: str
    compute_capability: str
    version: str
    engines: dict[str, FileEntry]
    gpu_name: str | None = None
    version_compatible: bool = False
    max_rel_error: dict[str, float] = field(default_factory=dict)
    tolerance: float | None = None

    @classmethod
    def from_json(cls, entry) -> "TensorRTEntry":
        entry = json_object(entry, "tensorrt")
        engines = json_field(entry, "engines", dict, "tensorrt.")
        errors = json_field(entry, "max_rel_error", dict, "tensorrt.", {})
        if not all(is_number(e) and e >= 0 for e in errors.values()):
            raise json_error("tensorrt.max_rel_error", "must map engine names to non-negative numbers")
        return cls(
            str(entry.get("dir", "")),
            str(entry.get("compute_capability")),
            str(entry.get("version")),
            {name: FileEntry.from_json(e, f"TensorRT engine {name}") for name, e in engines.items()},
            gpu_name=json_field(entry, "gpu_name", str, "tensorrt.", None),
            version_compatible=json_field(entry, "version_compatible", bool, "tensorrt.", False),
            max_rel_error={name: float(e) for name, e in errors.items()},
            tolerance=json_field(entry, "tolerance", float, "tensorrt.", None),
        )

    def to_json(self) -> dict:
        out = {"dir": self.dir, "compute_capability": self.compute_capability, "version": self.version}
        if self.gpu_name is not None:
            out["gpu_name"] = self.gpu_name
        if self.version_compatible:
            out["version_compatible"] = True
        out["engines"] = {name: e.to_json() for name, e in self.engines.items()}
        if self.max_rel_error:
            out["max_rel_error"] = dict(self.max_rel_error)
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        return out


def run_config_sha256(run_dir) -> str:
    """What `source.config_sha256` records: the sha256 of a run's config.json bytes; for a MinImagen
    directory, of its parameters/*.json files' bytes concatenated in sorted file-name order. Equal
    hashes: a run with the same configuration (not necessarily the same checkpoint)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    files = [config] if config.is_file() else sorted((run_dir / "parameters").glob("*.json"), key=lambda p: p.name)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Source:
    """What the bundle was exported from: the run's folder name, the sha256 of its config.json and
    the weights taken; the checkpoint's full path only when export was asked to record it."""

    name: str | None = None
    config_sha256: str | None = None
    checkpoint: str | None = None
    weights: str | None = None

    @classmethod
    def from_json(cls, entry) -> "Source | None":
        if not isinstance(entry, dict):
            return None
        return cls(**{key: entry[key] if isinstance(entry.get(key), str) else None for key in cls.__annotations__})

    def to_json(self) -> dict:
        return {key: getattr(self, key) for key in self.__annotations__ if getattr(self, key) is not None}
