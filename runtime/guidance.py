"""Classifier-free guidance and dynamic thresholding (Imagen sec. 2.3), the math between the
Unet and the sampler update, and `GuidedDenoiser`, which joins them into the sampler's
`denoise(x, t) -> x0` (k-diffusion's model-wrapper seam). Image arithmetic is float32.

The array-API twin of `imagen.reference.guidance` (torch): same names, formulas and order of
operations (docs/bundle.md, Sampling step 3, and Twins). Arrays may come from any array API
namespace (NumPy, CuPy, ...); everything is computed in theirs, on their device.
"""

import math
import time

import numpy as np

from .arrays import device, namespace
from .errors import NonFiniteError


def apply_guidance(cond, uncond, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond + float(np.float32(scale)) * (cond - uncond)


def remove_parallel_guidance(cond, uncond, scale: float):
    """imagen-pytorch's classifier-free guidance (its `sample()` default): the update cond - uncond
    without its component parallel to cond, cond + (scale - 1) update_orthogonal. The projection
    is per sample over all its values, in float64 (cond / max(||cond||, 1e-12) the unit vector),
    and cast back to float32 before it meets the images."""
    xp = namespace(cond)
    update = cond - uncond
    rows = (cond.shape[0], -1)
    update64 = xp.astype(xp.reshape(update, rows), xp.float64)
    cond64 = xp.astype(xp.reshape(cond, rows), xp.float64)
    norm = xp.sqrt(xp.sum(cond64 * cond64, axis=-1, keepdims=True))
    unit = cond64 / xp.maximum(norm, xp.full_like(norm, 1e-12))
    parallel = xp.sum(update64 * unit, axis=-1, keepdims=True) * unit
    orthogonal = xp.reshape(xp.astype(update64 - parallel, xp.float32), cond.shape)
    return cond + orthogonal * float(np.float32(scale - 1))


def quantile(values, q: float):
    """numpy.quantile(values, q, axis=-1) of (B, N) values for a float q in [0, 1] (method "linear",
    NumPy's order of float operations, in the values' dtype): with the sorted values v and
    p = (N - 1) q, g = p - floor(p), a = v[floor(p)] and b = v[floor(p) + 1], it is a + (b - a) g,
    or b - (b - a) (1 - g) when g >= 0.5; v[N - 1] when p >= N - 1. The array API has no quantile:
    this sorts, or partitions around the two positions where the namespace can (NumPy, CuPy: the
    same values, in linear time)."""
    xp = namespace(values)
    n = values.shape[-1]
    position = (n - 1) * float(q)
    below = min(math.floor(position), n - 1)
    partition = getattr(xp, "partition", None)
    if partition is None:
        ordered = xp.sort(values, axis=-1)
    else:
        ordered = partition(values, [below, min(below + 1, n - 1)], axis=-1)
    if position >= n - 1:
        return ordered[:, n - 1]
    gamma = position - below
    a, b = ordered[:, below], ordered[:, below + 1]
    difference = b - a
    return a + difference * gamma if gamma < 0.5 else b - difference * (1.0 - gamma)


def dynamic_threshold(x0, percentile: float, maximum: float | None = None):
    """Imagen sec. 2.3: per sample s = max(quantile_p(|x0|), 1) with linear interpolation, at most
    `maximum` when given (diffusers' sample_max_value); clip x0 to [-s, s] and divide by s."""
    xp = namespace(x0)
    flat = xp.abs(xp.reshape(x0, (x0.shape[0], -1)))
    s = xp.maximum(quantile(flat, percentile), xp.ones_like(flat[:, 0]))
    if maximum is not None:
        s = xp.minimum(s, xp.full_like(s, float(np.float32(maximum))))
    s = xp.reshape(s, (-1, *((1,) * (x0.ndim - 1))))
    return xp.minimum(xp.maximum(x0, -s), s) / s  # clip(x0, -s, s), which compat's NumPy clip does slower


def threshold(x0, kind: str, percentile: float, maximum: float | None = None):
    """The data prediction as a stage's sampling entry says: `dynamic`ally thresholded, `clip`ped to
    [-1, 1], or as is (`none`)."""
    if kind == "dynamic":
        return dynamic_threshold(x0, percentile, maximum)
    if kind == "clip":
        return namespace(x0).clip(x0, -1.0, 1.0)
    return x0


def _repeat_rows(array, copies: int):
    """`copies` copies of `array` stacked along the batch axis (the [cond; uncond] rows)."""
    return namespace(array).concat([array] * copies) if copies > 1 else array


def null_text_rows(text_embeds, text_mask, copies: int) -> dict:
    """The text feeds of a Unet with a learned null text: [cond; uncond] rows when `copies` is 2, the
    uncond rows' text swapped for the null text by `text_keep`."""
    xp = namespace(text_embeds)
    rows = text_embeds.shape[0] * copies
    return {
        "text_embeds": _repeat_rows(text_embeds, copies),
        "text_mask": _repeat_rows(text_mask, copies),
        "text_keep": xp.arange(rows, device=device(text_embeds)) < text_embeds.shape[0],
    }


def lowres_rows(lowres_cond_img, lowres_noise_times, copies: int) -> dict:
    """A super-resolution Unet's low-res feeds on the guidance rows (none for a base Unet)."""
    if lowres_cond_img is None:
        return {}
    return {
        "lowres_cond_img": _repeat_rows(lowres_cond_img, copies),
        "lowres_noise_times": _repeat_rows(lowres_noise_times, copies),
    }


class GuidedDenoiser:
    """`denoise(x, t) -> x0` for one Unet: one Unet call on the guidance rows, guidance on the noise,
    x0 from the noise (DDPM eq. 15), then the stage's thresholding (dynamic by default).

    The rows: with a learned null text, [cond; uncond] (2B rows, `text_keep` B true then B false,
    `text_mask` fed); with `uncond_embeds` (a negative prompt's embeddings, DeepFloyd IF),
    [uncond; cond] and no mask. Only the B cond rows when guidance_scale == 1. A Unet that learns
    its variance outputs `variance_pred`; the cond rows' half is kept in `variance` for the sampler
    (guidance applies to the noise only).

    `backend.run(feeds)` returns {"noise_pred": ...[, "variance_pred": ...]}; `lowres_cond_img`
    (B, C, s, s) and `lowres_noise_times` (B,) float32 condition a super-resolution Unet. Every
    array is of the namespace and on the device of `text_embeds`, and so are the feeds. `calls`
    counts the Unet calls and `engine_seconds` the time spent inside `backend.run`."""

    def __init__(
        self,
        backend,
        schedule,
        text_embeds,
        text_mask,
        *,
        guidance_scale: float,
        percentile: float,
        lowres_cond_img=None,
        lowres_noise_times=None,
        name: str = "unet",
        uncond_embeds=None,
        threshold_kind: str = "dynamic",
        threshold_max: float | None = None,
    ):
        if (lowres_cond_img is None) != (lowres_noise_times is None):
            raise ValueError("lowres_cond_img and lowres_noise_times go together; pass both or neither")
        self.backend, self.schedule, self.name = backend, schedule, name
        self.xp, self.device = namespace(text_embeds), device(text_embeds)
        self.guidance_scale, self.percentile = guidance_scale, percentile
        self.threshold_kind, self.threshold_max = threshold_kind, threshold_max
        self.batch = text_embeds.shape[0]
        self.copies = 1 if guidance_scale == 1 else 2
        self.rows = self.batch * self.copies
        self.uncond_first = uncond_embeds is not None
        # Everything but x and time is the same at every step: repeated to rows once, here.
        if self.uncond_first:
            embeds = text_embeds if self.copies == 1 else self.xp.concat([uncond_embeds, text_embeds])
            self.conditioning = {"text_embeds": embeds}
        else:
            self.conditioning = null_text_rows(text_embeds, text_mask, self.copies)
        self.conditioning.update(lowres_rows(lowres_cond_img, lowres_noise_times, self.copies))
        self.variance = None
        self.calls = 0
        self.engine_seconds = 0.0

    def predict_noise(self, x, t: int):
        """The guided noise prediction for x (B, C, s, s) at timestep t; the cond rows' learned
        variance, if the Unet has one, in `self.variance`."""
        xp = self.xp
        time_rows = xp.full((self.rows,), float(t), dtype=xp.float32, device=self.device)
        feeds = {"x": _repeat_rows(x, self.copies), "time": time_rows, **self.conditioning}
        start = time.perf_counter()
        outputs = self.backend.run(feeds)
        self.engine_seconds += time.perf_counter() - start
        pred, variance = outputs["noise_pred"], outputs.get("variance_pred")
        step = self.calls
        self.calls += 1
        if not bool(xp.all(xp.isfinite(pred))) or (variance is not None and not bool(xp.all(xp.isfinite(variance)))):
            raise NonFiniteError(self.name, step, t)
        if self.copies == 1:
            self.variance = variance
            return pred
        first, second = pred[: self.batch, ...], pred[self.batch :, ...]
        cond, uncond = (second, first) if self.uncond_first else (first, second)
        if variance is not None:
            variance = variance[self.batch :, ...] if self.uncond_first else variance[: self.batch, ...]
        self.variance = variance
        return apply_guidance(cond, uncond, self.guidance_scale)

    def __call__(self, x, t: int):
        eps = self.predict_noise(x, t)
        x0 = self.schedule.predict_start_from_noise(x, t, eps)
        return threshold(x0, self.threshold_kind, self.percentile, self.threshold_max)
