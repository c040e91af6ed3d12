"""Classifier-free guidance and dynamic thresholding (Imagen sec. 2.3), the math between the
Unet and the sampler update, and `GuidedDenoiser`, which joins them into the sampler's
`denoise(x, t) -> x0` (k-diffusion's model-wrapper seam). Image arithmetic is float32.

The NumPy twin of `imagen.reference.guidance` (torch): same names, formulas and order of
operations (docs/bundle.md, Sampling step 3, and Twins).
"""

import time

import numpy as np

from .errors import NonFiniteError


def apply_guidance(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond + np.float32(scale) * (cond - uncond)


def dynamic_threshold(x0: np.ndarray, percentile: float) -> np.ndarray:
    """Imagen sec. 2.3: per sample s = max(quantile_p(|x0|), 1) with linear interpolation;
    clip x0 to [-s, s] and divide by s."""
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    s = np.quantile(flat, percentile, axis=-1).astype(x0.dtype, copy=False)
    s = np.maximum(s, np.asarray(1.0, dtype=x0.dtype)).reshape(-1, *((1,) * (x0.ndim - 1)))
    return np.clip(x0, -s, s) / s


def _repeat_rows(array: np.ndarray, copies: int) -> np.ndarray:
    """`copies` copies of `array` stacked along the batch axis (the [cond; uncond] rows)."""
    return np.concatenate([array] * copies) if copies > 1 else array


class GuidedDenoiser:
    """`denoise(x, t) -> x0` for one Unet: one Unet call on [cond; uncond] (2B rows, `text_keep`
    B true then B false; only the B cond rows when guidance_scale == 1), guidance on the noise,
    x0 from the noise (DDPM eq. 15), then dynamic thresholding.

    `backend.run(feeds)` returns {"noise_pred": ...}; `lowres_cond_img` (B, C, s, s) and
    `lowres_noise_times` (B,) float32 condition a super-resolution Unet. `calls` counts the Unet
    calls and `engine_seconds` the time spent inside `backend.run`."""

    def __init__(
        self,
        backend,
        schedule,
        text_embeds: np.ndarray,
        text_mask: np.ndarray,
        *,
        guidance_scale: float,
        percentile: float,
        lowres_cond_img: np.ndarray | None = None,
        lowres_noise_times: np.ndarray | None = None,
        name: str = "unet",
    ):
        if (lowres_cond_img is None) != (lowres_noise_times is None):
            raise ValueError("lowres_cond_img and lowres_noise_times go together; pass both or neither")
        self.backend, self.schedule, self.name = backend, schedule, name
        self.guidance_scale, self.percentile = guidance_scale, percentile
        self.batch = text_embeds.shape[0]
        self.copies = 1 if guidance_scale == 1 else 2
        self.rows = self.batch * self.copies
        # Everything but x and time is the same at every step: repeated to rows once, here.
        self.conditioning = {
            "text_embeds": _repeat_rows(text_embeds, self.copies),
            "text_mask": _repeat_rows(text_mask, self.copies),
            "text_keep": np.arange(self.rows) < self.batch,
        }
        if lowres_cond_img is not None:
            self.conditioning["lowres_cond_img"] = _repeat_rows(lowres_cond_img, self.copies)
            self.conditioning["lowres_noise_times"] = _repeat_rows(lowres_noise_times, self.copies)
        self.calls = 0
        self.engine_seconds = 0.0

    def predict_noise(self, x: np.ndarray, t: int) -> np.ndarray:
        """The guided noise prediction for x (B, C, s, s) at timestep t."""
        time_rows = np.full((self.rows,), float(t), dtype=np.float32)
        feeds = {"x": _repeat_rows(x, self.copies), "time": time_rows, **self.conditioning}
        start = time.perf_counter()
        pred = self.backend.run(feeds)["noise_pred"]
        self.engine_seconds += time.perf_counter() - start
        step = self.calls
        self.calls += 1
        if not np.all(np.isfinite(pred)):
            raise NonFiniteError(self.name, step, t)
        if self.copies == 1:
            return pred
        return apply_guidance(pred[: self.batch], pred[self.batch :], self.guidance_scale)

    def __call__(self, x: np.ndarray, t: int) -> np.ndarray:
        eps = self.predict_noise(x, t)
        return dynamic_threshold(self.schedule.predict_start_from_noise(x, t, eps), self.percentile)
