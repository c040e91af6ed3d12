"""`ExportOptions`: every choice of one export, declared once with its default and checked when made.
`imagen-export`'s options build one; `export_bundle` takes one (or its fields as keywords)."""

from dataclasses import dataclass
from pathlib import Path

from imagen.reference.checkpoint import WEIGHT_KINDS
from imagen.runtime.contract import check_sampler, check_sr_strength, is_int

from .external_data import EXTERNAL_DATA_THRESHOLD

MAX_BATCH_LIMIT = 1024
OPSETS = (17, 23)  # the ONNX opsets the exporter is used with, inclusive


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how.

    - `fp16`: FP16 Unets (FP32 inputs and outputs); the text encoder stays FP32.
    - `tensorrt`: also build TensorRT engines for this machine's GPU; `tensorrt_version_compatible`
      builds version-compatible ones (also run by the lean runtime of the same version) and implies it.
    - `weights`: which checkpoint of a run (`WEIGHT_KINDS`); `text_encoder`: a T5 folder (needed for
      MinImagen directories, else it replaces the run's own); `unets=K`: the first K Unets of a
      MinImagen directory (a complete, smaller cascade); `stage2`: a DeepFloyd IF stage II folder
      (IFSuperResolutionPipeline), when the checkpoint is an IF stage I folder. imagen-pytorch
      checkpoints: `config`, a JSON file of the cascade's parameters (for a checkpoint without
      `imagen_params`), and `ema`, take its EMA weights instead of the trained ones.
    - `max_batch`: the largest number of images per call (Unets see twice this: cond + uncond);
      `opset`: the ONNX opset.
    - `sampler`, `steps`, `sr_strength`: the bundle's defaults (steps None: every trained timestep;
      sr_strength 1: super-resolution from pure noise).
    - `external_data_threshold`: a stage with more weight bytes keeps them in external data files
      (0: every stage); `record_source_path`: the manifest also names the run's absolute path.
    - `force`: replace an existing bundle, and write one that fails parity (marked in the manifest).
    """

    fp16: bool = False
    tensorrt: bool = False
    tensorrt_version_compatible: bool = False
    weights: str = "latest"
    text_encoder: str | Path | None = None
    unets: int | None = None
    stage2: str | Path | None = None
    config: str | Path | None = None
    ema: bool = False
    max_batch: int = 8
    opset: int = 18
    sampler: str = "ddpm"
    steps: int | None = None
    sr_strength: float = 1.0
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    record_source_path: bool = False
    force: bool = False

    def __post_init__(self):
        self.check()

    @property
    def builds_engines(self) -> bool:
        return self.tensorrt or self.tensorrt_version_compatible

    def check(self) -> None:
        """Checked before anything is read or written; the bundle's defaults go through the runtime's
        own checks, so that a bundle never carries a default its runtime refuses."""
        check_sampler(self.sampler)
        check_sr_strength(self.sr_strength)
        if self.weights not in WEIGHT_KINDS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_KINDS)}, got {self.weights!r}")
        if self.steps is not None and not _within(self.steps, 1):
            raise ValueError(f"steps must be a positive integer or None, got {self.steps!r}")
        if not _within(self.max_batch, 1, MAX_BATCH_LIMIT):
            raise ValueError(f"max_batch must be an integer in [1, {MAX_BATCH_LIMIT}], got {self.max_batch!r}")
        if not _within(self.opset, *OPSETS):
            raise ValueError(f"opset must be an integer in [{OPSETS[0]}, {OPSETS[1]}], got {self.opset!r}")
        if not _within(self.external_data_threshold, 0):
            raise ValueError(
                f"external_data_threshold must be a non-negative integer, got {self.external_data_threshold!r}"
            )
        if self.unets is not None and not _within(self.unets, 1):
            raise ValueError(f"unets must be a positive integer or None, got {self.unets!r}")


def _within(value, low: int, high: int | None = None) -> bool:
    """An integer (not a bool) in [low, high]."""
    return is_int(value) and low <= value and (high is None or value <= high)
