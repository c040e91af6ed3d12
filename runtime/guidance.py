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


def dynamic_threshold(x0, percentile: float):
    """Imagen sec. 2.3: per sample s = max(quantile_p(|x0|), 1) with linear interpolation;
    clip x0 to [-s, s] and divide by s."""
    xp = namespace(x0)
    flat = xp.abs(xp.reshape(x0, (x0.shape[0], -1)))
    s = quantile(flat, percentile)
    s = xp.reshape(xp.maximum(s, xp.ones_like(s)), (-1, *((1,) * (x0.ndim - 1))))
    return xp.minimum(xp.maximum(x0, -s), s) / s  # clip(x0, -s, s), which compat's NumPy clip does slower


def _repeat_rows(array, copies: int):
    """`copies` copies of `array` stacked along the batch axis (the [cond; uncond] rows)."""
    return namespace(array).concat([array] * copies) if copies > 1 else array


class GuidedDenoiser:
    """`denoise(x, t) -> x0` for one Unet: one Unet call on [cond; uncond] (2B rows, `text_keep`
    B true then B false; only the B cond rows when guidance_scale == 1), guidance on the noise,
    x0 from the noise (DDPM eq. 15), then dynamic thresholding.

    `backend.run(feeds)` returns {"noise_pred": ...}; `lowres_cond_img` (B, C, s, s) and
    `lowres_noise_times` (B,) float32 condition a super-resolution Unet. Every array is of the
    namespace and on the device of `text_embeds`, and so are the feeds. `calls` counts the Unet
    calls and `engine_seconds` the time spent inside `backend.run`."""

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
    ):
        if (lowres_cond_img is None) != (lowres_noise_times is None):
            raise ValueError("lowres_cond_img and lowres_noise_times go together; pass both or neither")
        self.backend, self.schedule, self.name = backend, schedule, name
        self.xp, self.device = namespace(text_embeds), device(text_embeds)
        self.guidance_scale, self.percentile = guidance_scale, percentile
        self.batch = text_embeds.shape[0]
        self.copies = 1 if guidance_scale == 1 else 2
        self.rows = self.batch * self.copies
        # Everything but x and time is the same at every step: repeated to rows once, here.
        self.conditioning = {
            "text_embeds": _repeat_rows(text_embeds, self.copies),
            "text_mask": _repeat_rows(text_mask, self.copies),
            "text_keep": self.xp.arange(self.rows, device=self.device) < self.batch,
        }
        if lowres_cond_img is not None:
            self.conditioning["lowres_cond_img"] = _repeat_rows(lowres_cond_img, self.copies)
            self.conditioning["lowres_noise_times"] = _repeat_rows(lowres_noise_times, self.copies)
        self.calls = 0
        self.engine_seconds = 0.0

    def predict_noise(self, x, t: int):
        """The guided noise prediction for x (B, C, s, s) at timestep t."""
        xp = self.xp
        time_rows = xp.full((self.rows,), float(t), dtype=xp.float32, device=self.device)
        feeds = {"x": _repeat_rows(x, self.copies), "time": time_rows, **self.conditioning}
        start = time.perf_counter()
        pred = self.backend.run(feeds)["noise_pred"]
        self.engine_seconds += time.perf_counter() - start
        step = self.calls
        self.calls += 1
        if not bool(xp.all(xp.isfinite(pred))):
            raise NonFiniteError(self.name, step, t)
        if self.copies == 1:
            return pred
        return apply_guidance(pred[: self.batch, ...], pred[self.batch :, ...], self.guidance_scale)

    def __call__(self, x, t: int):
        eps = self.predict_noise(x, t)
        return dynamic_threshold(self.schedule.predict_start_from_noise(x, t, eps), self.percentile)
