"""Classifier-free guidance and dynamic thresholding (Imagen sec. 2.3), the math between the
Unet and the sampler update, and `GuidedDenoiser`, which joins them into the sampler's
`denoise(x, t) -> x0` (k-diffusion's model-wrapper seam). Image arithmetic is float32.

The torch twin of `imagen.runtime.guidance` (NumPy): same names, formulas and order of
operations (docs/bundle.md, Sampling step 3, and Twins).
"""

import torch


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def remove_parallel_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """imagen-pytorch's classifier-free guidance (its `sample()` default): the update cond - uncond
    without its component parallel to cond, cond + (scale - 1) update_orthogonal. The projection
    is per sample over all its values, in float64 (cond / max(||cond||, 1e-12) the unit vector),
    and cast back to float32 before it meets the images."""
    update = cond - uncond
    update64 = update.reshape(cond.shape[0], -1).double()
    cond64 = cond.reshape(cond.shape[0], -1).double()
    unit = cond64 / cond64.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    parallel = (update64 * unit).sum(dim=-1, keepdim=True) * unit
    orthogonal = (update64 - parallel).float().reshape(cond.shape)
    return cond + orthogonal * (scale - 1)


def dynamic_threshold(x0: torch.Tensor, percentile: float, maximum: float | None = None) -> torch.Tensor:
    """Imagen sec. 2.3: per sample s = max(quantile_p(|x0|), 1) with linear interpolation, at most
    `maximum` when given (diffusers' sample_max_value); clip x0 to [-s, s] and divide by s."""
    s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), percentile, dim=-1).clamp(min=1.0)
    if maximum is not None:
        s = s.clamp(max=float(torch.tensor(maximum, dtype=torch.float32)))
    s = s.reshape(-1, *((1,) * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def threshold(x0: torch.Tensor, kind: str, percentile: float, maximum: float | None = None) -> torch.Tensor:
    """The data prediction as a stage's sampling entry says: `dynamic`ally thresholded, `clip`ped to
    [-1, 1], or as is (`none`)."""
    if kind == "dynamic":
        return dynamic_threshold(x0, percentile, maximum)
    if kind == "clip":
        return x0.clamp(-1.0, 1.0)
    return x0


def _repeat_rows(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of `tensor` stacked along the batch axis (the [cond; uncond] rows)."""
    return torch.cat([tensor] * copies) if copies > 1 else tensor


class GuidedDenoiser:
    """`denoise(x, t) -> x0` for one Unet: one Unet call on the guidance rows, guidance on the noise,
    x0 from the noise (DDPM eq. 15), then the stage's thresholding (dynamic by default).

    The rows: with a learned null text, [cond; uncond] (2B rows, `text_keep` B true then B false,
    `text_mask` fed); with `uncond_embeds` (a negative prompt's embeddings, DeepFloyd IF),
    [uncond; cond] and no mask. Only the B cond rows when guidance_scale == 1. A Unet that learns
    its variance returns (noise, variance); the cond rows' variance is kept in `variance` for the
    sampler (guidance applies to the noise only).

    `unet(x, time, **conditioning)` returns the predicted noise (or both); `lowres_cond_img`
    (B, C, s, s) and `lowres_noise_times` (B,) float32 condition a super-resolution Unet. `calls`
    counts the Unet calls."""

    def __init__(
        self,
        unet,
        schedule,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        guidance_scale: float,
        percentile: float,
        lowres_cond_img: torch.Tensor | None = None,
        lowres_noise_times: torch.Tensor | None = None,
        uncond_embeds: torch.Tensor | None = None,
        threshold_kind: str = "dynamic",
        threshold_max: float | None = None,
    ):
        if (lowres_cond_img is None) != (lowres_noise_times is None):
            raise ValueError("lowres_cond_img and lowres_noise_times go together; pass both or neither")
        self.unet, self.schedule = unet, schedule
        self.guidance_scale, self.percentile = guidance_scale, percentile
        self.threshold_kind, self.threshold_max = threshold_kind, threshold_max
        self.batch = text_embeds.shape[0]
        self.copies = 1 if guidance_scale == 1 else 2
        self.rows = self.batch * self.copies
        self.uncond_first = uncond_embeds is not None
        # Everything but x and time is the same at every step: repeated to rows once, here.
        if self.uncond_first:
            embeds = text_embeds if self.copies == 1 else torch.cat([uncond_embeds, text_embeds])
            self.conditioning = {"text_embeds": embeds}
        else:
            self.conditioning = {
                "text_embeds": _repeat_rows(text_embeds, self.copies),
                "text_mask": _repeat_rows(text_mask, self.copies),
                "text_keep": torch.arange(self.rows) < self.batch,
            }
        if lowres_cond_img is not None:
            self.conditioning["lowres_cond_img"] = _repeat_rows(lowres_cond_img, self.copies)
            self.conditioning["lowres_noise_times"] = _repeat_rows(lowres_noise_times, self.copies)
        self.variance = None
        self.calls = 0

    @torch.no_grad()
    def predict_noise(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The guided noise prediction for x (B, C, s, s) at timestep t; the cond rows' learned
        variance, if the Unet has one, in `self.variance`."""
        time_rows = torch.full((self.rows,), float(t), dtype=torch.float32)
        pred = self.unet(_repeat_rows(x, self.copies), time_rows, **self.conditioning)
        pred, variance = pred if isinstance(pred, tuple) else (pred, None)
        self.calls += 1
        if self.copies == 1:
            self.variance = variance
            return pred
        first, second = pred[: self.batch], pred[self.batch :]
        cond, uncond = (second, first) if self.uncond_first else (first, second)
        if variance is not None:
            variance = variance[self.batch :] if self.uncond_first else variance[: self.batch]
        self.variance = variance
        return apply_guidance(cond, uncond, self.guidance_scale)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        eps = self.predict_noise(x, t)
        x0 = self.schedule.predict_start_from_noise(x, t, eps)
        return threshold(x0, self.threshold_kind, self.percentile, self.threshold_max)
