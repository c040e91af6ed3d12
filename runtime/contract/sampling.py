"""How one Unet stage is sampled (`StageEntry.sampling`, docs/bundle.md, Model families).

The runtime runs every family of the Imagen cascade with one loop; what differs between them is
written per stage. A stage without the entry is sampled as this project's own Unets and MinImagen's
are (every default below), so bundles of format 1 read unchanged. An entry that differs from the
defaults makes the bundle format 2, which older runtimes refuse instead of sampling it wrongly.
"""

import math
from dataclasses import dataclass, fields

from ..errors import BundleError
from .entries import json_error, json_object
from .settings import is_int, is_number
from .signatures import MANIFEST, REEXPORT

SPACINGS = ("linspace", "leading", "trailing")
TIMES = ("discrete", "continuous", "karras")
PREDICTIONS = ("noise", "x_start", "v", "edm")
GUIDANCES = ("standard", "remove_parallel")
VARIANCES = ("fixed", "learned_range")
THRESHOLDS = ("dynamic", "clip", "none")
UNCONDITIONALS = ("null_text", "negative_prompt")
RESIZES = ("bilinear", "bilinear_align_corners", "nearest")
DRAW_ORDERS = ("lowres_first", "image_first")
CHOICES = {
    "time": TIMES,
    "spacing": SPACINGS,
    "prediction": PREDICTIONS,
    "guidance": GUIDANCES,
    "variance": VARIANCES,
    "threshold": THRESHOLDS,
    "unconditional": UNCONDITIONALS,
    "resize": RESIZES,
    "draw_order": DRAW_ORDERS,
}
# which predictions each kind of time allows, and the sampler that walks its table
TIME_PREDICTIONS = {"discrete": ("noise",), "continuous": ("noise", "x_start", "v"), "karras": ("edm",)}
TABLE_SAMPLERS = {"continuous": "ddpm_continuous", "karras": "heun_edm"}
# the per-step table of a stage sampled in continuous time, a list of one float32 value per step
# (docs/bundle.md, Continuous time), and the scalars of a super-resolution stage's low-res image
CONTINUOUS_TABLE = ("time", "alpha", "sigma", "alpha_next", "c", "one_minus_c", "noise_std")
KARRAS_TABLE = ("sigma", "sigma_next", "gamma", "time", "c_in", "c_skip", "c_out")
KARRAS_TABLE += ("time_next", "c_in_next", "c_skip_next", "c_out_next")
TABLE_COLUMNS = {"continuous": CONTINUOUS_TABLE, "karras": KARRAS_TABLE}
TABLE_SCALARS = {"continuous": (), "karras": ("init_sigma", "S_noise")}
LOWRES_SCALARS = ("lowres_time", "lowres_alpha", "lowres_sigma")


def _table(where: str, time: str, table, lowres: bool) -> dict | None:
    """The table, checked: a tuple of floats per column, a float per scalar."""
    if time == "discrete":
        if table is not None:
            raise json_error(f"{where}.table", "is given, but a discrete-time stage is sampled from its schedule")
        return None
    table = json_object(table, f"{where}.table")
    scalars = TABLE_SCALARS[time] + (LOWRES_SCALARS if lowres else ())
    expected = set(TABLE_COLUMNS[time]) | set(scalars)
    if set(table) != expected:
        missing, extra = sorted(expected - set(table)), sorted(set(table) - expected)
        raise json_error(
            f"{where}.table", f"must hold exactly {', '.join(sorted(expected))} (missing {missing}, unknown {extra})"
        )
    rows = None
    out = {}
    for name in TABLE_COLUMNS[time]:
        column = table[name]
        if not isinstance(column, list) or not column or not all(is_number(v) and math.isfinite(v) for v in column):
            raise json_error(f"{where}.table.{name}", "must be a non-empty list of finite numbers")
        if rows is not None and len(column) != rows:
            raise json_error(f"{where}.table.{name}", f"has {len(column)} values; the other columns have {rows}")
        rows = len(column)
        out[name] = tuple(float(v) for v in column)
    for name in scalars:
        if not is_number(table[name]) or not math.isfinite(table[name]):
            raise json_error(f"{where}.table.{name}", f"is {table[name]!r}; expected a finite number")
        out[name] = float(table[name])
    return out


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
    whether the low-res augmentation noise is drawn before the stage's initial image or after it.

    imagen-pytorch's stages (docs/bundle.md, Continuous time): `time` is `discrete` (a schedule's
    integer timesteps, the samplers of runtime/samplers.py), `continuous` (GaussianDiffusionContinuousTimes,
    walked by `ddpm_continuous`) or `karras` (ElucidatedImagen's sigmas, walked by `heun_edm`). The
    last two carry `table`: per step, every float32 scalar the loop multiplies by, as imagen-pytorch's
    torch computes them (the time fed to the Unet, alpha, sigma, the posterior's coefficients; or the
    sigmas, churn and preconditioning), so that the runtime only multiplies and adds. `prediction`:
    what the Unet outputs (`noise`, `x_start`, `v`, or `edm`: EDM's raw output F, preconditioned with
    c_skip and c_out). `guidance`: `standard` uncond + s (cond - uncond), or `remove_parallel`
    (imagen-pytorch's default: cond + (s - 1) times the update's component orthogonal to cond, in
    float64 per sample). `self_cond`: the Unet is fed the previous data prediction (zeros first).
    `resize` `nearest`: imagen-pytorch's, on the image in [0, 1]."""

    time: str = "discrete"
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
    guidance: str = "standard"
    self_cond: bool = False
    table: dict[str, list[float] | float] | None = None  # continuous and karras stages only

    @property
    def columns(self) -> dict:
        """The table by name: the values per step, or one value (empty for a discrete stage)."""
        return self.table or {}

    @property
    def steps(self) -> int | None:
        """Steps of a table stage (its table's rows), None for a discrete stage."""
        return None if self.time == "discrete" else len(self.columns[TABLE_COLUMNS[self.time][0]])

    @property
    def sampler(self) -> str | None:
        """The only sampler of a table stage; None: any discrete sampler."""
        return TABLE_SAMPLERS.get(self.time)

    @classmethod
    def from_json(cls, name: str, entry, lowres: bool = False) -> "SamplingEntry":
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
        if values["prediction"] not in TIME_PREDICTIONS[values["time"]]:
            allowed = ", ".join(TIME_PREDICTIONS[values["time"]])
            raise json_error(
                f"{where}.prediction", f"is {values['prediction']!r}; a {values['time']} stage predicts {allowed}"
            )
        self_cond = entry.get("self_cond", False)
        if not isinstance(self_cond, bool):
            raise json_error(f"{where}.self_cond", f"is {self_cond!r}; expected true or false")
        return cls(
            **values,
            self_cond=self_cond,
            table=_table(where, values["time"], entry.get("table"), lowres),
            steps_offset=int(offset),
            threshold_percentile=None if percentile is None else float(percentile),
            threshold_max=None if maximum is None else float(maximum),
        )

    def to_json(self) -> dict:
        # the fields of imagen-pytorch's stages are written only where they say something (format 2
        # bundles written before them read the same)
        later = {"time": "discrete", "guidance": "standard", "self_cond": False}
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "table" and not (f.name in later and getattr(self, f.name) == later[f.name])
        }
        if self.table is not None:
            out["table"] = {
                name: list(value) if isinstance(value, tuple) else value for name, value in self.table.items()
            }
        return out

    @property
    def is_default(self) -> bool:
        """Sampled as format 1 bundles are: the entry may be left out."""
        return self == SamplingEntry()
