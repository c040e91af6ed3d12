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


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen sec. 2.3: per sample s = max(quantile_p(|x0|), 1) with linear interpolation;
    clip x0 to [-s, s] and divide by s."""
    s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), percentile, dim=-1)
    s = s.clamp(min=1.0).reshape(-1, *((1,) * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def _repeat_rows(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of `tensor` stacked along the batch axis (the [cond; uncond] rows)."""
    return torch.cat([tensor] * copies) if copies > 1 else tensor


class GuidedDenoiser:
    """`denoise(x, t) -> x0` for one Unet: one Unet call on [cond; uncond] (2B rows, `text_keep`
    B true then B false; only the B cond rows when guidance_scale == 1), guidance on the noise,
    x0 from the noise (DDPM eq. 15), then dynamic thresholding.

    `unet(x, time, **conditioning)` returns the predicted noise; `lowres_cond_img` (B, C, s, s)
    and `lowres_noise_times` (B,) float32 condition a super-resolution Unet. `calls` counts the
    Unet calls."""

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
    ):
        if (lowres_cond_img is None) != (lowres_noise_times is None):
            raise ValueError("lowres_cond_img and lowres_noise_times go together; pass both or neither")
        self.unet, self.schedule = unet, schedule
        self.guidance_scale, self.percentile = guidance_scale, percentile
        self.batch = text_embeds.shape[0]
        self.copies = 1 if guidance_scale == 1 else 2
        self.rows = self.batch * self.copies
        # Everything but x and time is the same at every step: repeated to rows once, here.
        self.conditioning = {
            "text_embeds": _repeat_rows(text_embeds, self.copies),
            "text_mask": _repeat_rows(text_mask, self.copies),
            "text_keep": torch.arange(self.rows) < self.batch,
        }
        if lowres_cond_img is not None:
            self.conditioning["lowres_cond_img"] = _repeat_rows(lowres_cond_img, self.copies)
            self.conditioning["lowres_noise_times"] = _repeat_rows(lowres_noise_times, self.copies)
        self.calls = 0

    @torch.no_grad()
    def predict_noise(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The guided noise prediction for x (B, C, s, s) at timestep t."""
        time_rows = torch.full((self.rows,), float(t), dtype=torch.float32)
        pred = self.unet(_repeat_rows(x, self.copies), time_rows, **self.conditioning)
        self.calls += 1
        if self.copies == 1:
            return pred
        return apply_guidance(pred[: self.batch], pred[self.batch :], self.guidance_scale)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        eps = self.predict_noise(x, t)
        return dynamic_threshold(self.schedule.predict_start_from_noise(x, t, eps), self.percentile)
