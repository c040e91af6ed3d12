"""How one Unet stage is sampled (`StageEntry.sampling`, docs/bundle.md, Model families).

The runtime runs every family of the Imagen cascade with one loop; what differs between them is
written per stage. A stage without the entry is sampled as this project's own Unets and MinImagen's
are (every default below), so bundles of format 1 read unchanged. An entry that differs from the
defaults makes the bundle format 2, which older runtimes refuse instead of sampling it wrongly.
"""

from dataclasses import dataclass, fields

from ..errors import BundleError
from .entries import json_error, json_object
from .settings import is_int, is_number
from .signatures import MANIFEST, REEXPORT

SPACINGS = ("linspace", "leading", "trailing")
PREDICTIONS = ("noise",)
VARIANCES = ("fixed", "learned_range")
THRESHOLDS = ("dynamic", "clip", "none")
UNCONDITIONALS = ("null_text", "negative_prompt")
RESIZES = ("bilinear", "bilinear_align_corners")
DRAW_ORDERS = ("lowres_first", "image_first")
CHOICES = {
    "spacing": SPACINGS,
    "prediction": PREDICTIONS,
    "variance": VARIANCES,
    "threshold": THRESHOLDS,
    "unconditional": UNCONDITIONALS,
    "resize": RESIZES,
    "draw_order": DRAW_ORDERS,
}


@dataclass(frozen=True)
class SamplingEntry:
    """How a Unet stage is sampled. `spacing`: which timesteps a number of steps walks (`linspace`,
    this project's round(linspace(T - 1, 0, steps)); diffusers' `leading` and `trailing`, shifted by
    `steps_offset`). `variance`: `fixed` (the posterior's) or `learned_range` (the Unet's
    `variance_pred` interpolates log beta_tilde and log beta; only ancestral DDPM uses it).
    `threshold`: the data prediction is `dynamic`ally thresholded (Imagen: s = quantile(|x0|,
    `threshold_percentile`, or the defaults' percentile when null) clamped to [1, `threshold_max`],
    no upper limit when null), `clip`ped to [-1, 1], or left as is (`none`). `unconditional`: the
    guidance rows come from the Unet's learned null text (`null_text`: cond rows first, with
    text_mask and text_keep) or from a negative prompt's embeddings (`negative_prompt`: uncond rows
    first, every token read). Super-resolution stages: `resize` of the previous stage's image
    (`bilinear`: half-pixel centres; `bilinear_align_corners`: corner to corner) and `draw_order`,
    whether the low-res augmentation noise is drawn before the stage's initial image or after it."""

    spacing: str = "linspace"
    steps_offset: int = 0
    prediction: str = "noise"
    variance: str = "fixed"
    threshold: str = "dynamic"
    threshold_percentile: float | None = None
    threshold_max: float | None = None
    unconditional: str = "null_text"
    resize: str = "bilinear"
    draw_order: str = "lowres_first"

    @classmethod
    def from_json(cls, name: str, entry) -> "SamplingEntry":
        where = f"stages.{name}.sampling"
        entry = json_object(entry, where)
        unknown = sorted(set(entry) - {f.name for f in fields(cls)})
        if unknown:
            raise BundleError(
                f"{MANIFEST}: {where} has fields this runtime does not know ({', '.join(unknown)}); install "
                f"the imagen-cascade release that wrote the bundle, or {REEXPORT}"
            )
        values = {}
        for key, choices in CHOICES.items():
            value = entry.get(key, getattr(cls, key))
            if value not in choices:
                raise json_error(f"{where}.{key}", f"is {value!r}; this runtime supports {', '.join(choices)}")
            values[key] = value
        offset = entry.get("steps_offset", 0)
        if not is_int(offset) or not 0 <= offset < 1000:
            raise json_error(f"{where}.steps_offset", f"is {offset!r}; expected an integer in [0, 1000)")
        percentile, maximum = entry.get("threshold_percentile"), entry.get("threshold_max")
        if percentile is not None and (not is_number(percentile) or not 0 < percentile <= 1):
            raise json_error(f"{where}.threshold_percentile", f"is {percentile!r}; expected null or a number in (0, 1]")
        if maximum is not None and (not is_number(maximum) or maximum < 1):
            raise json_error(f"{where}.threshold_max", f"is {maximum!r}; expected null or a number >= 1")
        return cls(
            **values,
            steps_offset=int(offset),
            threshold_percentile=None if percentile is None else float(percentile),
            threshold_max=None if maximum is None else float(maximum),
        )

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def is_default(self) -> bool:
        """Sampled as format 1 bundles are: the entry may be left out."""
        return self == SamplingEntry()
